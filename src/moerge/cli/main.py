"""The `moerge` command: one typer app; each command group lives in its own module.

Modules stay thin (parse, call the library API, print). Heavy imports happen inside commands so
`--help` is instant.

`run()` is the one place where failures become what a user sees: a `MoergeError` (bad input) or an
`OSError` (a read-only folder, a full disk, a missing permission) is one line `error: ...` on stderr
and exit status 2; Ctrl-C (SIGINT) is the line `interrupted` and status 130; SIGTERM is the line
`terminated` and status 143 (128 + 15, what a shell reports for a process SIGTERM ended). Both
signals are raised as `KeyboardInterrupt` in the running command, so every `finally` and
`except BaseException` cleanup (the atomic writers remove their temp folders there) runs first.
Anything else is a bug and keeps its traceback. A usage error (an unknown option or command, a
missing argument, a value of the wrong type) is one line too, `error: moerge train: no such option:
--rnak (try --help)`, with click's usage status 2; `--help` is printed as typer prints it.

Ctrl-C or SIGTERM while this module is still importing (before `run()` takes over) also gives the one
line and 130 / 143: the handlers below are installed before the heavy imports and put back at the end
of the module, so importing it elsewhere (tests) changes nothing that lasts.
"""

from __future__ import annotations

import signal
import sys


def _stopped_while_starting(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM while the CLI is still importing: nothing has been written yet, so no cleanup is
    owed; the one line and 130 / 143 (SystemExit, so no traceback whatever import it lands in)."""
    status, word = (143, "terminated") if signum == signal.SIGTERM else (130, "interrupted")
    sys.stderr.write(f"{word}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def _catch_early_signals() -> dict[int, object]:
    """Install `_stopped_while_starting` for the signals still at their defaults (an ignored one stays
    ignored); returns what to put back."""
    previous: dict[int, object] = {}
    try:
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, _stopped_while_starting)
    except ValueError:  # imported outside the main thread: signals cannot be handled here
        pass
    return previous


_early_handlers = _catch_early_signals()

import errno  # noqa: E402  (the imports below come after the early signal handlers on purpose)
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import FrameType, TracebackType  # noqa: E402
from typing import Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.text import Text  # noqa: E402

from moerge.errors import MoergeError  # noqa: E402

# The hub client logs each retry of an unreachable host as two lines; moerge reports the failure once.
os.environ.setdefault("HF_HUB_VERBOSITY", "error")

try:  # typer >= 0.2x ships its own copy of click; older ones use click itself
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - depends on the typer installed
    from click import exceptions as _click_errors

app = typer.Typer(
    name="moerge",
    help="Train, keep, merge, route and compare fine-tuned experts on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, markup=False)


def _register() -> None:
    from moerge.cli import compare, data, demo, evaluate, library, merge, models, route, serve, train
    from moerge.cli.help import lazy_epilog

    app.command("demo")(demo.demo)
    app.command("compare")(compare.compare)
    app.add_typer(models.app, name="models")
    app.add_typer(data.app, name="data")
    app.command("train", cls=lazy_epilog(train.methods_epilog))(train.train)
    app.command("train-library")(train.train_library_command)
    app.command("plan")(train.plan_command)
    app.command("eval")(evaluate.eval_command)
    app.command("generate")(evaluate.generate_command)
    app.command("serve")(serve.serve)
    for module in (library, merge, route):
        module.register(app)


_register()
for _signum, _handler in _early_handlers.items():  # imported: from here on `run()` handles the signals
    signal.signal(_signum, _handler)

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

_CLICK_ERROR: type[Exception] = getattr(typer, "TyperException", _click_errors.ClickException)
"""What click/typer raise for an error they explain themselves (typer's TyperException is the base of
its ClickException; older typers use click's ClickException)."""

_NOT_ENVIRONMENT = {errno.EBADF, errno.EFAULT}
"""OSErrors that say the program is wrong, not the machine: they keep their traceback."""
_PATH_LOCALS = ("filename", "path", "file", "target", "dest", "dst", "folder", "out")
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_QUOTED_PATH = re.compile(r'at path "([^"]+)"')
_ERRNO_TEXT = re.compile(r"^\[Errno \d+\] (.*?)(?:: '.*')?$")


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


def _fail(message: str, status: int = EXIT_USER_ERROR) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", _one_line(message)))
    sys.exit(status)


def _usage_line(exc: Exception) -> str:
    """A click usage error as one line: `moerge train: no such option: --rnak (try --help)`."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "moerge"
    message = _one_line(exc.format_message()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():  # "No such option" -> "no such option"
        message = message[0].lower() + message[1:]
    return f"{where}: {message} (try --help)"


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
        if _printing(frame):
            return "standard output"  # `moerge ... > file` on a full disk: the text printed is not a path
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, os.PathLike) or (isinstance(value, str) and _looks_like_path(value)):
                return _path_text(value)
    return None


_PRINTERS = (os.path.join("rich", "console.py"), os.path.join("click", "utils.py"), os.path.join("typer", "_click"))


def _printing(frame: FrameType) -> bool:
    """Whether `frame` is the console (rich) or echo (click/typer) writing a command's output."""
    where = frame.f_code.co_filename
    return any(part in where for part in _PRINTERS) or frame.f_locals.get("file") is sys.stdout


def _looks_like_path(text: str) -> bool:
    return 0 < len(text) < 4096 and "\n" not in text


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


def _invoke(command: Callable[..., Any]) -> int:
    """Run the typer app (or any callable, for tests) and return its exit status.

    The app runs with click's standalone mode off, so a usage error reaches `run()` as an exception
    instead of being printed as a panel; `typer.Exit(n)` then comes back as the status n, and typer
    turns a KeyboardInterrupt into the status 130. Commands return None (a returned int would be taken
    for a status).
    """
    if not isinstance(command, typer.Typer):
        command()
        return 0
    status = typer.main.get_command(command).main(standalone_mode=False)
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def run(command: Callable[..., Any] = app) -> None:
    """Entry point: a user error, a usage error or an OS failure is one red line on stderr and exit
    status 2, SIGINT and SIGTERM one line and 130 / 143 after the command's cleanup ran; bugs keep
    their traceback."""
    _received.clear()
    previous = _install_signal_handlers()  # first: the module's early handlers are gone by now
    try:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        status = _invoke(command)
    except KeyboardInterrupt:
        _stopped()
    except SystemExit as exc:
        if exc.code == 130 or _received:  # typer turns KeyboardInterrupt into exit status 130
            _stopped()
        raise
    except _click_errors.UsageError as exc:
        if _received:
            _stopped()
        if type(exc).__name__ == "NoArgsIsHelpError":  # `moerge` alone: typer printed the help already
            if exc.format_message().strip():
                print(exc.format_message(), file=sys.stderr)
            sys.exit(exc.exit_code)
        _fail(_usage_line(exc), exc.exit_code)
    except (_CLICK_ERROR, typer.Abort) as exc:  # typer.Abort: a prompt that met the end of its input
        if _received:
            _stopped()
        message = exc.format_message() if isinstance(exc, _CLICK_ERROR) else "aborted"
        _fail(message, getattr(exc, "exit_code", 1))
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
    else:  # outside the handlers above: the SystemExit raised here is final
        if status == 130 or _received:  # typer returns 130 for a KeyboardInterrupt, after the cleanup ran
            _stopped()
        if status:
            sys.exit(status)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
