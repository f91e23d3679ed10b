"""Where moerge keeps its cache, and writing files so nothing is ever half-written.

Every folder moerge writes as a whole (an expert, a merge, a router, a cache entry) goes through
`atomic_directory`, and whether an existing folder may be replaced is decided in one place,
`check_replaceable`: a missing folder, or (with overwrite) an empty one, is fine; otherwise only a
folder moerge recognises as its own output (`output_kind`) is replaced, and only with overwrite.
Copies of user folders take regular files only (`copy_regular_tree`): a symlink, device, FIFO or
socket is refused, so nothing from outside the folder is ever copied in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # no advisory locks here (Windows): callers fall back to the age of a temp folder
    fcntl = None  # type: ignore[assignment]

CAN_LOCK = fcntl is not None


def moerge_home() -> Path:
    """The cache root: `$MOERGE_HOME`, else `~/.cache/moerge`."""
    return Path(os.environ.get("MOERGE_HOME", Path.home() / ".cache" / "moerge")).expanduser()


def _error(message: str) -> Exception:
    from moerge.errors import MoergeError

    return MoergeError(message)


def parse_json(text: str | bytes, source: object) -> Any:
    """JSON from a file's text; bad input is one MoergeError naming `source` and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(f"{source}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise _error(f"{source}: not UTF-8 text (expected JSON)") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: Path, text: str) -> None:
    """Write text via a temp file and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON (sorted keys, indented) written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- which folders are moerge's own outputs --------------------------------------------------------

EXPERT, ROUTER, COMPARE, BIGBENCH_CACHE = "expert", "router", "compare", "bigbench-cache"
KIND_NAMES = {
    EXPERT: "an expert folder",
    ROUTER: "a router folder",
    COMPARE: "a compare output",
    BIGBENCH_CACHE: "a BIG-bench cache folder",
}
OUTPUT_MARKERS = "no moerge.json, no router config.json + tensors.safetensors, no compare results.json + cache/"


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _json_keys(path: Path, limit: int = 16 << 20) -> set[str]:
    """Top-level keys of a small JSON object file; empty when it is not one."""
    try:
        if path.stat().st_size > limit:
            return set()
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def output_kind(folder: str | Path) -> str | None:
    """Which moerge output `folder` is, recognised by the file moerge wrote there, or None.

    expert: `moerge.json` with name and base; router: `config.json` with a "router" field and
    `tensors.safetensors`; compare: `results.json` and `cache/`; bigbench-cache: `sdist.json` and
    `benchmark_tasks/` (the extracted BIG-bench task files).
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    if _regular(folder / "moerge.json") and {"name", "base"} <= _json_keys(folder / "moerge.json"):
        return EXPERT
    router_files = _regular(folder / "config.json") and _regular(folder / "tensors.safetensors")
    if router_files and "router" in _json_keys(folder / "config.json"):
        return ROUTER
    if _regular(folder / "results.json") and (folder / "cache").is_dir():
        return COMPARE
    if _regular(folder / "sdist.json") and (folder / "benchmark_tasks").is_dir():
        return BIGBENCH_CACHE
    return None


def _entry_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a file" if stat.S_ISREG(mode) else "a special file"


def _is_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False  # unreadable: certainly not ours to replace


def check_replaceable(final: str | Path, *, overwrite: bool, kind: str | None = None, flag: str = "--out") -> None:
    """The one rule for writing a folder at `final` that may already exist.

    Fine: nothing at `final`, or (with `overwrite`) an empty folder. Replaced only with `overwrite`:
    a folder `output_kind` recognises — of `kind` when given (an expert is never replaced by a router,
    say), any moerge output otherwise. Refused, whatever `overwrite` says: a file, a symbolic link,
    a special file, a folder moerge did not write, or a moerge output of another kind. Each refusal is
    one MoergeError naming `final`.
    """
    final = Path(final)
    try:
        info = final.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:  # e.g. a parent that is a file
        raise _error(f"{final}: cannot be written ({exc.strerror}); choose another {flag}") from None
    refuse = f"refusing to replace it, choose another {flag}"
    if not stat.S_ISDIR(info.st_mode):
        raise _error(f"{final}: already exists and is {_entry_kind(info.st_mode)}, not a moerge output; {refuse}")
    if _is_empty(final):
        if overwrite:
            return
        raise _error(f"{final}: already exists (pass --overwrite to replace it)")
    found = output_kind(final)
    if found is None:
        raise _error(f"{final}: already exists and is not a moerge output ({OUTPUT_MARKERS}); {refuse}")
    if kind is not None and found != kind:
        raise _error(f"{final}: is {KIND_NAMES[found]}, not {KIND_NAMES[kind]}; {refuse}")
    if not overwrite:
        raise _error(f"{final}: already exists (pass --overwrite to replace it)")


# ---- telling a live writer's temp folder from a dead one's ----------------------------------------


def _open_lockable(path: Path) -> int | None:
    """A read-only descriptor of the folder or regular file `path`, to take an advisory lock on; None
    when it is gone or something else (a link to a file, a FIFO: never opened in a way that blocks)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except NotADirectoryError:
        pass
    except OSError:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def hold(folder: str | Path) -> Iterator[None]:
    """Hold an advisory lock on `folder` (or a temp file) while writing into it, so `in_use` tells it
    from a dead writer's leftover (the kernel drops the lock when the process dies, even by SIGKILL)."""
    fd = _open_lockable(Path(folder))
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def in_use(folder: str | Path) -> bool:
    """Whether some live process `hold`s `folder` (or file). Unknown (no locks here) counts as in use."""
    fd = _open_lockable(Path(folder))
    if fd is None:
        return False  # gone already
    try:
        if fcntl is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ---- swapping a finished folder in --------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _tidy_beside(final: Path) -> None:
    """Undo a swap a crash interrupted (old folder set aside, new one not yet in), and remove the temp
    folders of writers of `final` that died (their process is gone and their lock released)."""
    old = _old_name(final)
    if output_kind(old) is not None:  # only what moerge set aside; a user's `.x.old` is left alone
        if not os.path.lexists(final):
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)-[a-z0-9_]+\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(final.parent):
            match = pattern.fullmatch(entry.name)
            dead = match is not None and not _pid_alive(int(match.group(1)))
            if dead and entry.is_dir(follow_symlinks=False) and not in_use(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)


def _swap_in(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final`; an existing `final` is replaced in one atomic step."""
    if not os.path.lexists(final) or (final.is_dir() and not final.is_symlink() and _is_empty(final)):
        os.replace(tmp, final)  # renaming onto nothing, or onto an empty folder, is atomic
    elif _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:  # no atomic exchange here: set the old folder aside; `_tidy_beside` undoes a crash in between
        old = _old_name(final)
        if os.path.lexists(old) and output_kind(old) is None:
            raise _error(f"{old}: in the way of replacing {final} (not moerge's); move it away")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one atomic rename.

    Whether `final` may be replaced is `check_replaceable`'s rule (checked before and again right
    before the swap). A crash or error leaves `final` as it was and no temp folder; a temp folder left
    by a writer killed with SIGKILL is removed by the next writer of `final`. A full disk is one
    MoergeError naming `final`.
    """
    final = Path(final)
    check_replaceable(final, overwrite=overwrite, kind=kind)
    where = Path(os.path.abspath(final))
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        _tidy_beside(where)
        tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=f".{where.name}.{os.getpid()}-", suffix=".tmp"))
    except OSError as exc:
        raise _error(f"{final}: cannot write beside it in {final.parent} ({exc.strerror or exc})") from None
    try:
        with hold(tmp):
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
            yield tmp
            check_replaceable(final, overwrite=overwrite, kind=kind)
            _swap_in(tmp, where)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _DISK_FULL:
            raise _error(
                f"{final}: could not be written ({exc.strerror} while writing {exc.filename or tmp}); "
                "nothing was changed"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- copying a user's folder: regular files only ---------------------------------------------------


def special_entries(folder: str | Path) -> list[tuple[str, str]]:
    """(relative path, what it is) of every entry below `folder` that is not a regular file or folder:
    symbolic links (to anything), FIFOs, sockets, devices. Links are not followed."""
    folder = Path(folder)
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:  # removed while we looked
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                found.append((path.relative_to(folder).as_posix(), _describe(path, mode)))
    return sorted(found)


def _describe(path: Path, mode: int) -> str:
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    return _entry_kind(mode)


def _refusal(path: Path, what: str, hint: str) -> Exception:
    return _error(f"{path}: is {what}; only regular files are copied{hint}")


def copy_regular_tree(
    src: str | Path, dst: str | Path, *, skip_special: bool = False, hint: str = "", into: str | None = None
) -> list[str]:
    """Copy the folder `src` into `dst` (created, or an existing empty folder), regular files only.

    A symbolic link, FIFO, socket or device anywhere below `src` is refused (one MoergeError naming it,
    `hint` appended) or, with `skip_special`, left out; the skipped entries are returned. Files are
    opened without following links and checked to be regular, so nothing outside `src` is copied
    even if the folder changes while it is copied.

    A failure is blamed on the side that failed: a file that cannot be read names that file; a
    destination that cannot be written (a full disk, a read-only or unwritable folder) names `into`
    (what the caller calls the destination, such as a library; `dst` by default) and the OS reason.
    """
    src, dst = Path(src), Path(dst)
    skipped: list[str] = []

    def ignore(directory: str, names: list[str]) -> set[str]:
        left_out = set()
        for name in names:
            path = Path(directory, name)
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:  # removed while we copy: copying it reports that
                continue
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                continue
            if not skip_special:
                raise _refusal(path, _describe(path, mode), hint)
            skipped.append(path.relative_to(src).as_posix())
            left_out.add(name)
        return left_out

    def unwritable(exc: OSError, target: str) -> Exception:
        return _error(f"{into or dst}: could not be written ({exc.strerror or exc} while writing {target})")

    def read(fin: Any, source: str) -> bytes:
        try:
            return fin.read(1 << 20)
        except OSError as exc:
            raise _error(f"{source}: could not be read ({exc.strerror or exc})") from None

    def copy_file(source: str, target: str) -> str:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(source, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a link after it was listed
                raise _refusal(Path(source), "a symbolic link", hint) from None
            raise
        with os.fdopen(fd, "rb") as fin:
            info = os.fstat(fin.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _refusal(Path(source), _entry_kind(info.st_mode), hint)
            try:
                with open(target, "wb") as fout:
                    while chunk := read(fin, source):
                        fout.write(chunk)
                os.chmod(target, stat.S_IMODE(info.st_mode))
                os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
            except OSError as exc:
                raise unwritable(exc, target) from None
        return target

    try:
        shutil.copytree(src, dst, ignore=ignore, copy_function=copy_file, dirs_exist_ok=True)
    except shutil.Error as exc:  # copytree gathers every file's OSError; report the first one
        failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else [(src, dst, str(exc))]
        source, _, why = failures[0]
        failed = _FAILED_PATH.fullmatch(str(why))  # "[Errno 28] No space left on device: '<path>'"
        if failed and failed.group(2).startswith(str(dst)):  # making or stamping a folder in `dst`
            reason, path = failed.groups()
            raise _error(f"{into or dst}: could not be written ({reason} while writing {path})") from None
        raise _error(f"{source}: could not be copied ({why})") from None
    except OSError as exc:  # a folder that could not be made in `dst`
        if exc.filename is None or not _path_text(exc.filename).startswith(str(dst)):
            raise
        raise unwritable(exc, _path_text(exc.filename)) from None
    return sorted(skipped)


_FAILED_PATH = re.compile(r"\[Errno \d+\] (.*?): '(.*)'")


def _path_text(path: Any) -> str:
    return os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
