"""An adapter trained with plain peft (not moerge) on the `plain` prompt format, imported with its
format, scores in `moerge eval` exactly what its own script says — and measurably worse when asked in
moerge's format, which `moerge eval` warns about."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_tiny_base, write_jsonl
from moerge.cli.main import app
from moerge.library import ExpertLibrary

runner = CliRunner()
STEPS = 40


def _ids(rendered) -> list[int]:
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


class PlainScript:
    """What a user's own peft script does: the chat template around the bare input, the answer as the
    assistant turn (its end-of-turn token included), log-likelihood rank classification."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def prompt(self, text: str) -> list[int]:
        turn = [{"role": "user", "content": text}]
        return _ids(self.tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True))

    def answer(self, text: str, answer: str) -> list[int]:
        turns = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        tail = _ids(self.tok.apply_chat_template(turns, tokenize=True))[len(self.prompt(text)) :]
        return tail[: tail.index(self.tok.eos_token_id) + 1]

    def train(self, model, rows: list[dict]) -> None:
        pairs = [(self.prompt(r["input"]), self.answer(r["input"], r["target"])) for r in rows]
        width = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), width), self.tok.pad_token_id)
        labels = torch.full((len(pairs), width), -100)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (p, a) in enumerate(pairs):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
            mask[i, : len(p) + len(a)] = 1
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(STEPS):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def accuracy(self, model, rows: list[dict]) -> float:
        right = 0
        for row in rows:
            prompt = self.prompt(row["input"])
            scores = []
            for choice in row["choices"]:
                answer = self.answer(row["input"], choice)
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), -1)
                scores.append(sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)))
            right += row["choices"][scores.index(max(scores))] == row["target"]
        return right / len(rows)


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory):
    """(base, task file, adapter folder, the script's own accuracy) for a memorised yes/no task."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("plain")
    base = make_tiny_base(folder / "base", init_std=0.2)
    rng = random.Random(0)
    rows = [
        {"input": "".join(rng.choice("abcdefgh") for _ in range(3)), "target": rng.choice(["yes", "no"])}
        for _ in range(16)
    ]
    rows = [{**r, "choices": ["yes", "no"]} for r in rows]
    task = write_jsonl(folder / "memo.jsonl", [{**r, "split": s} for s in ("train", "test") for r in rows])
    torch.manual_seed(0)
    script = PlainScript(AutoTokenizer.from_pretrained(base))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    )
    script.train(model, rows)
    model.eval()
    own = script.accuracy(model, rows)
    model.save_pretrained(folder / "adapter")
    majority = max(sum(r["target"] == c for r in rows) for c in ("yes", "no")) / len(rows)
    assert own >= majority + 0.25, f"the script's adapter did not learn the task ({own} vs majority {majority})"
    return base, task, folder / "adapter", own


def _import(library: Path, adapter: Path, base: Path, name: str, *fmt: str) -> Path:
    if not library.exists():
        assert runner.invoke(app, ["library", "create", str(library)]).exit_code == 0
    args = ["library", "import-peft", str(library), str(adapter), "--task", "memo", "--base", str(base)]
    result = runner.invoke(app, [*args, "--name", name, *fmt])
    assert result.exit_code == 0, result.output
    return Path(ExpertLibrary(str(library)).path(name))


def _eval(base: Path, expert: Path, task: str, *extra: str):
    args = ["eval", "--base", str(base), "--adapter", str(expert), "--task", task, "--split", "test", "--json"]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_imported_plain_adapter_scores_what_its_script_says(plain_adapter, tmp_path):
    base, task, adapter, own = plain_adapter
    expert = _import(tmp_path / "lib", adapter, base, "memo-plain", "--prompt-format", "plain")
    assert json.loads((expert / "moerge.json").read_text())["prompt_format"]["name"] == "plain"

    metrics, warnings = _eval(base, expert, task)
    assert metrics["prompt_format"] == "plain" and metrics["n"] == 16
    assert metrics["accuracy"] == pytest.approx(own)
    assert warnings == ""

    asked_wrongly, warnings = _eval(base, expert, task, "--prompt-format", "moerge")
    assert asked_wrongly["prompt_format"] == "moerge"
    assert asked_wrongly["accuracy"] <= own - 0.25
    assert warnings.strip() == "warning: trained with prompt format 'plain', scored in 'moerge'"


def test_adapter_imported_without_a_format_is_unknown_and_warned_about(plain_adapter, tmp_path):
    base, task, adapter, own = plain_adapter
    expert = _import(tmp_path / "lib", adapter, base, "memo")
    assert json.loads((expert / "moerge.json").read_text())["prompt_format"] == "unknown"
    metrics, warnings = _eval(base, expert, task)
    assert metrics["prompt_format"] == "moerge" and metrics["accuracy"] <= own - 0.25
    assert "prompt format of the expert is unknown" in warnings
    metrics, _ = _eval(base, expert, task, "--prompt-format", "plain")
    assert metrics["accuracy"] == pytest.approx(own)
