"""Answer-only logits give the same loss and gradients as the full logits, with and without peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import make_tiny_base
from moerge.data.prompts import IGNORE_INDEX
from moerge.models.logits import answer_loss, answer_token_nll, forward_at


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("base"))


def _batch(vocab: int):
    """Right-padded rows whose labelled answers sit at different positions, one row unlabelled."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:8] = ids[0, 5:8]
    labels[1, 7:9] = ids[1, 7:9]
    return ids, mask, labels


def _full_loss(model, ids, mask, labels) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("wrap", ["plain", "lora"])
def test_answer_loss_and_gradients_match_full_logits(tiny, wrap):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask, labels = _batch(model.config.vocab_size)

    expected = _full_loss(model, ids, mask, labels)
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    got = answer_loss(model, ids, mask, labels)
    got.backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert reference, "some parameter must get a gradient"
    for name, grad in reference.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name


def test_answer_token_nll_keeps_only_labelled_positions(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    ids, mask, labels = _batch(model.config.vocab_size)
    nll, counted = answer_token_nll(model, ids, mask, labels)
    # positions predicting a label: row 0 → 4,5,6; row 1 → 6,7  ⇒ union 4..7
    assert nll.shape == (3, 4)
    assert counted.sum() == 5 and not counted[2].any()
    assert (nll[~counted] == 0).all()


def test_forward_at_slices_like_the_full_logits_when_the_model_cannot(tiny, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    ids, mask, _ = _batch(model.config.vocab_size)
    full = model(input_ids=ids, attention_mask=mask).logits
    keep = torch.tensor([2, 7])
    assert torch.allclose(forward_at(model, keep, input_ids=ids, attention_mask=mask).logits, full[:, keep], atol=1e-6)
    assert torch.allclose(forward_at(model, 1, input_ids=ids, attention_mask=mask).logits, full[:, -1:], atol=1e-6)

    monkeypatch.setattr("moerge.models.logits.forward_accepts", lambda model, keyword: False)
    assert torch.allclose(forward_at(model, keep, input_ids=ids, attention_mask=mask).logits, full[:, keep], atol=1e-6)
    assert torch.allclose(forward_at(model, 1, input_ids=ids, attention_mask=mask).logits, full[:, -1:], atol=1e-6)


def test_a_batch_without_labels_gives_zero_loss_and_can_step(tiny):
    """Answers cut off by max_length leave nothing to learn: no crash, no NaN."""
    model = AutoModelForCausalLM.from_pretrained(tiny)
    ids, mask, labels = _batch(model.config.vocab_size)
    loss = answer_loss(model, ids, mask, torch.full_like(labels, IGNORE_INDEX))
    loss.backward()
    assert float(loss) == 0.0
