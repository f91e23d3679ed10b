import math

import torch

from moerge.data.task import Example
from moerge.eval.forgetting import probe_texts, text_loss
from moerge.models import load_base


def test_text_loss_equals_unpadded_cross_entropy(tiny_base):
    model, tok = load_base(tiny_base)
    texts = ["hello there, general kenobi", "a" * 3, "short"]
    got = text_loss(model, tok, texts, batch_size=2)
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
        total, count = total + float(nll), count + ids.shape[1] - 1
    assert math.isclose(got, total / count, rel_tol=1e-4)


def test_probe_texts_join_question_and_answer():
    assert probe_texts([Example(" Q? ", "A ")]) == ["Q?\nA"]
