"""Multi-stage recipes: stages chain (continue / merge), resume per stage, pretrain and self_train stages."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import parity_rows, write_jsonl, write_task
from moerge.errors import MoergeError
from moerge.recipes.train import train_expert
from moerge.train.config import StagedConfig, load_train_config, staged_from_dict

FAST = {"batch_size": 4, "max_length": 48, "lr": 5e-3, "rank": 4, "eval_limit": 2, "checkpoint_every": 2}


@pytest.fixture
def parity(tmp_path):
    return write_task(tmp_path / "parity.jsonl", parity_rows(40))


def _recipe(base, *stages, **top) -> StagedConfig:
    return staged_from_dict({"base": str(base), **FAST, **top, "stages": list(stages)})


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_stages_inherit_top_level_settings_with_their_own_seed(tmp_path, parity):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {"base": "b", "task": parity, "seed": 7, "steps": 3, "stages": [{"name": "a"}, {"steps": 5, "lr": 1e-3}]}
        )
    )
    recipe = load_train_config(path, {"method": "hft"})
    assert isinstance(recipe, StagedConfig)
    assert [s.steps for s in recipe.stages] == [3, 5] and [s.seed for s in recipe.stages] == [7, 8]
    assert [s.name for s in recipe.stages] == ["a", "stage2"] and {s.method for s in recipe.stages} == {"hft"}
    with pytest.raises(MoergeError, match=r"recipe: stages\.0\.rank: "):
        staged_from_dict({"base": "b", "stages": [{"task": parity, "rank": 0}]})
    with pytest.raises(MoergeError, match="start: merge"):
        train_expert(_recipe("b", {"task": parity}, {"task": parity, "method": "full"}), tmp_path / "x")


def test_continue_starts_stage_two_from_stage_one_adapter(tiny_base, parity, tmp_path):
    one = train_expert(_recipe(tiny_base, {"task": parity, "steps": 3}), tmp_path / "one", progress=False)
    two = train_expert(
        _recipe(tiny_base, {"task": parity, "steps": 3}, {"task": parity, "steps": 2, "lr": 1e-12}),
        tmp_path / "two",
        progress=False,
    )
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    lora_b = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().max() > 0 for k in lora_b)  # stage 1 moved B away from its zero init
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)  # stage 2 began from it
    assert two.kind == "adapter" and len(two.stages) == 2 and one.kind == "adapter"
    assert two.stages[1]["start"] == "continue" and two.stages[1]["hyperparameters"]["continued_from"]
    assert two.cost["train_time_s"] == pytest.approx(sum(s["cost"]["train_time_s"] for s in two.stages), abs=0.02)


def test_merge_folds_stage_one_into_the_weights(tiny_base, parity, tmp_path):
    from peft import PeftModel

    from moerge.models import load_base

    train_expert(_recipe(tiny_base, {"task": parity, "steps": 3}), tmp_path / "one", progress=False)
    meta = train_expert(
        _recipe(
            tiny_base,
            {"task": parity, "steps": 3},
            {"task": parity, "steps": 1, "lr": 1e-12, "method": "full", "start": "merge"},
        ),
        tmp_path / "two",
        progress=False,
    )
    assert meta.kind == "full" and meta.base.name_or_path == str(tiny_base)
    model, _ = load_base(tiny_base)
    expected = PeftModel.from_pretrained(model, str(tmp_path / "one")).merge_and_unload().state_dict()
    got = load_file(str(tmp_path / "two" / "model.safetensors"))
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-4)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[key], load_file(str(tiny_base / "model.safetensors"))[key])


def test_interrupted_stage_resumes_and_finished_stage_is_kept(tiny_base, parity, tmp_path, monkeypatch):
    import moerge.recipes.train as stages
    import moerge.train.loop as loop

    recipe = _recipe(tiny_base, {"task": parity, "steps": 3}, {"task": parity, "steps": 5, "eval_split": None})
    straight = train_expert(recipe, tmp_path / "straight", progress=False)

    real, calls = loop.lr_factor, []

    def crash_in_stage_two_step_four(step, total, warmup):
        calls.append(step)
        if total == 5 and step == 3:
            raise RuntimeError("simulated crash")
        return real(step, total, warmup)

    monkeypatch.setattr(loop, "lr_factor", crash_in_stage_two_step_four)
    with pytest.raises(RuntimeError):
        train_expert(recipe, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(MoergeError, match="--resume"):
        train_expert(recipe, tmp_path / "r", progress=False)
    monkeypatch.setattr(loop, "lr_factor", real)
    trained = []
    original = stages.fit
    monkeypatch.setattr(stages, "fit", lambda cfg, out, **kw: trained.append(out.name) or original(cfg, out, **kw))
    meta = train_expert(recipe, tmp_path / "r", resume=True, progress=False)
    assert trained == ["02-stage2"]  # stage 1 finished before the crash: kept, not redone
    assert meta.stages[1]["cost"]["resumed_from_step"] == 2
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "r")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert straight.hyperparameters["config_hash"] == meta.hyperparameters["config_hash"]


def test_edited_recipe_is_refused_on_resume(tiny_base, parity, tmp_path, monkeypatch):
    import moerge.train.loop as loop

    recipe = _recipe(tiny_base, {"task": parity, "steps": 2}, {"task": parity, "steps": 3})
    monkeypatch.setattr(loop, "lr_factor", lambda step, total, warmup: 1 / 0 if total == 3 else 1.0)
    with pytest.raises(ZeroDivisionError):
        train_expert(recipe, tmp_path / "r", progress=False)
    edited = _recipe(tiny_base, {"task": parity, "steps": 2, "lr": 1e-3}, {"task": parity, "steps": 3})
    with pytest.raises(MoergeError, match="--restart"):
        train_expert(edited, tmp_path / "r", resume=True, progress=False)


def test_pretrain_stage_uses_plain_lm_loss_on_raw_text(tiny_base, parity, tmp_path):
    from moerge.models import load_base
    from moerge.train.config import TrainConfig
    from moerge.train.data import text_data

    (tmp_path / "a.txt").write_text("The cat sat on the mat.\n\nDogs bark at night.\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "Birds sing in the morning."}])
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    _, tok = load_base(tiny_base)
    data = text_data(TrainConfig(base="b", type="pretrain", text=files, max_length=16), tok)
    assert all(item.labels == item.input_ids for item in data.items)
    stream = [t for item in data.items for t in item.input_ids]
    assert stream.count(tok.eos_token_id) == 3 and tok.decode(stream).startswith("The cat sat")

    meta = train_expert(
        _recipe(tiny_base, {"type": "pretrain", "text": files, "steps": 2}, {"task": parity, "steps": 2}),
        tmp_path / "e",
        progress=False,
    )
    assert [s["type"] for s in meta.stages] == ["pretrain", "finetune"]
    assert meta.stages[0]["task"]["name"] == "text" and meta.stages[0]["metrics"] == {}
    assert meta.task.name == "parity" and meta.kind == "adapter"


def test_self_train_runs_teacher_pseudo_labels_student_and_final_finetune(tiny_base, tmp_path):
    labelled = write_task(tmp_path / "parity.jsonl", parity_rows(24))
    pool = write_jsonl(
        tmp_path / "pool.jsonl", [{"input": f"Is {i} even?", "target": ["yes", "no"][i % 2]} for i in range(100, 140)]
    )
    stage = {
        "type": "self_train",
        "task": labelled,
        "unlabelled": str(pool),
        "confidence": 0.5,
        "steps": 2,
        "pseudo_steps": 3,
    }
    meta = train_expert(_recipe(tiny_base, stage), tmp_path / "st", progress=False)
    kinds = [s["type"] for s in meta.stages]
    assert kinds == ["self_train:teacher", "self_train:pseudo_label", "self_train:student", "self_train:finetune"]
    pseudo = meta.stages[1]
    assert pseudo["pool"] == 40 and 0 < pseudo["kept"] <= 40 and 0 <= pseudo["pseudo_label_accuracy"] <= 1
    student = meta.stages[2]
    assert student["task"]["name"] == "parity-pseudo" and student["hyperparameters"]["steps"] == 3
    assert student["start"] == "base"  # the student starts where the teacher started, not from it
    assert "test" in student["metrics"]  # evaluated on the labelled task
    assert meta.stages[3]["start"] == "continue" and meta.kind == "adapter"


def _logprob(model, prompt: list[int], answer: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return float(logprobs[torch.arange(len(answer)), torch.tensor(answer)].sum())


def test_pseudo_labels_keep_confident_choices(tiny_base, tmp_path):
    """Confidence = softmax over the choices' answer log-likelihoods; only those >= the threshold stay."""
    from moerge.data import Example, load_task
    from moerge.data.formats import MOERGE
    from moerge.data.prompts import answer_ids, prompt_ids
    from moerge.models import load_base
    from moerge.train.pseudo import pseudo_label

    model, tok = load_base(tiny_base)
    labelled = load_task(write_task(tmp_path / "parity.jsonl", parity_rows(10)))
    pool = [Example(f"Is {i} even? {'!' * i}", "") for i in range(12)]
    confidences = []
    for ex in pool:
        shown = Example(ex.input, "", ("yes", "no"))  # the pool gets the task's shared choices
        pairs = [(prompt_ids(tok, shown, MOERGE), answer_ids(tok, shown, c, MOERGE)) for c in ("yes", "no")]
        confidences.append(float(torch.softmax(torch.tensor([_logprob(model, p, a) for p, a in pairs]), 0).max()))
    threshold = sorted(confidences)[6]
    kept, stats = pseudo_label(model, tok, labelled, pool, confidence=threshold, fmt=MOERGE)
    assert [ex.input for ex in kept] == [ex.input for ex, c in zip(pool, confidences, strict=True) if c >= threshold]
    assert [ex.meta["confidence"] for ex in kept] == pytest.approx([c for c in confidences if c >= threshold], abs=1e-4)
    assert stats["pool"] == 12 and stats["kept"] == len(kept) == 6 and "pseudo_label_accuracy" not in stats
    assert all(ex.choices == ("yes", "no") for ex in kept)  # the task's shared choices were given to the pool

    top, stats = pseudo_label(model, tok, labelled, pool, confidence=0.0, keep_top=0.25, fmt=MOERGE)
    most_confident = sorted(range(12), key=lambda i: -confidences[i])[:3]
    assert sorted(ex.input for ex in top) == sorted(pool[i].input for i in most_confident)
    assert stats["kept"] == 3 and stats["keep_top"] == 0.25


def test_hft_stages_freeze_a_different_half_each(tiny_base, parity, tmp_path):
    meta = train_expert(
        _recipe(
            tiny_base, {"task": parity, "steps": 1, "method": "hft"}, {"task": parity, "steps": 1, "method": "hft"}
        ),
        tmp_path / "h",
        progress=False,
    )
    first, second = (s["hyperparameters"]["hft_frozen_layers"] for s in meta.stages)
    assert first != second and meta.kind == "full"
    assert json.loads((tmp_path / "h" / "moerge.json").read_text())["stages"][1]["hyperparameters"]["hft_seed"] == 1
