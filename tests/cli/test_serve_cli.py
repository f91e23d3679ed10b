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


def test_export_vllm_prints_the_launch_command(tiny_base, tmp_path):
    import shlex

    from helpers import parity_rows, write_task
    from moerge.library import ExpertLibrary
    from moerge.recipes.train import train_expert
    from moerge.train.config import TrainConfig

    library = ExpertLibrary.create(tmp_path / "lib")
    task = write_task(tmp_path / "parity.jsonl", parity_rows(20))
    for name, rank in (("small", 4), ("wide", 12)):
        cfg = TrainConfig(
            base=str(tiny_base), task=task, steps=1, batch_size=2, max_length=32, rank=rank, eval_split=None
        )
        train_expert(cfg, tmp_path / name, progress=False)
        library.add(tmp_path / name, name=name)
    result = subprocess.run(
        [sys.executable, "-m", "moerge.cli", "serve", "--library", str(tmp_path / "lib"), "--export-vllm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    args = shlex.split(result.stdout)
    assert args[:3] == ["vllm", "serve", str(tiny_base)] and "--enable-lora" in args
    assert args[args.index("--max-lora-rank") + 1] == "16" and args[args.index("--max-loras") + 1] == "2"
    modules = args[args.index("--lora-modules") + 1 :]
    assert modules == [f"small={library.path('small')}", f"wide={library.path('wide')}"]
