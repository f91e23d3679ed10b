"""The `moerge` command: one typer app; each command group lives in its own module.

Modules stay thin (parse, call the library API, print). Heavy imports happen inside commands so
`--help` is instant.

`run()` is the one place where failures become what a user sees: a `MoergeError` (bad input) or an
`OSError` (a read-only folder, a full disk, a missing permission) is one line `error: ...` on stderr
and exit status 2; Ctrl-C (SIGINT) is the line `interrupted` and status 130; SIGTERM is the line
`terminated` and status 143 (128 + 15, what a shell reports for a process SIGTERM ended). Both
signals are raised as `KeyboardInterrupt` in the running command, so every `finally` and
`except BaseException` cleanup (the atomic writers remove their temp folders there) runs first.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from moerge.errors import MoergeError

app = typer.Typer(
    name="moerge",
    help="Train, keep, merge, route and compare fine-tuned experts on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, markup=False)


def _register() -> None:
    from moerge.cli import compare, data, demo, evaluate, library, merge, models, route, train
    from moerge.cli.help import lazy_epilog

    app.command("demo")(demo.demo)
    app.command("compare")(compare.compare)
    app.add_typer(models.app, name="models")
    app.add_typer(data.app, name="data")
    app.command("train", cls=lazy_epilog(train.methods_epilog))(train.train)
    app.command("train-library")(train.train_library_command)
    app.command("eval")(evaluate.eval_command)
    app.command("generate")(evaluate.generate_command)
    for module in (library, merge, route):
        module.register(app)


_register()

# ---- signals -------------------------------------------------------------------------------------------

EXIT_USER_ERROR = 2
STOPPED = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
"""Signal → (exit status, the one line printed)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


_received: list[int] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _install_signal_handlers() -> dict[int, Any]:
    """Route SIGINT and SIGTERM through `_on_signal`; a signal the caller ignores stays ignored
    (`nohup`, a shell's background job). Returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        current = signal.getsignal(signum)
        if current is default:
            previous[signum] = current
            signal.signal(signum, _on_signal)
    return previous


def _stopped() -> None:
    """A command stopped by SIGINT/SIGTERM (its cleanup has run): one line and 130/143."""
    status, word = STOPPED[_received[0] if _received else signal.SIGINT]
    err_console.print(Text(word, style="yellow"))
    sys.exit(status)


# ---- errors --------------------------------------------------------------------------------------------

_NOT_ENVIRONMENT = {errno.EBADF, errno.EFAULT}
"""OSErrors that say the program is wrong, not the machine: they keep their traceback."""
_PATH_LOCALS = ("filename", "path", "file", "target", "dest", "dst", "folder", "out")
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_QUOTED_PATH = re.compile(r'at path "([^"]+)"')
_ERRNO_TEXT = re.compile(r"^\[Errno \d+\] (.*?)(?:: '.*')?$")


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


def _fail(message: str) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", _one_line(message)))
    sys.exit(EXIT_USER_ERROR)


def _path_text(path: Any) -> str:
    return os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)


def _path_from_traceback(tb: TracebackType | None) -> str | None:
    """The file the failing call was writing, for OS errors that do not carry one (a write or flush
    that hit a full disk, a library wrapping the error): the innermost frame holding a path-like
    local under a usual name."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and str(value):
                return _path_text(value)
    return None


def _os_failure(exc: BaseException) -> tuple[str | None, str] | None:
    """(path, reason) when `exc` is the machine refusing (an OSError, or one a library wrapped, such as
    safetensors' "I/O error: ... (os error 28)"); None for anything else."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        _, dst, why = exc.args[0][0]  # copytree's list of (source, destination, reason)
        reason = _ERRNO_TEXT.match(str(why))
        return (_path_text(dst), reason.group(1) if reason else _one_line(str(why)))
    if isinstance(exc, OSError):
        if exc.errno in _NOT_ENVIRONMENT or type(exc).__module__ == "io":  # io.UnsupportedOperation
            return None
        paths = [_path_text(p) for p in (exc.filename, exc.filename2) if p is not None]
        reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
        return (" -> ".join(paths) or _path_from_traceback(exc.__traceback__), reason)
    if type(exc).__module__.split(".")[0] == "safetensors":
        code = _WRAPPED_OS_ERROR.search(str(exc))
        if code is None:
            return None
        quoted = _QUOTED_PATH.search(str(exc))  # where it failed: often a temp file beside the target
        path = _path_from_traceback(exc.__traceback__) or (quoted.group(1) if quoted else None)
        return (path, os.strerror(int(code.group(1))))
    return None


def run(command: Callable[[], Any] = app) -> None:
    """Entry point: a user error or OS failure is one red line on stderr and exit status 2, SIGINT and
    SIGTERM one line and 130 / 143 after the command's cleanup ran; bugs keep their traceback."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _received.clear()
    previous = _install_signal_handlers()
    try:
        command()
    except KeyboardInterrupt:
        _stopped()
    except SystemExit as exc:
        if exc.code == 130 or _received:  # typer turns KeyboardInterrupt into exit status 130
            _stopped()
        raise
    except MoergeError as exc:
        if _received:  # the cleanup a signal started failed too: the signal is what the caller sent
            _stopped()
        _fail(str(exc))
    except Exception as exc:
        failure = _os_failure(exc)
        if failure is None:
            raise
        if _received:
            _stopped()
        path, reason = failure
        _fail(f"{path}: {reason}" if path else reason)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
