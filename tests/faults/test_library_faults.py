"""`moerge library add` copies regular files only, and an add that dies leaves nothing that lasts.

Links, FIFOs, sockets and devices in the source folder are refused with one line naming them (or left
out with --skip-links, never a file moerge.json lists), so nothing from outside the folder reaches the
library. An add killed with SIGKILL leaves a temp copy that `verify` reports and `rebuild` (or the next
writer) removes; SIGINT/SIGTERM leave the old state. Two processes adding the same name never corrupt
the library.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import assert_refused, moerge, unchanged

from moerge.library import ExpertLibrary
from moerge.paths import hold

BIG = 160 << 20  # big enough that a signal sent once copying has started lands mid-copy


@pytest.fixture
def lib(tmp_path, trained_expert) -> Path:
    """A library holding one expert, `parity`."""
    root = tmp_path / "lib"
    library = ExpertLibrary.create(root)
    library.add(trained_expert, name="parity")
    return root


@pytest.fixture
def src(tmp_path, trained_expert) -> Path:
    """A copy of the expert to add; tests put links and special files into it."""
    return Path(shutil.copytree(trained_expert, tmp_path / "src"))


def bookkeeping(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock")


def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("the private key of someone else\n")
    return path


def library_holds(root: Path, text: str) -> bool:
    return any(text in p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file())


# ---- what may be copied in -------------------------------------------------------------------------


def test_symlink_to_a_file_outside_is_refused(lib, src, tmp_path) -> None:
    (src / "notes.txt").symlink_to(secret(tmp_path))
    with unchanged(lib, src):
        result = moerge("library", "add", lib, src, "--name", "new")
    assert_refused(result, str(src / "notes.txt"), "symbolic link", "--skip-links")
    assert not library_holds(lib, "private key")


def test_symlink_to_a_folder_outside_is_refused(lib, src, tmp_path) -> None:
    (src / "extra").symlink_to(secret(tmp_path).parent, target_is_directory=True)
    with unchanged(lib, src):
        result = moerge("library", "add", lib, src, "--name", "new")
    assert_refused(result, str(src / "extra"), "symbolic link")


def test_symlink_inside_the_folder_is_refused(lib, src) -> None:
    (src / "sub").mkdir()
    (src / "sub" / "config-copy.json").symlink_to("../adapter_config.json")
    with unchanged(lib, src):
        result = moerge("library", "add", lib, src, "--name", "new")
    assert_refused(result, str(src / "sub" / "config-copy.json"), "symbolic link")


def test_dangling_symlink_is_refused(lib, src) -> None:
    (src / "gone").symlink_to(src / "never-existed")
    with unchanged(lib, src):
        result = moerge("library", "add", lib, src, "--name", "new")
    assert_refused(result, str(src / "gone"), "symbolic link")


def test_payload_file_that_is_a_symlink_is_refused(lib, src, tmp_path) -> None:
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(src / "adapter_model.safetensors", real)
    (src / "adapter_model.safetensors").symlink_to(real)
    with unchanged(lib, src):
        result = moerge("library", "add", lib, src, "--name", "new")
    assert_refused(result, str(src / "adapter_model.safetensors"), "symbolic link")


def test_fifo_is_refused_without_hanging(lib, src) -> None:
    os.mkfifo(src / "pipe")  # reading it would block forever (so `unchanged` watches the library only)
    with unchanged(lib):
        result = moerge("library", "add", lib, src, "--name", "new", timeout=120)
    assert_refused(result, str(src / "pipe"), "named pipe")


def test_socket_is_refused(lib, src) -> None:
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(src / "agent.sock"))
        with unchanged(lib):
            result = moerge("library", "add", lib, src, "--name", "new")
    finally:
        server.close()
    assert_refused(result, str(src / "agent.sock"), "socket")


def test_source_that_is_a_fifo_is_one_line(lib, tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with unchanged(lib):
        result = moerge("library", "add", lib, tmp_path / "pipe", timeout=120)
    assert_refused(result, str(tmp_path / "pipe"))


def test_moerge_json_that_is_a_symlink_is_refused_even_with_skip_links(lib, src, tmp_path) -> None:
    real = tmp_path / "meta.json"
    shutil.move(src / "moerge.json", real)
    (src / "moerge.json").symlink_to(real)
    with unchanged(lib, src):
        result = moerge("library", "add", lib, src, "--name", "new", "--skip-links")
    assert_refused(result, str(src / "moerge.json"), "must be a regular file")


def test_skip_links_never_leaves_out_a_listed_file(lib, src, tmp_path) -> None:
    real = tmp_path / "elsewhere.json"
    shutil.move(src / "adapter_config.json", real)
    (src / "adapter_config.json").symlink_to(real)
    with unchanged(lib, src):
        result = moerge("library", "add", lib, src, "--name", "new", "--skip-links")
    assert_refused(result, str(src / "adapter_config.json"), "moerge.json lists it")


def test_skip_links_leaves_out_links_and_fifos(lib, src, tmp_path) -> None:
    (src / "notes.txt").symlink_to(secret(tmp_path))
    os.mkfifo(src / "pipe")
    result = moerge("library", "add", lib, src, "--name", "new", "--skip-links", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "left out notes.txt: a symbolic link" in result.stdout and "left out pipe" in result.stdout
    assert sorted(p.name for p in (lib / "new").iterdir()) == sorted(
        p.name for p in src.iterdir() if p.name not in ("notes.txt", "pipe")
    )
    assert not library_holds(lib, "private key")
    assert moerge("library", "verify", lib).returncode == 0


# ---- adds that die ---------------------------------------------------------------------------------


@pytest.fixture
def big_src(src) -> Path:
    with open(src / "big.bin", "wb") as fh:  # not listed in moerge.json; copied like any extra file
        fh.write(os.urandom(1 << 20) * (BIG >> 20))
    return src


def signal_mid_copy(args: list, lib: Path, sig: int, timeout: float = 300) -> tuple[int, str]:
    """Run `moerge ARGS` and send `sig` once big.bin has started to land in the library's temp folder."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moerge.cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, sent = time.monotonic() + timeout, False
    while not sent and proc.poll() is None and time.monotonic() < deadline:
        for partial in lib.glob(".tmp-*/big.bin"):
            try:
                started = 0 < partial.stat().st_size < BIG
            except OSError:
                started = False
            if started:
                proc.send_signal(sig)
                sent = True
                break
        time.sleep(0.001)
    _, stderr = proc.communicate(timeout=timeout)
    assert sent, f"the add finished before it could be interrupted: {stderr}"
    return proc.returncode, stderr


def test_sigkill_mid_copy_leftover_is_reported_then_removed(lib, big_src) -> None:
    with unchanged(lib / "parity", lib / "catalog.sqlite"):
        status, _ = signal_mid_copy(["library", "add", lib, big_src, "--name", "big"], lib, signal.SIGKILL)
    assert status == -signal.SIGKILL
    [leftover] = bookkeeping(lib)
    assert leftover.startswith(".tmp-") and (lib / leftover / "big.bin").is_file()
    verify = moerge("library", "verify", lib)
    assert verify.returncode == 1 and f"leftover {leftover}" in verify.stdout, verify.stdout
    report = json.loads(moerge("library", "verify", lib, "--json").stdout)
    assert report["leftovers"] == [leftover] and not report["ok"]
    assert moerge("library", "list", lib, "--json").stdout.count('"name": "big"') == 0
    rebuilt = moerge("library", "rebuild", lib)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert bookkeeping(lib) == []
    assert moerge("library", "verify", lib).returncode == 0


def test_the_next_add_removes_a_killed_adds_leftover(lib, big_src, trained_expert) -> None:
    signal_mid_copy(["library", "add", lib, big_src, "--name", "big"], lib, signal.SIGKILL)
    assert len(bookkeeping(lib)) == 1
    added = moerge("library", "add", lib, trained_expert, "--name", "second")
    assert added.returncode == 0, added.stderr
    assert bookkeeping(lib) == []
    assert ExpertLibrary(lib).names() == ["parity", "second"]


def test_sigint_mid_copy_exits_130_and_keeps_the_old_state(lib, big_src) -> None:
    with unchanged(lib):
        status, stderr = signal_mid_copy(
            ["library", "add", lib, big_src, "--name", "parity", "--overwrite"], lib, signal.SIGINT
        )
    assert status == 130 and "Traceback" not in stderr, stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) <= 1


def test_sigterm_mid_copy_keeps_the_old_state(lib, big_src) -> None:
    before = (lib / "parity" / "adapter_model.safetensors").read_bytes()
    status, stderr = signal_mid_copy(
        ["library", "add", lib, big_src, "--name", "parity", "--overwrite"], lib, signal.SIGTERM
    )
    assert status in (-signal.SIGTERM, 143, 130) and "Traceback" not in stderr, (status, stderr)
    assert (lib / "parity" / "adapter_model.safetensors").read_bytes() == before
    assert not (lib / "parity" / "big.bin").exists()
    moerge("library", "rebuild", lib)  # whatever a killed add left, rebuild removes
    assert bookkeeping(lib) == [] and moerge("library", "verify", lib).returncode == 0


def test_a_live_adds_temp_folder_is_neither_reported_nor_removed(lib) -> None:
    """What tells a dead add's temp copy from one still being written: the add holds its lock."""
    live = lib / ".tmp-1-abcdef01-busy"
    live.mkdir()
    (live / "part.bin").write_bytes(b"\0" * 1024)
    with hold(live):
        library = ExpertLibrary(lib)
        assert library.verify().leftovers == []
        library.rebuild()
        assert live.is_dir()
    assert ExpertLibrary(lib).verify().leftovers == [live.name]


def test_set_aside_folder_of_a_crashed_swap_is_reported_then_removed(lib, trained_expert) -> None:
    shutil.copytree(trained_expert, lib / ".old-parity")  # crash after the swap, before the cleanup
    verify = moerge("library", "verify", lib)
    assert verify.returncode == 1 and "leftover .old-parity" in verify.stdout
    assert moerge("library", "rebuild", lib).returncode == 0
    assert bookkeeping(lib) == [] and moerge("library", "verify", lib).returncode == 0


# ---- two writers at once ---------------------------------------------------------------------------


def start_add(lib: Path, folder: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moerge.cli", "library", "add", str(lib), str(folder), "--name", "twin", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_adds_of_the_same_name_one_wins_one_is_refused(lib, src, trained_expert) -> None:
    procs = [start_add(lib, trained_expert), start_add(lib, src)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(status for status, _, _ in results) == [0, 2], results
    [(_, _, refusal)] = [r for r in results if r[0] == 2]
    lines = [line for line in refusal.splitlines() if line.strip()]
    assert len(lines) == 1 and "'twin' already exists" in lines[0] and "Traceback" not in refusal
    assert ExpertLibrary(lib).names() == ["parity", "twin"]
    assert bookkeeping(lib) == [] and moerge("library", "verify", lib).returncode == 0


def test_two_overwriting_adds_of_the_same_name_leave_one_intact_expert(lib, src, trained_expert) -> None:
    meta = json.loads((src / "moerge.json").read_text())
    (src / "moerge.json").write_text(json.dumps({**meta, "task": {**meta["task"], "name": "other"}}))
    procs = [start_add(lib, trained_expert, "--overwrite"), start_add(lib, src, "--overwrite")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [status for status, _ in results] == [0, 0], results
    assert ExpertLibrary(lib).meta("twin").task.name in (meta["task"]["name"], "other")
    assert bookkeeping(lib) == [] and moerge("library", "verify", lib).returncode == 0
