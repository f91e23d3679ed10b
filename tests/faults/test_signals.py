"""Signals at chosen points of `train`, `merge`, `compare` and `library add`.

What each signal must leave: SIGINT is the line `interrupted` and status 130, SIGTERM `terminated` and
143, both after the command's cleanup ran (no temp folder left, the output never half-exists, no
traceback); SIGKILL leaves no chance to clean up, but still the old state or the new one, and a rerun
(`--resume` for training) finishes the job with the same result an uninterrupted run gives.

Each command runs as a real process of its own. So that a dozen of them fit in a test run, they are
forked from a warm launcher that has imported torch, transformers, peft and the moerge CLI once, and
then call the entry point's `run()` as `python -m moerge.cli` does (test_library_faults.py signals
fresh `python -m moerge.cli` processes). A kill never depends on timing: the launcher can pause a
command after (or before) the Nth call of a function — for instance right after the second
checkpoint was saved — and create a marker file there; the test polls for the marker, then sends
the signal.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from faultkit import snapshot, unchanged

from helpers import addition_rows, parity_rows, write_task

SIGINT, SIGTERM, SIGKILL = signal.SIGINT, signal.SIGTERM, signal.SIGKILL
STOPPED = {SIGINT: (130, "interrupted"), SIGTERM: (143, "terminated"), SIGKILL: (-SIGKILL, None)}

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""Tiny models on a busy 2-core machine: torch's thread pool spinning against other processes makes
a step 20x slower than one thread does."""

# ---- the warm launcher -------------------------------------------------------------------------------

LAUNCHER = r"""
import importlib, json, os, signal, sys, time, traceback

os.environ["OMP_NUM_THREADS"] = "1"
import torch, transformers, peft  # noqa: F401  what the commands import lazily, paid for once
torch.set_num_threads(1)
import moerge.cli.main, moerge.recipes.train, moerge.recipes.compare, moerge.merge.run  # noqa: F401
import moerge.library.library, moerge.eval.evaluate  # noqa: F401


def hook(spec):
    module, _, attr = spec["target"].partition(":")
    owner = importlib.import_module(module)
    *parents, name = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real, calls = getattr(owner, name), [0]

    def pause():
        open(spec["marker"], "w").close()
        time.sleep(300)  # the test sends its signal now

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if "log" in spec:
            with open(spec["log"], "a") as fh:
                fh.write(f"{calls[0]}\n")
        if calls[0] == spec.get("call") and spec.get("when") == "before":
            pause()
        result = real(*args, **kwargs)
        if calls[0] == spec.get("call") and spec.get("when") == "after":
            pause()
        return result

    setattr(owner, name, wrapper)


def child(request):
    # As in a terminal, whatever the test run inherited (a background job ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for spec in request["hooks"]:
        hook(spec)
    sys.argv = ["moerge", *request["args"]]
    from moerge.cli.main import run

    run()


for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(request)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Launcher:
    """The warm process; one command at a time."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def start(self, args: list, *, cwd: Path, hooks: Sequence[dict] = (), env: dict | None = None) -> Command:
        self.count += 1
        stderr = self.workdir / f"stderr-{self.count}.txt"
        request = {
            "stdout": str(self.workdir / f"stdout-{self.count}.txt"),
            "args": [str(a) for a in args],
            "cwd": str(cwd),
            "env": {**os.environ, **ONE_THREAD, **(env or {})},
            "stderr": str(stderr),
            "hooks": list(hooks),
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), f"the launcher died: {line!r}"
        return Command(self, int(line), stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Command:
    launcher: Launcher
    pid: int
    stderr_path: Path
    returncode: int | None = None

    def poll(self) -> int | None:
        out = self.launcher.proc.stdout
        if self.returncode is None and select.select([out], [], [], 0)[0]:
            self.returncode = int(out.readline())
        return self.returncode

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, SIGKILL)
                self.returncode = int(self.launcher.proc.stdout.readline())
                raise AssertionError(f"command {self.pid} ran past {timeout}s: {self.stderr()}")
            select.select([self.launcher.proc.stdout], [], [], 0.5)
        stdout = self.stderr_path.with_name(self.stderr_path.name.replace("stderr", "stdout"))
        return subprocess.CompletedProcess([], self.returncode, stdout.read_text(errors="replace"), self.stderr())

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


_shared: list[Launcher] = []


def shared_launcher(request: pytest.FixtureRequest) -> Launcher:
    """One warm launcher for the whole test session (test_disk_faults.py uses it too)."""
    if not _shared:
        warm = Launcher(request.getfixturevalue("tmp_path_factory").mktemp("launcher"))
        _shared.append(warm)
        request.config.add_cleanup(warm.close)
    return _shared[0]


@pytest.fixture(scope="module")
def launcher(request) -> Launcher:
    return shared_launcher(request)


def pause(target: str, call: int = 1, when: str = "after") -> dict:
    """A hook: the command pauses at the `call`th call of `target` ("module:name" or "module:Class.name")."""
    return {"target": target, "call": call, "when": when}


def moerge_ok(launcher: Launcher, *args, cwd: Path, hooks: Sequence[dict] = ()) -> str:
    """Run `moerge ARGS` to the end, expecting success; its stdout."""
    result = launcher.start(list(args), cwd=cwd, hooks=hooks).wait()
    assert result.returncode == 0, result.stderr
    return result.stdout


def stop_at(launcher: Launcher, args: list, hook: dict, sig: int, *, cwd: Path) -> subprocess.CompletedProcess:
    """Run `moerge ARGS`, wait until it pauses where `hook` says, send `sig`; the finished process."""
    marker = launcher.workdir / f"paused-{launcher.count + 1}"
    command = launcher.start(args, cwd=cwd, hooks=[{**hook, "marker": str(marker)}])
    deadline = time.monotonic() + 300
    while not marker.exists() and command.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert command.poll() is None, f"finished before reaching {hook['target']}: {command.stderr()}"
    os.kill(command.pid, sig)
    return command.wait()


def assert_stopped(result: subprocess.CompletedProcess, sig: int, *, only_line: bool = True) -> None:
    """SIGINT/SIGTERM: 130/143, no traceback, the last line says so (the only one, unless the command
    reports progress on stderr). SIGKILL: killed, nothing said."""
    status, word = STOPPED[sig]
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    if word is not None:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        assert lines and lines[-1] == word, result.stderr
        assert not only_line or len(lines) == 1, result.stderr


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- train: stop, then --resume gives the expert an uninterrupted run gives -------------------------------

STEPS = 8


def train_args(tiny_base: Path, task: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--base", tiny_base, "--task", task, "--rank", "2", "--steps", STEPS, "--batch-size", "4",
        "--max-length", "48", "--lr", "0.01", "--checkpoint-every", "1", "--eval-limit", "2", "--out", out, *extra,
    ]  # fmt: skip


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_tensors(got: dict, want: dict) -> None:
    import torch

    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def reference_expert(launcher, tiny_base, parity_task, tmp_path_factory) -> dict:
    """The adapter an uninterrupted run writes."""
    folder = tmp_path_factory.mktemp("reference")
    moerge_ok(launcher, *train_args(tiny_base, parity_task, folder / "expert"), cwd=folder)
    return adapter_tensors(folder / "expert")


def _resume_and_compare(launcher, tiny_base, parity_task, folder: Path, reference: dict) -> None:
    out = folder / "expert"
    assert not out.exists()  # never half there
    moerge_ok(launcher, *train_args(tiny_base, parity_task, out, "--resume"), cwd=folder)
    assert_same_tensors(adapter_tensors(out), reference)
    meta = json.loads((out / "moerge.json").read_text())
    assert meta["cost"]["resumed_from_step"] > 0
    assert hidden_leftovers(folder) == []  # checkpoints and any temp folder are gone once it is done


@pytest.mark.parametrize(
    ("sig", "hook", "left"),
    [
        (SIGINT, pause("moerge.train.loop:save_checkpoint", call=2), None),
        (SIGTERM, pause("moerge.train.loop:save_checkpoint", call=3), None),
        (SIGKILL, pause("safetensors.torch:save_file", call=5), ".expert.work/checkpoint.tmp"),
        (SIGTERM, pause("moerge.train.loop:write_expert_meta"), None),
        (SIGKILL, pause("moerge.train.loop:write_expert_meta"), ".expert.*.tmp"),
    ],
    ids=[
        "sigint-after-checkpoint-2",
        "sigterm-after-checkpoint-3",
        "sigkill-inside-checkpoint-3",
        "sigterm-writing-the-expert",
        "sigkill-writing-the-expert",
    ],
)
def test_train_stopped_then_resumed(launcher, tiny_base, parity_task, reference_expert, tmp_path, sig, hook, left):
    """`left`: what a SIGKILL leaves half-written there (so the kill landed where it should)."""
    args = train_args(tiny_base, parity_task, tmp_path / "expert")
    assert_stopped(stop_at(launcher, args, hook, sig, cwd=tmp_path), sig)
    work = tmp_path / ".expert.work"
    assert (work / "checkpoint" / "state.json").is_file()
    if left:
        assert list(tmp_path.glob(left)), left
    else:  # SIGINT/SIGTERM: the temp folder of the expert was removed on the way out
        assert hidden_leftovers(tmp_path) == [".expert.work"]
    # Without --resume the interrupted run is not silently dropped.
    refused = launcher.start(args, cwd=tmp_path).wait()
    assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr
    _resume_and_compare(launcher, tiny_base, parity_task, tmp_path, reference_expert)


# ---- merge: the output never half-exists ------------------------------------------------------------------


@pytest.fixture(scope="module")
def experts(launcher, tiny_base, parity_task, tmp_path_factory) -> list[Path]:
    """Two experts on the parity task (2 steps, seeds 0 and 1), as `moerge train` writes them."""
    folder = tmp_path_factory.mktemp("signals_experts")
    args = ["train", "--base", tiny_base, "--task", parity_task, "--rank", "2", "--steps", "2", "--batch-size", "4"]
    for seed, name in enumerate(["parity", "parity2"]):
        moerge_ok(launcher, *args, "--max-length", "48", "--eval-limit", "2", "--seed", seed, "--out", name, cwd=folder)
    return [folder / "parity", folder / "parity2"]


def merge_args(experts: list[Path], out: Path, *extra: str) -> list[str]:
    return ["merge", "--method", "ties", "--experts", ",".join(map(str, experts)), "--out", out, *extra]


@pytest.mark.parametrize(
    ("sig", "hook"),
    [
        (SIGINT, pause("moerge.merge.run:write_adapter")),
        (SIGTERM, pause("moerge.merge.run:write_expert_meta")),
    ],
    ids=["sigint-adapter-written", "sigterm-before-rename"],
)
def test_merge_stopped_leaves_nothing(launcher, experts, tmp_path, sig, hook):
    outs = tmp_path / "outs"
    outs.mkdir()
    with unchanged(outs, *experts):
        assert_stopped(stop_at(launcher, merge_args(experts, outs / "merged"), hook, sig, cwd=tmp_path), sig)


def test_merge_sigkill_then_rerun(launcher, experts, tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    args = merge_args(experts, outs / "merged")
    with unchanged(*experts):
        assert_stopped(stop_at(launcher, args, pause("moerge.merge.run:write_adapter"), SIGKILL, cwd=tmp_path), SIGKILL)
    assert not (outs / "merged").exists()
    assert [p.name for p in outs.iterdir() if p.name.startswith(".merged.")]  # the dead writer's temp folder
    moerge_ok(launcher, *args, cwd=tmp_path)
    assert sorted(p.name for p in outs.iterdir()) == ["merged"]  # the rerun removed the dead writer's temp folder
    assert {"adapter_model.safetensors", "adapter_config.json", "moerge.json"} <= {
        p.name for p in (outs / "merged").iterdir()
    }


def test_merge_overwrite_sigkill_keeps_old_output(launcher, experts, tmp_path):
    out = tmp_path / "merged"
    moerge_ok(launcher, *merge_args(experts, out), cwd=tmp_path)
    before = snapshot(out)
    args = merge_args(experts[:1], out, "--overwrite")
    assert_stopped(stop_at(launcher, args, pause("moerge.merge.run:write_expert_meta"), SIGKILL, cwd=tmp_path), SIGKILL)
    assert snapshot(out) == before


# ---- compare: a stopped run resumes from its cache --------------------------------------------------------


def compare_recipe(folder: Path, tiny_base: Path, library: Path) -> Path:
    parity = write_task(folder / "parity.jsonl", parity_rows(40))
    colours = write_task(
        folder / "colour.jsonl",
        [
            {"input": f"Colour of item {i}?", "target": ["red", "blue"][i % 2], "choices": ["red", "blue"]}
            for i in range(40)
        ],
    )
    probe = write_task(folder / "probe.jsonl", addition_rows(30))
    recipe = {
        "base": str(tiny_base),
        "library": str(library),
        "method": "lora",
        "hyperparameters": {"rank": 2, "steps": 3, "batch_size": 4, "max_length": 48, "lr": 0.01, "eval_split": None},
        "held_in": [{"task": parity, "name": "parity"}, {"task": colours, "name": "colour"}],
        "forgetting": {"probe": probe, "limit": 4},
        "eval_limit": 6,
        "strategies": ["base", "oracle", "ties"],
    }
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


TIMING = {"latency_ms", "peak_memory_mb"}


def scores(rows: list[dict]) -> list[dict]:
    """A results row without what a clock or the memory gauge measured."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip(rows)


SCORING = "moerge.recipes.compare:_score_task"


@pytest.fixture(scope="module")
def whole_compare(launcher, tiny_base, tmp_path_factory) -> tuple[Path, dict, int]:
    """The recipe, an uninterrupted run's results and how many (strategy, task) scores it computed."""
    folder = tmp_path_factory.mktemp("compare")
    recipe = compare_recipe(folder, tiny_base, folder / "lib")
    log = folder / "scored.log"
    moerge_ok(launcher, "compare", recipe, "--out", folder / "whole", cwd=folder,
              hooks=[{"target": SCORING, "log": str(log)}])  # fmt: skip
    return recipe, json.loads((folder / "whole" / "results.json").read_text()), len(log.read_text().split())


@pytest.mark.parametrize("sig", [SIGTERM, SIGKILL], ids=["sigterm", "sigkill"])
def test_compare_stopped_while_scoring_resumes_from_cache(launcher, whole_compare, tmp_path, sig):
    recipe, whole, computed = whole_compare
    out = tmp_path / "stopped"
    args = ["compare", recipe, "--out", out]
    assert_stopped(stop_at(launcher, args, pause(SCORING, 3, "before"), sig, cwd=tmp_path), sig, only_line=False)
    assert not (out / "results.json").exists()
    cached = snapshot(out / "cache")
    assert len([path for path in cached if ".task_" in Path(path).name]) == 2  # scored before the stop

    log = tmp_path / "rerun.log"
    moerge_ok(launcher, *args, cwd=tmp_path, hooks=[{"target": SCORING, "log": str(log)}])
    assert snapshot(out / "cache").items() >= cached.items()  # reused as they were
    assert len(log.read_text().split()) == computed - 2  # only the rest was scored
    assert scores(json.loads((out / "results.json").read_text())["rows"]) == scores(whole["rows"])


# ---- library add: old state or new ------------------------------------------------------------------------


def expert_files(folder: Path) -> dict:
    return json.loads((folder / "moerge.json").read_text())["files"]


def listed(launcher: Launcher, library: Path, cwd: Path) -> dict[str, dict]:
    """name → files (sha256s) of every expert `library list` shows."""
    return {
        meta["name"]: meta["files"]
        for meta in json.loads(moerge_ok(launcher, "library", "list", library, "--json", cwd=cwd))
    }


def verified(launcher: Launcher, library: Path, cwd: Path) -> subprocess.CompletedProcess:
    return launcher.start(["library", "verify", library], cwd=cwd).wait()


@pytest.fixture
def library(launcher, experts, tmp_path) -> Path:
    """A library holding the first expert as "parity"."""
    lib = tmp_path / "lib"
    moerge_ok(launcher, "library", "create", lib, cwd=tmp_path)
    moerge_ok(launcher, "library", "add", lib, experts[0], cwd=tmp_path)
    return lib


UPLOADED = pause("moerge.library.library:ExpertLibrary._upload")
SWAPPED = pause("moerge.library.catalog:Catalog.upsert")  # new folder renamed in, catalog row written


def test_library_add_sigint_after_the_copy_keeps_old_state(launcher, library, experts, tmp_path):
    old = listed(launcher, library, tmp_path)
    args = ["library", "add", library, experts[1], "--name", "parity", "--overwrite"]
    with unchanged(library):
        assert_stopped(stop_at(launcher, args, UPLOADED, SIGINT, cwd=tmp_path), SIGINT)
    assert listed(launcher, library, tmp_path) == old
    assert verified(launcher, library, tmp_path).returncode == 0


def test_library_add_sigterm_mid_swap_old_or_new(launcher, library, experts, tmp_path):
    """Stopped once the new folder is renamed in and its catalog row written: the library must then
    show one consistent state — the catalog's sha256s match the folder on disk."""
    old, new = {"parity": expert_files(experts[0])}, {"parity": expert_files(experts[1])}
    args = ["library", "add", library, experts[1], "--name", "parity", "--overwrite"]
    assert_stopped(stop_at(launcher, args, SWAPPED, SIGTERM, cwd=tmp_path), SIGTERM)
    on_disk = {"parity": expert_files(library / "parity")}
    assert on_disk in (old, new)
    assert listed(launcher, library, tmp_path) == on_disk
    assert verified(launcher, library, tmp_path).returncode == 0


@pytest.mark.parametrize("hook", [UPLOADED, SWAPPED], ids=["copied", "swapped"])
def test_library_add_sigkill_old_or_new(launcher, library, experts, tmp_path, hook):
    old = {"parity": expert_files(experts[0])}
    new = {"parity": expert_files(experts[1])}
    args = ["library", "add", library, experts[1], "--name", "parity", "--overwrite"]
    assert_stopped(stop_at(launcher, args, hook, SIGKILL, cwd=tmp_path), SIGKILL)
    assert listed(launcher, library, tmp_path) in (old, new)
    # What the kill left (a temp copy, a pending swap) is reported, then tidied by `library rebuild`.
    moerge_ok(launcher, "library", "rebuild", library, cwd=tmp_path)
    after = listed(launcher, library, tmp_path)
    assert after in (old, new)
    assert verified(launcher, library, tmp_path).returncode == 0
    assert [p.name for p in library.iterdir() if p.name.startswith((".tmp-", ".old-", ".pending-"))] == []
    # and the add, run again, goes through
    moerge_ok(launcher, *args, cwd=tmp_path)
    assert listed(launcher, library, tmp_path) == new


# ---- the entry point's handlers, in this process ----------------------------------------------------------


def _stop_self(sig: int, then=None):
    """A command that receives `sig` while working, and runs `then` in its cleanup."""
    cleaned = []

    def command():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(30)
        finally:
            cleaned.append(sig)
            if then is not None:
                then()

    return command, cleaned


@pytest.mark.parametrize("sig", [SIGINT, SIGTERM], ids=["sigint", "sigterm"])
def test_signal_runs_the_cleanup_then_one_line(capsys, sig):
    from moerge.cli.main import run

    before = signal.getsignal(sig)
    command, cleaned = _stop_self(sig)
    with pytest.raises(SystemExit) as stopped:
        run(command)
    status, word = STOPPED[sig]
    assert (stopped.value.code, capsys.readouterr().err.split(), cleaned) == (status, [word], [sig])
    assert signal.getsignal(sig) is before  # put back


def test_a_cleanup_that_fails_after_a_signal_still_reports_the_signal(capsys):
    from moerge.cli.main import run
    from moerge.errors import MoergeError

    def fail():
        raise MoergeError("could not remove the temp folder")

    command, _ = _stop_self(SIGTERM, then=fail)
    with pytest.raises(SystemExit) as stopped:
        run(command)
    assert (stopped.value.code, capsys.readouterr().err.split()) == (143, ["terminated"])


def test_an_ignored_sigint_stays_ignored():
    from moerge.cli.main import run

    seen = []
    previous = signal.signal(SIGINT, signal.SIG_IGN)
    try:
        run(lambda: seen.append(signal.getsignal(SIGINT)))
        assert seen == [signal.SIG_IGN] and signal.getsignal(SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(SIGINT, previous)
