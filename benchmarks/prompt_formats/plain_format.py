"""The "plain" prompt format, written independently of moerge (no moerge import).

user turn = the example's input only; no system message (the chat template's default applies);
prompt = chat template with add_generation_prompt; answer(A) = the assistant turn's tokens up to and
including the first eos (<|im_end|>), i.e. without the template's trailing newline.
Scoring = rank classification: sum of log p(answer(choice) | prompt), argmax over choices.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


def _ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_ids(tok, text: str) -> list[int]:
    return _ids(tok.apply_chat_template(messages(text), add_generation_prompt=True, tokenize=True))


def answer_ids(tok, text: str, answer: str, prompt: list[int] | None = None) -> list[int]:
    prompt = prompt_ids(tok, text) if prompt is None else prompt
    full = _ids(tok.apply_chat_template([*messages(text), {"role": "assistant", "content": answer}], tokenize=True))
    assert full[: len(prompt)] == prompt, "chat template: prompt is not a prefix of prompt+answer"
    tail = full[len(prompt) :]
    eos = tok.eos_token_id
    assert eos in tail, "no eos in the answer tail"
    return tail[: tail.index(eos) + 1]


@torch.no_grad()
def choice_logprobs(model, tok, text: str, choices: list[str]) -> list[float]:
    """sum_t log p(answer(choice)_t | prompt, answer(choice)_<t) for each choice.

    The prompt runs once; its KV cache is repeated over the choices, whose answers run as one
    right-padded batch (padding comes after every real token, so it never changes their logits).
    """
    prompt = prompt_ids(tok, text)
    answers = [answer_ids(tok, text, c, prompt) for c in choices]
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache = out.cache
    cache.batch_repeat_interleave(len(answers))
    width = max(len(a) for a in answers)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([a + [pad] * (width - len(a)) for a in answers])
    mask = torch.tensor([[1] * len(prompt) + [1] * len(a) + [0] * (width - len(a)) for a in answers])
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, cache=cache).logits.float(), dim=-1)
    scores = []
    for i, a in enumerate(answers):
        s = first[a[0]].item()
        for j in range(1, len(a)):
            s += lp[i, j - 1, a[j]].item()
        scores.append(s)
    return scores


@torch.no_grad()
def score_rows(model, tok, rows: list[dict]) -> dict:
    """Rank classification over each row's choices. Returns accuracy, n, per-example predictions."""
    model.eval()
    preds, logps = [], []
    for row in rows:
        scores = choice_logprobs(model, tok, row["input"], row["choices"])
        logps.append(scores)
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    gold = [row["choices"].index(row["target"]) for row in rows]
    correct = [int(p == g) for p, g in zip(preds, gold, strict=False)]
    return {
        "accuracy": sum(correct) / len(rows),
        "n": len(rows),
        "predicted": preds,
        "gold": gold,
        "logprobs": logps,
    }
