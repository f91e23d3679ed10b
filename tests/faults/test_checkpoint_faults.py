"""A checkpoint write that fails (a full disk) leaves no temp file and the previous checkpoint intact,
and is one line naming the checkpoint; what a killed run left is cleaned up by the next write."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import assert_refused, unchanged

from moerge.errors import MoergeError
from moerge.train import checkpoint
from moerge.train.checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint

HASH = "cfg-1"


def model_and_optimizer(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def state(step: int) -> TrainState:
    return TrainState(step=step, total_steps=10, config_hash=HASH, losses=[1.0] * step)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A work folder holding a good checkpoint of step 3."""
    folder = tmp_path / ".expert.work"
    model, optimizer = model_and_optimizer()
    save_checkpoint(folder, model, optimizer, state(3))
    return folder


def full_disk_at(monkeypatch, call: int) -> None:
    """The `call`-th safetensors write of a checkpoint fails as a full disk does."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == call:
            Path(filename).write_bytes(b"\0" * 100)  # the part that fitted
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def assert_step(workdir: Path, step: int) -> None:
    model, optimizer = model_and_optimizer(seed=1)
    assert load_checkpoint(workdir, model, optimizer, HASH).step == step


@pytest.mark.parametrize("call", [1, 2], ids=["weights", "optimizer"])
def test_full_disk_keeps_the_previous_checkpoint_and_no_temp(workdir, monkeypatch, call) -> None:
    full_disk_at(monkeypatch, call)
    model, optimizer = model_and_optimizer(seed=2)
    with unchanged(workdir), pytest.raises(MoergeError) as caught:
        save_checkpoint(workdir, model, optimizer, state(6))
    message = str(caught.value)
    assert message.startswith(f"{workdir / 'checkpoint'}: could not write the checkpoint (No space left")
    assert "previous checkpoint is kept" in message and "\n" not in message
    monkeypatch.undo()
    assert_step(workdir, 3)


def test_full_disk_while_writing_the_state_file_leaves_no_temp_file(workdir, monkeypatch) -> None:
    real = checkpoint.write_json_atomic

    def json_full_disk(path, data):
        if Path(path).name == checkpoint.STATE:
            Path(path).with_name(".state.json.x1y2.tmp").write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_json_atomic", json_full_disk)
    model, optimizer = model_and_optimizer(seed=2)
    with unchanged(workdir), pytest.raises(MoergeError, match="No space left on device"):
        save_checkpoint(workdir, model, optimizer, state(6))


def test_safetensors_own_disk_error_is_one_line_too(workdir, monkeypatch) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def rust_full_disk(tensors, filename, *args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", rust_full_disk)
    model, optimizer = model_and_optimizer(seed=2)
    with unchanged(workdir), pytest.raises(MoergeError, match=r"could not write the checkpoint.*StorageFull"):
        save_checkpoint(workdir, model, optimizer, state(6))


def test_interrupt_while_writing_removes_the_temp_and_stays_an_interrupt(workdir, monkeypatch) -> None:
    import safetensors.torch

    def ctrl_c(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", ctrl_c)
    model, optimizer = model_and_optimizer(seed=2)
    with unchanged(workdir), pytest.raises(KeyboardInterrupt):
        save_checkpoint(workdir, model, optimizer, state(6))


def test_a_killed_runs_half_written_checkpoint_is_ignored_and_removed(workdir) -> None:
    half = workdir / "checkpoint.tmp"
    half.mkdir()
    (half / checkpoint.PARAMS).write_bytes(b"\0" * 10)  # SIGKILL mid-write
    assert_step(workdir, 3)
    model, optimizer = model_and_optimizer(seed=2)
    save_checkpoint(workdir, model, optimizer, state(6))
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoint"]
    assert_step(workdir, 6)


def test_killed_between_the_renames_then_a_full_disk_keeps_the_checkpoint(workdir, monkeypatch) -> None:
    (workdir / "checkpoint").rename(workdir / "checkpoint.old")  # SIGKILL after the first rename
    assert has_checkpoint(workdir)
    full_disk_at(monkeypatch, 1)
    model, optimizer = model_and_optimizer(seed=2)
    with pytest.raises(MoergeError, match="No space left"):
        save_checkpoint(workdir, model, optimizer, state(6))
    monkeypatch.undo()
    assert has_checkpoint(workdir) and not (workdir / "checkpoint.tmp").exists()
    assert_step(workdir, 3)
    save_checkpoint(workdir, model, optimizer, state(6))
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoint"]
    assert_step(workdir, 6)


# A `moerge train` whose second checkpoint meets a full disk (the 3rd safetensors write of a checkpoint).
FULL_DISK_TRAIN = """
import errno, sys
import safetensors.torch as st

real, calls = st.save_file, []

def save_file(tensors, filename, *args, **kwargs):
    if "checkpoint.tmp" in str(filename):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
    return real(tensors, filename, *args, **kwargs)

st.save_file = save_file
sys.argv = ["moerge", *sys.argv[1:]]
from moerge.cli.main import run
run()
"""


def test_train_meeting_a_full_disk_at_a_checkpoint_then_resumes(tiny_base, parity_task, tmp_path) -> None:
    out = tmp_path / "expert"
    args = ["train", "--base", tiny_base, "--task", parity_task, "--method", "lora", "--rank", "2"]
    args += ["--steps", "4", "--checkpoint-every", "1", "--batch-size", "4", "--max-length", "48"]
    args += ["--eval-limit", "2", "--out", out]
    failed = subprocess.run(
        [sys.executable, "-c", FULL_DISK_TRAIN, *map(str, args)], capture_output=True, text=True, timeout=600
    )
    workdir = tmp_path / ".expert.work"
    assert_refused(failed, str(workdir / "checkpoint"), "No space left on device", "previous checkpoint is kept")
    assert not out.exists() and not (workdir / "checkpoint.tmp").exists()
    assert json.loads((workdir / "checkpoint" / checkpoint.STATE).read_text())["step"] == 1
    resumed = subprocess.run(
        [sys.executable, "-m", "moerge.cli", *map(str, args), "--resume"], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "moerge.json").is_file() and not workdir.exists()


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"step": 999}, "step: 999 is outside 0..10"),
        ({"step": -5}, "step: -5 is outside 0..10"),
        ({"step": "three"}, "step: Input should be a valid integer"),
        ({"losses": "high"}, "losses: Input should be a valid list"),
    ],
    ids=["step-past-the-end", "negative-step", "step-not-a-number", "losses-not-a-list"],
)
def test_a_hand_edited_state_file_is_refused_at_its_field(workdir, edit: dict, named: str) -> None:
    path = workdir / "checkpoint" / checkpoint.STATE
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    model, optimizer = model_and_optimizer(seed=1)
    with pytest.raises(MoergeError, match="^" + str(path)) as caught:
        load_checkpoint(workdir, model, optimizer, HASH)
    assert named in str(caught.value)
