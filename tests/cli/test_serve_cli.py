"""`moerge serve` as a user starts it: it says where it listens, answers, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_starts_answers_and_stops_on_ctrl_c(tiny_base):
    port = _free_port()
    env = {**os.environ, "MOERGE_TEST_KEY": "k"}
    args = ["serve", "--base", str(tiny_base), "--port", str(port), "--api-key-env", "MOERGE_TEST_KEY"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moerge.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"})
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"the server did not start: {proc.communicate(timeout=5)}")
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["base"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert f"moerge serve: http://127.0.0.1:{port}/v1 (base {tiny_base}); models: base" in err
    assert "Traceback" not in err and proc.returncode in (0, 130), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--router", "nowhere"], "--router: nowhere: not a router folder"),
        (
            ["--api-key-env", "MOERGE_UNSET_VARIABLE"],
            "--api-key-env: environment variable MOERGE_UNSET_VARIABLE is not set",
        ),
        (["--port", "0"], "--port: must be at least 1"),
    ],
)
def test_bad_serve_options_are_one_line(tiny_base, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "moerge.cli", "serve", "--base", str(tiny_base), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
