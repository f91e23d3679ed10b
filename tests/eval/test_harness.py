"""moerge strategies inside lm-evaluation-harness: the registered `moerge` model and `moerge eval --harness`.

The two harnesses render prompts differently; the tests align them on purpose: the lm-eval task's
`doc_to_text` is `{{input}}` with lm-eval's default `target_delimiter` " ", which is exactly moerge's
`raw` prompt format (the input without a chat template, then " " + the choice, no end token). With the
same rows in one jsonl file, lm-eval's accuracy and per-choice log-likelihoods must equal `moerge eval`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the lm-eval extra)")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from helpers import addition_rows, write_jsonl  # noqa: E402
from moerge.cli.main import app  # noqa: E402
from moerge.data.formats import RAW  # noqa: E402
from moerge.data.loaders import load_task  # noqa: E402
from moerge.errors import MoergeError  # noqa: E402
from moerge.eval.evaluate import evaluate_task, generate_answers  # noqa: E402
from moerge.eval.harness import HarnessLM, cut_at_stop, summarize, task_manager  # noqa: E402
from moerge.recipes.harness import MoergeLM, resolve_strategy  # noqa: E402
from moerge.recipes.strategies import StrategySpec, Workspace, load_strategy  # noqa: E402

MC_TASK, GEN_TASK = "moerge_harness_mc", "moerge_harness_gen"
MC_ROWS = [
    {"input": f"Q{i}: is {i} even?", "target": "yes" if i % 2 == 0 else "no", "choices": ["yes", "no"]}
    for i in range(6)
] + [
    {"input": "Pick a colour", "target": "green", "choices": ["red", "green", "a deep blue"]},
    {"input": "x", "target": "b", "choices": ["a", "b", "c", "d"]},
    {"input": "A longer question, with a comma and more words in it?", "target": "no", "choices": ["yes", "no"]},
]
MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(target)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{input}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {until}
  max_gen_toks: {max_new}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def make_expert(base: Path, out: Path, seed: int) -> Path:
    """A random LoRA on the tiny base, recorded (moerge.json) as trained in the `raw` format."""
    from peft import LoraConfig, get_peft_model

    from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, write_expert_meta
    from moerge.models import load_base
    from moerge.models.loading import fingerprint

    model, _ = load_base(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    meta = ExpertMeta(
        name=out.name,
        method="lora",
        task=TaskInfo(name="t"),
        base=BaseInfo(name_or_path=str(base), fingerprint=fingerprint(base)),
        prompt_format=RAW,
    )
    write_expert_meta(out, meta)
    return out


@pytest.fixture(scope="module")
def north(tiny_base, work):
    """The `north` expert as `moerge eval --adapter` loads it."""
    return _loaded(tiny_base, "expert", work["north"])


@pytest.fixture(scope="module")
def north_rows(north, work) -> list[dict]:
    return _moerge_rows(north, work["data"])


@pytest.fixture(scope="module")
def work(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harness")
    tasks = root / "tasks"
    tasks.mkdir()
    data = write_jsonl(root / "mc.jsonl", [{**r, "split": "test"} for r in MC_ROWS])
    (tasks / "mc.yaml").write_text(MC_YAML.format(name=MC_TASK, data=data))
    return {
        "root": root,
        "tasks": tasks,
        "data": data,
        "north": make_expert(tiny_base, root / "north", seed=1),
        "south": make_expert(tiny_base, root / "south", seed=2),
    }


def _moerge_rows(loaded, data: Path) -> list[dict]:
    """`moerge eval`'s rank classification of the rows, in the `raw` format."""
    result = evaluate_task(
        loaded.model,
        loaded.tokenizer,
        load_task(str(data)),
        fmt=RAW,
        batch_size=4,
        progress=False,
        keep_predictions=True,
    )
    return result["predictions"]


def _lm_eval(model, model_args, tasks: list[str], folder: Path, **kw) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=task_manager(tasks, folder), **kw
    )


def _sample_logliks(results: dict, task: str) -> list[list[float]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def _flat(rows) -> list[float]:
    """[[a, b], [c]] or [(logprob, greedy), ...] → the numbers in order (greedy flags as 0/1)."""
    return [float(x) for row in rows for x in row]


def _loaded(tiny_base, kind: str, path: Path | None = None):
    spec = StrategySpec.model_validate({"kind": kind, **({"path": str(path)} if path else {})})
    return load_strategy(spec, Workspace(base=str(tiny_base)))


def test_registered_model_scores_multiple_choice_like_moerge_eval(tiny_base, work, north_rows):
    args = f"base={tiny_base},strategy={work['north']},batch_size=3"  # lm-eval's --model_args string
    results = _lm_eval("moerge", args, [MC_TASK], work["tasks"], log_samples=True)
    rows = north_rows
    logliks = _sample_logliks(results, MC_TASK)
    assert len(logliks) == len(rows) == len(MC_ROWS)
    for row, ll in zip(rows, logliks, strict=True):
        assert ll == pytest.approx(row["choice_logprobs"], abs=1e-4)
        assert len(set(row["choice_logprobs"])) == len(ll)  # the choices really score differently
    accuracy = sum(r["score"] for r in rows) / len(rows)
    assert results["results"][MC_TASK]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    assert summarize(results)[MC_TASK] == {
        "acc": results["results"][MC_TASK]["acc,none"],
        "acc_stderr": results["results"][MC_TASK]["acc_stderr,none"],
        "n": len(MC_ROWS),
    }


def test_loglikelihood_equals_lm_evals_own_hf_model(tiny_base, work):
    """Neutral: on the base model the wrapper's numbers are lm-eval's HFLM's, request by request."""
    from lm_eval.models.huggingface import HFLM

    requests = [
        Instance("loglikelihood", {}, (ctx, cont), i)
        for i, (ctx, cont) in enumerate([("Is 4 even?", " yes"), ("Is 4 even? ", "no"), ("", "hello"), ("a", " b c")])
    ]
    ours = MoergeLM(base=str(tiny_base), batch_size=2).loglikelihood(requests)
    reference = HFLM(pretrained=str(tiny_base), batch_size=2, device="cpu", dtype="float32").loglikelihood(requests)
    assert [g for _, g in ours] == [g for _, g in reference]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in reference], abs=1e-4)


def test_router_folder_and_library_strategies(tiny_base, work, tmp_path):
    """A router decides on the context, as under `moerge eval`; a library expert is its folder's model."""
    from moerge.library import ExpertLibrary
    from moerge.route import build_router

    experts = {name: work[name] for name in ("north", "south")}
    router = build_router("arrow", experts, tmp_path / "arrow", base=str(tiny_base), policy={"name": "top_k", "k": 1})
    results = _lm_eval(
        "moerge", {"base": str(tiny_base), "strategy": str(router)}, [MC_TASK], work["tasks"], log_samples=True
    )
    rows = _moerge_rows(_loaded(tiny_base, "router", router), work["data"])
    expected = [r["choice_logprobs"] for r in rows]
    assert _flat(_sample_logliks(results, MC_TASK)) == pytest.approx(_flat(expected), abs=1e-4)

    library = ExpertLibrary.create(tmp_path / "lib")
    library.add(work["south"], name="south")
    from_library = MoergeLM(base=str(tiny_base), strategy="library:south", library=str(tmp_path / "lib"))
    from_folder = MoergeLM(base=str(tiny_base), strategy=str(work["south"]))
    requests = [Instance("loglikelihood", {}, ("Is 4 even?", " yes"), 0)]
    assert _flat(from_library.loglikelihood(requests)) == pytest.approx(_flat(from_folder.loglikelihood(requests)))


def test_merge_yaml_strategy_merges_without_writing_its_output(tiny_base, work, tmp_path):
    from moerge.merge.config import load_merge_spec
    from moerge.merge.run import run_merge

    spec = tmp_path / "merge.yaml"
    spec.write_text(
        f"method: task_arithmetic\nexperts:\n  - {{path: {work['north']}, weight: 0.7}}\n"
        f"  - {{path: {work['south']}, weight: 0.3}}\noutput: {{kind: adapter, out: {tmp_path / 'never'}}}\n"
    )
    merged = MoergeLM(base=str(tiny_base), strategy=str(spec))
    assert not (tmp_path / "never").exists()
    reference = run_merge(load_merge_spec(spec, {"output": {"out": str(tmp_path / "ref")}})).path
    direct = MoergeLM(base=str(tiny_base), strategy=str(reference))
    requests = [Instance("loglikelihood", {}, (r["input"], " " + r["target"]), i) for i, r in enumerate(MC_ROWS)]
    plain = _flat(MoergeLM(base=str(tiny_base)).loglikelihood(requests))
    assert _flat(merged.loglikelihood(requests)) == pytest.approx(_flat(direct.loglikelihood(requests)), abs=1e-5)
    assert _flat(merged.loglikelihood(requests)) != pytest.approx(plain, abs=1e-3)  # the merge changed the model


def test_generate_until_equals_moerge_greedy_generation(tiny_base, work, north, tmp_path):
    rows = [{**r, "split": "test"} for r in addition_rows(5)]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    loaded = north
    examples = load_task(str(data)).test
    answers = generate_answers(
        loaded.model, loaded.tokenizer, examples, fmt=RAW, batch_size=5, max_new_tokens=6, progress=False
    )
    assert any(answers)
    stop = next(a[2] for a in answers if len(a) > 3)  # a character some answer has after its start: cuts it
    (tmp_path / "tasks").mkdir()
    yaml = GEN_YAML.format(name=GEN_TASK, data=data, until=json.dumps([stop]), max_new=6)
    (tmp_path / "tasks" / "gen.yaml").write_text(yaml)
    args = {"base": str(tiny_base), "strategy": str(work["north"]), "batch_size": 5}
    results = _lm_eval("moerge", args, [GEN_TASK], tmp_path / "tasks", log_samples=True)
    outputs = [s["resps"][0][0] for s in sorted(results["samples"][GEN_TASK], key=lambda s: s["doc_id"])]
    assert outputs == [cut_at_stop(a, [stop]) for a in answers]
    assert outputs != answers  # the stop string cut at least one answer


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i ≥ 1, from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(north):
    model, tok = north.model, north.tokenizer
    text = "The quick brown fox jumps over the lazy dog, twice."
    ids = tok.encode(text, add_special_tokens=False)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]

    whole = HarnessLM(model, tok, batch_size=3).loglikelihood_rolling(request)[0]
    assert whole == pytest.approx(float(_direct_logprobs(model, [prefix, *ids]).sum()), abs=1e-4)

    # windows of 8 tokens, each token predicted once: the first window from the prefix, each later one
    # from the 8 tokens before its last token (lm-eval's rolling windows, written out)
    width = done = 8
    expected = float(_direct_logprobs(model, [prefix, *ids[:width]]).sum())
    while done < len(ids):
        end = min(done + width, len(ids))
        window = ids[end - width - 1 : end]
        expected += float(_direct_logprobs(model, window)[-(end - done) :].sum())
        done = end
    assert len(ids) > 3 * width
    windowed = HarnessLM(model, tok, batch_size=2, max_length=width).loglikelihood_rolling(request)[0]
    assert windowed == pytest.approx(expected, abs=1e-4)
    assert windowed != pytest.approx(whole, abs=1e-3)  # shorter contexts: a different, honest number


def test_moerge_eval_harness_lm_eval_prints_moerge_json(tiny_base, work, north_rows):
    """The same first 5 rows through both harnesses from the command line: the same accuracy."""
    runner = CliRunner()
    common = ["eval", "--base", str(tiny_base), "--adapter", str(work["north"]), "--limit", "5", "--json"]
    ours = runner.invoke(app, [*common, "--task", str(work["data"]), "--prompt-format", "raw"])
    assert ours.exit_code == 0, ours.output
    theirs = runner.invoke(
        app, [*common, "--harness", "lm-eval", "--tasks", MC_TASK, "--include-path", str(work["tasks"])]
    )
    assert theirs.exit_code == 0, theirs.output
    moerge_json, harness_json = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert harness_json["harness"] == "lm-eval" and harness_json["adapter"] == str(work["north"])
    assert set(harness_json["tasks"]) == {MC_TASK}
    assert harness_json["tasks"][MC_TASK]["n"] == moerge_json["n"] == 5
    assert harness_json["tasks"][MC_TASK]["acc"] == pytest.approx(moerge_json["accuracy"], abs=1e-12)
    assert moerge_json["accuracy"] == sum(r["score"] for r in north_rows[:5]) / 5


def test_bad_harness_arguments_are_one_line_errors(tiny_base, work, tmp_path):
    runner = CliRunner()
    base = ["eval", "--base", str(tmp_path / "no_such_model")]
    cases = {
        "--harness": [*base, "--harness", "helm", "--tasks", MC_TASK],
        "--task": [*base, "--harness", "lm-eval", "--task", str(work["data"]), "--tasks", MC_TASK],
        "--tasks": [*base, "--task", str(work["data"]), "--tasks", MC_TASK],
        "--prompt-format": [*base, "--harness", "lm-eval", "--tasks", MC_TASK, "--prompt-format", "raw"],
    }
    for flag, args in cases.items():  # refused before any model loads (the base path is never read)
        result = runner.invoke(app, args)
        assert isinstance(result.exception, MoergeError), (flag, result.output)
        assert str(result.exception).startswith(f"{flag}:")

    with pytest.raises(MoergeError, match="library=PATH"):
        resolve_strategy("library:north", None)
    with pytest.raises(MoergeError, match="is not base"):
        resolve_strategy(str(tmp_path / "missing"), None)
    with pytest.raises(MoergeError, match="unknown argument 'pretrained'"):
        MoergeLM(base=str(tiny_base), pretrained="x")
    assert resolve_strategy(None, None) == ("base", None)
    assert resolve_strategy(str(work["north"]), None) == ("expert", str(work["north"]))
