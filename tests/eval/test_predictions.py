"""Per-example predictions from evaluate_task: what the model read, answered and scored, per example,
checked against independent one-example computations (and, for a routed model, `route explain`)."""

from pathlib import Path

import pytest
import torch

from moerge.data.formats import MOERGE
from moerge.data.prompts import answer_ids, prompt_ids
from moerge.data.task import Example, Task
from moerge.eval.evaluate import evaluate_task, generate_answers
from moerge.models import load_base

CHOICE_EXAMPLES = [
    Example("Is the sky blue?", "yes", ("yes", "no")),
    Example("Pick a colour for grass, please, a longer prompt here", "green", ("red", "green", "a deep blue")),
    Example("x", "b", ("a", "b", "c", "d"), meta={"id": "item-7"}),
]


@pytest.fixture(scope="module")
def model_and_tok(tiny_base):
    return load_base(tiny_base)


def _naive_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """One unpadded forward over prompt + answer: log p(answer | prompt)."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logprobs[len(prompt) - 1 + i, tok] for i, tok in enumerate(answer)))


def test_rank_classification_rows(model_and_tok):
    model, tok = model_and_tok
    task = Task("t", "t", train=[], validation=[], test=CHOICE_EXAMPLES)
    result = evaluate_task(model, tok, task, fmt=MOERGE, batch_size=2, progress=False, keep_predictions=True)
    rows = result["predictions"]
    assert len(rows) == 3
    for i, (ex, row) in enumerate(zip(CHOICE_EXAMPLES, rows, strict=True)):
        expected = [
            _naive_logprob(model, prompt_ids(tok, ex, MOERGE), answer_ids(tok, ex, c, MOERGE)) for c in ex.choices
        ]
        best = ex.choices[expected.index(max(expected))]
        assert row["index"] == i and row["input"] == ex.input and row["target"] == ex.target
        assert row["prompt"] == tok.decode(prompt_ids(tok, ex, MOERGE))  # the exact text the model read
        assert row["choices"] == list(ex.choices)
        assert row["choice_logprobs"] == pytest.approx(expected, abs=1e-4)
        assert row["chosen"] == best
        assert row["correct"] is (best == ex.target) and row["score"] == float(best == ex.target)
        assert "output" not in row and "experts" not in row  # not generated; not routed
    assert [r["id"] for r in rows] == [0, 1, "item-7"]  # the example's own id when it has one
    assert [r["score"] for r in rows] == result["scores"]


def test_generation_rows(model_and_tok):
    model, tok = model_and_tok
    examples = [Example("1+1=", "2"), Example("a much longer question than the first one?", "x")]
    answers = generate_answers(model, tok, examples, fmt=MOERGE, batch_size=1, max_new_tokens=4, progress=False)
    # the scorer calls the first example's answer right, whatever it is, so both outcomes are covered
    task = Task("t", "t", [], [], examples, scorer=lambda pred, ex: float(ex is examples[0] and pred == answers[0]))
    result = evaluate_task(model, tok, task, fmt=MOERGE, max_new_tokens=4, progress=False, keep_predictions=True)
    rows = result["predictions"]
    assert [r["output"] for r in rows] == answers
    assert [(r["score"], r["correct"]) for r in rows] == [(1.0, True), (0.0, False)]
    assert all("choices" not in r and "chosen" not in r for r in rows)


def test_predictions_only_when_asked(model_and_tok):
    model, tok = model_and_tok
    task = Task("t", "t", train=[], validation=[], test=CHOICE_EXAMPLES)
    assert "predictions" not in evaluate_task(model, tok, task, fmt=MOERGE, progress=False)


def _expert(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def test_routed_rows_name_the_experts_route_explain_sees(tiny_base, tmp_path):
    from moerge.route import build_router, load_routed
    from moerge.route.explain import explain_routing

    experts = {name: _expert(tiny_base, tmp_path / name, seed) for seed, name in enumerate(["north", "south", "east"])}
    model, tok = load_base(tiny_base)
    folder = build_router("arrow", experts, tmp_path / "arrow", base=model, policy={"name": "top_k", "k": 2})
    routed = load_routed(model, folder)
    task = Task("t", "t", train=[], validation=[], test=CHOICE_EXAMPLES)
    rows = evaluate_task(routed, tok, task, fmt=MOERGE, batch_size=2, progress=False, keep_predictions=True)[
        "predictions"
    ]
    names = routed.moerge_routing.expert_names
    for ex, row in zip(CHOICE_EXAMPLES, rows, strict=True):
        # the reference: route explain on this example alone (its mean weight per expert over tokens and layers)
        overall = explain_routing(routed, tok, {"t": [ex]}, {"t": MOERGE})["t"]["overall"]
        expected = {n: w for n, w in zip(names, overall, strict=True) if round(w, 4) > 0}
        assert set(row["experts"]) == set(expected)
        assert row["experts"] == pytest.approx(expected, abs=2e-4)
        assert list(row["experts"].values()) == sorted(row["experts"].values(), reverse=True)  # heaviest first
        assert sum(row["experts"].values()) == pytest.approx(1.0, abs=1e-3)
