"""The fault suite's harness: run `moerge` as a user does (a separate process), and check what every
bad input or fault must give — exit status 2 (130 for SIGINT), exactly one line on stderr that names
the file/line/field at fault, no traceback — and that nothing which existed before changed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Tiny models run fastest on one thread; several threads per process only fight over this CI's 2 cores.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def moerge(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600):
    """`moerge ARGS` in a fresh Python process (the installed entry point's code path)."""
    return subprocess.run(
        [sys.executable, "-m", "moerge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **QUIET_ENV, **(env or {})},
        timeout=timeout,
    )


def assert_refused(result: subprocess.CompletedProcess, *names: str, status: int = 2) -> str:
    """Exit `status`, one non-empty stderr line starting with `error:` naming every one of `names`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") or status == 130, lines[0]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(*roots: Path) -> dict[str, tuple[str, str]]:
    """Every file, folder and link below `roots`: path → (kind, sha256 of its bytes or its target)."""
    out: dict[str, tuple[str, str]] = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", "")
            else:
                out[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@contextlib.contextmanager
def unchanged(*roots: Path) -> Iterator[None]:
    """Assert that every file below `roots` that existed before the block is byte-identical after it,
    and that nothing was added or removed there."""
    before = snapshot(*roots)
    yield
    after = snapshot(*roots)
    assert after == before, {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
    }


def interrupt(args: list[str], when: str, sig: int, *, cwd: Path, timeout: float = 600, poll: float = 0.05):
    """Start `moerge ARGS`, send `sig` once `when` (a path, relative to `cwd`) exists, and return the
    finished process's (returncode, stderr). A SIGKILL leaves no chance to clean up: that is the point."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moerge.cli", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **QUIET_ENV},
    )
    deadline = time.monotonic() + timeout
    while not (cwd / when).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr


SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
