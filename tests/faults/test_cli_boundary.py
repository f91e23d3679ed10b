"""The CLI boundary before and around a command: usage errors and signals while moerge starts.

A usage error (unknown option or command, missing argument, a value of the wrong type) is one line on
stderr, `error: <command path>: <what> (try --help)`, exit status 2 — not typer's multi-line panel —
while `--help` stays typer's help. Ctrl-C or SIGTERM arriving while the CLI is still importing its
modules (before `run()` installs its handlers) is the line `interrupted` / `terminated` and 130 / 143,
not a traceback: each case sends the signal from inside a chosen import, so nothing depends on timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from faultkit import QUIET_ENV, assert_refused, moerge

# ---- usage errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--rnak", "3"], "train: no such option: --rnak"),
        (["library", "add"], "library add: missing argument 'path'"),
        (["train", "--rank", "x"], "train: invalid value for '--rank'"),
        (["trian"], "no such command 'trian'"),
    ],
    ids=["unknown-option", "missing-argument", "bad-value", "unknown-command"],
)
def test_a_usage_error_is_one_line_and_status_2(tmp_path, args, says):
    result = moerge(*args, cwd=tmp_path)
    line = assert_refused(result, says)
    assert line.endswith("(try --help)"), line
    assert "╭" not in result.stderr and result.stdout == ""


def test_help_is_still_typers_help(tmp_path):
    result = moerge("train", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "Usage:" in result.stdout and "--rank" in result.stdout and "╭" in result.stdout


def test_no_command_prints_the_help_as_before(tmp_path):
    result = moerge(cwd=tmp_path)
    assert result.returncode == 2 and "Usage:" in result.stdout and "Commands" in result.stdout
    assert "error" not in result.stderr and "Traceback" not in result.stderr


# ---- a signal while the CLI is still importing ------------------------------------------------------------

SIGNAL_ON_IMPORT = r"""
import os, signal, sys, time

target, sig = sys.argv[1], int(sys.argv[2])


class SignalOnImport:
    # The signal arrives while `target` is being imported (as `moerge --help` starts up).
    def find_spec(self, name, path=None, module=None):
        if name == target:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), sig)
            time.sleep(30)  # its handler runs here
        return None


assert target not in sys.modules
sys.meta_path.insert(0, SignalOnImport())
sys.argv = ["moerge", "--help"]
from moerge.cli.main import run

run()
"""


@pytest.mark.parametrize("target", ["typer", "moerge.cli.train"], ids=["first-import", "command-modules"])
@pytest.mark.parametrize(
    ("sig", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["sigint", "sigterm"],
)
def test_a_signal_while_importing_is_one_line(tmp_path, target, sig, status, word):
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_ON_IMPORT, target, str(int(sig))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **QUIET_ENV},
        timeout=120,
    )
    assert (result.returncode, result.stderr.split()) == (status, [word]), result.stderr
    assert result.stdout == ""  # stopped before the help was printed


def test_importing_the_cli_leaves_the_signal_handlers_as_they_were(tmp_path):
    check = (
        "import signal, moerge.cli.main; "
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
        "signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.split() == ["True", "True"], result.stderr


# ---- the typer app's own outcomes, through run() in this process ------------------------------------------


def one_command_app(body):
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(body)
    return app


@pytest.mark.parametrize(
    ("sig", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["sigint", "sigterm"],
)
def test_a_signal_in_a_typer_command_is_one_line(capsys, monkeypatch, sig, status, word):
    """typer hands a KeyboardInterrupt back as the status 130: still one line, once."""
    import time

    from moerge.cli.main import run

    cleaned = []

    def stopped():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(30)
        finally:
            cleaned.append(sig)

    monkeypatch.setattr(sys, "argv", ["moerge"])
    with pytest.raises(SystemExit) as stop:
        run(one_command_app(stopped))
    assert (stop.value.code, capsys.readouterr().err.split(), cleaned) == (status, [word], [sig])


def test_a_typer_exit_status_is_kept(capsys, monkeypatch):
    import typer

    from moerge.cli.main import run

    def unhealthy():
        print("1 problem")
        raise typer.Exit(3)

    monkeypatch.setattr(sys, "argv", ["moerge"])
    with pytest.raises(SystemExit) as stop:
        run(one_command_app(unhealthy))
    out = capsys.readouterr()
    assert (stop.value.code, out.out, out.err) == (3, "1 problem\n", "")
