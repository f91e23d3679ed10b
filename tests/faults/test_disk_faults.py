"""A full disk, a read-only folder, and the error line itself.

Real file systems, not mocks: a small tmpfs filled to its last page (ENOSPC) and a tmpfs mounted
read-only (EROFS, which even root cannot write). Mounting needs root: without it those cases skip,
saying why. Whatever fails, the command answers with one line `error: <path>: ...` and exit status 2,
and the folder it was writing into is exactly as it was (no partial expert, no temp folder).

The CLI boundary (`moerge.cli.main.run`) is also checked on its own: an OS failure that escapes a
command is one line naming the file, a programming error keeps its traceback, and an error text is
printed as it is (a file named `data[bold].jsonl` is not rich markup).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import assert_refused, moerge, unchanged
from test_signals import Launcher, shared_launcher

from moerge.cli.main import run
from moerge.errors import MoergeError
from moerge.library import ExpertLibrary

# ---- small file systems -----------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, *, size: str = "1m", read_only: bool = False) -> Iterator[Path]:
    """A fresh tmpfs at `folder` (unmounted afterwards); skips the test where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no `mount` command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path, leave: int = 4096) -> None:
    """Fill the file system of `folder` until `leave` bytes are free (a file `filler` holds the rest)."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


@pytest.fixture
def full_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs with 4 KiB left."""
    with tmpfs(tmp_path / "full") as folder:
        fill(folder)
        yield folder


@pytest.fixture
def read_only(tmp_path) -> Iterator[Path]:
    """A read-only tmpfs (root cannot write there either)."""
    with tmpfs(tmp_path / "ro", read_only=True) as folder:
        yield folder


@pytest.fixture(scope="module")
def launcher(request) -> Launcher:
    return shared_launcher(request)


@pytest.fixture(scope="module")
def expert(launcher, tiny_base, parity_task, tmp_path_factory) -> Path:
    """An expert as `moerge train` writes it (2 steps)."""
    folder = tmp_path_factory.mktemp("disk_expert")
    args = ["train", "--base", tiny_base, "--task", parity_task, "--rank", "2", "--steps", "2", "--batch-size", "4"]
    result = launched(launcher, *args, "--max-length", "48", "--eval-limit", "2", "--out", "parity", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "parity"


@pytest.fixture
def library(tmp_path, expert) -> Path:
    root = tmp_path / "lib"
    ExpertLibrary.create(root).add(expert, name="parity")
    return root


def launched(launcher: Launcher, *args, cwd: Path) -> subprocess.CompletedProcess:
    return launcher.start(list(args), cwd=cwd).wait()


def assert_disk_full(result: subprocess.CompletedProcess, folder: Path) -> str:
    line = assert_refused(result, folder)
    assert "No space left on device" in line, line
    return line


# ---- a full disk --------------------------------------------------------------------------------------------


def test_merge_onto_a_full_disk(launcher, expert, full_disk, tmp_path):
    with unchanged(full_disk, expert):
        args = ["merge", "--method", "linear", "--experts", expert, "--out", full_disk / "merged"]
        assert_disk_full(launched(launcher, *args, cwd=tmp_path), full_disk)


def train_onto(launcher, tiny_base, parity_task, folder: Path, cwd: Path) -> subprocess.CompletedProcess:
    args = ["train", "--base", tiny_base, "--task", parity_task, "--rank", "2", "--steps", "2"]
    args += ["--batch-size", "4", "--max-length", "48", "--eval-limit", "2", "--out", folder / "expert"]
    return launched(launcher, *args, cwd=cwd)


def test_train_onto_a_full_disk(launcher, tiny_base, parity_task, full_disk, tmp_path):
    assert_disk_full(train_onto(launcher, tiny_base, parity_task, full_disk, tmp_path), full_disk)
    assert not (full_disk / "expert").exists()
    assert not [p for p in full_disk.iterdir() if p.name.endswith(".tmp")]  # no temp folder of the expert


def test_train_onto_a_full_disk_leaves_nothing(launcher, tiny_base, parity_task, full_disk, tmp_path):
    with unchanged(full_disk, tiny_base):
        assert_refused(train_onto(launcher, tiny_base, parity_task, full_disk, tmp_path))


def test_library_export_onto_a_full_disk(library, full_disk, tmp_path):
    with unchanged(full_disk, library):
        assert_disk_full(moerge("library", "export", library, "parity", full_disk / "plain", cwd=tmp_path), full_disk)


@pytest.fixture
def full_library(tmp_path) -> Iterator[Path]:
    with tmpfs(tmp_path / "lib") as root:
        ExpertLibrary.create(root)
        fill(root)
        yield root


def test_library_add_into_a_full_library(expert, full_library, tmp_path):
    with unchanged(full_library, expert):
        line = assert_refused(moerge("library", "add", full_library, expert, cwd=tmp_path))
    assert "No space left on device" in line, line


def test_library_add_into_a_full_library_names_the_library(expert, full_library, tmp_path):
    """The line blames the library it could not write, not the expert it was copying."""
    line = assert_disk_full(moerge("library", "add", full_library, expert, cwd=tmp_path), full_library)
    assert line.startswith(f"error: {full_library}: could not be written (No space left on device"), line


# ---- a folder that cannot be written ------------------------------------------------------------------------


def test_export_into_a_read_only_file_system(library, read_only, tmp_path):
    with unchanged(read_only, library):
        line = assert_refused(moerge("library", "export", library, "parity", read_only / "plain", cwd=tmp_path))
    assert str(read_only) in line and "Read-only file system" in line, line


def test_export_into_a_folder_without_write_permission(library, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a chmod 555 folder stays writable (the read-only mount case covers this)")
        with unchanged(locked, library):
            line = assert_refused(moerge("library", "export", library, "parity", locked / "plain", cwd=tmp_path))
        assert str(locked) in line and "Permission denied" in line, line
    finally:
        locked.chmod(0o755)


# ---- the error line is plain text ---------------------------------------------------------------------------


def test_bad_line_in_a_file_named_like_markup(tmp_path):
    data = tmp_path / "data[bold].jsonl"
    data.write_text('{"input": "a", "target": "b"}\n{not json\n')
    line = assert_refused(moerge("data", "show", data.name, cwd=tmp_path), "data[bold].jsonl:2")
    assert "invalid JSON" in line


def test_missing_file_named_like_markup_lists_sources_intact(tmp_path):
    # The list of known sources holds `bigbench:<task>[/<subtask>]`: as markup, a closing tag that
    # matches nothing (rich's MarkupError).
    line = assert_refused(moerge("data", "show", "[red]missing[/red]", cwd=tmp_path), "[red]missing[/red]:")
    assert "[/<subtask>]" in line, line


# ---- the CLI boundary ---------------------------------------------------------------------------------------


def _exit_status(capsys, command) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stopped:
        run(command)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return stopped.value.code, lines


def _raise(exc: BaseException):
    def command():
        raise exc

    return command


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out/x.bin"),
            "/data/out/x.bin: No space left on device",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/a", None, "/b[bold]"),
            "/a -> /b[bold]: Permission denied",
        ),
        (MoergeError("data[bold].jsonl:2: bad [/x]\nsecond line"), "data[bold].jsonl:2: bad [/x] second line"),
        (shutil.Error([("/src/a", "/dst/a", "[Errno 28] No space left on device")]), "/dst/a: No space left on device"),
    ],
    ids=["enospc", "eacces-rename", "markup-and-newline", "copytree"],
)
def test_one_line_at_the_boundary(capsys, exc, line):
    status, lines = _exit_status(capsys, _raise(exc))
    assert (status, lines) == (2, [f"error: {line}"])


def test_os_error_without_a_file_name_names_the_file_being_written(capsys, tmp_path):
    target = tmp_path / "weights.bin"

    def write(filename=str(target)):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write() or flush() says no more

    status, lines = _exit_status(capsys, write)
    assert (status, lines) == (2, [f"error: {target}: No space left on device"])


def test_safetensors_disk_error_is_one_line(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    target = tmp_path / "no" / "such" / "folder" / "t.safetensors"
    status, lines = _exit_status(capsys, lambda: save_file({"t": torch.zeros(2)}, str(target)))
    assert (status, lines) == (2, [f"error: {target}: No such file or directory"])


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EBADF, "Bad file descriptor"), ValueError("a bug"), KeyError("bug")],
    ids=["ebadf", "value", "key"],
)
def test_programming_errors_keep_their_traceback(exc):
    with pytest.raises(type(exc)):
        run(_raise(exc))
