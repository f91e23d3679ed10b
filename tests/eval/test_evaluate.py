import pytest
import torch

from moerge.data.formats import MOERGE
from moerge.data.prompts import answer_ids, prompt_ids
from moerge.data.task import Example, Task
from moerge.eval.evaluate import choice_logprobs, evaluate_task, generate_answers
from moerge.models import load_base


def _naive_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """Independent reference: one unpadded forward over prompt + answer."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logprobs[len(prompt) - 1 + i, tok] for i, tok in enumerate(answer)))


@pytest.fixture(scope="module")
def model_and_tok(tiny_base):
    return load_base(tiny_base)


EXAMPLES = [
    Example("Is the sky blue?", "yes", ("yes", "no")),
    Example("Pick a colour for grass, please, a longer prompt here", "green", ("red", "green", "a deep blue")),
    Example("x", "b", ("a", "b", "c", "d")),
]


def test_shared_prompt_scores_equal_full_sequence_scores(model_and_tok):
    model, tok = model_and_tok
    got = choice_logprobs(model, tok, EXAMPLES, fmt=MOERGE, batch_size=3)
    for ex, scores in zip(EXAMPLES, got, strict=True):
        expected = [
            _naive_logprob(model, prompt_ids(tok, ex, MOERGE), answer_ids(tok, ex, c, MOERGE)) for c in ex.choices
        ]
        assert scores == pytest.approx(expected, abs=1e-4)


def test_rank_classification_picks_the_most_likely_choice(model_and_tok):
    model, tok = model_and_tok
    scores = choice_logprobs(model, tok, EXAMPLES, fmt=MOERGE, batch_size=2)
    task = Task("t", "t", train=[], validation=[], test=EXAMPLES)
    result = evaluate_task(model, tok, task, fmt=MOERGE, progress=False)
    expected = [float(ex.choices[s.index(max(s))] == ex.target) for ex, s in zip(EXAMPLES, scores, strict=True)]
    assert result["scores"] == expected and result["mode"] == "rank_classification" and result["n"] == 3


def test_generation_is_batch_independent(model_and_tok):
    model, tok = model_and_tok
    examples = [Example("1+1=", "2"), Example("a much longer question than the first one?", "x")]
    batched = generate_answers(model, tok, examples, fmt=MOERGE, batch_size=2, max_new_tokens=5, progress=False)
    single = [
        generate_answers(model, tok, [ex], fmt=MOERGE, batch_size=1, max_new_tokens=5, progress=False)[0]
        for ex in examples
    ]
    assert batched == single


def test_generation_scored_by_task_scorer(model_and_tok):
    model, tok = model_and_tok
    examples = [Example("1+1=", "2"), Example("2+2=", "4")]
    answers = generate_answers(model, tok, examples, fmt=MOERGE, batch_size=2, max_new_tokens=4, progress=False)
    task = Task("t", "t", [], [], examples, scorer=lambda pred, ex: float(pred == answers[examples.index(ex)]))
    assert evaluate_task(model, tok, task, fmt=MOERGE, max_new_tokens=4, progress=False)["accuracy"] == 1.0
