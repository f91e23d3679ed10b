"""The real server on a free local port (tiny models), spoken to with the official `openai` client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import uvicorn

from helpers import addition_rows, parity_rows, write_task
from moerge.data.formats import PLAIN, scoring_format
from moerge.data.task import Example
from moerge.eval.evaluate import generate_answers
from moerge.library import ExpertLibrary
from moerge.library.loading import load_model
from moerge.recipes.train import train_expert
from moerge.route import build_router
from moerge.serve import ModelPool, create_app
from moerge.serve.schemas import ServeError
from moerge.train.config import TrainConfig

KEY = "s3cret"
FAST = {"steps": 3, "batch_size": 4, "max_length": 48, "lr": 5e-3, "rank": 4, "eval_limit": 2}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    """(url, library) of a running server: two experts (one trained in the plain format) and a router."""
    root = tmp_path_factory.mktemp("serve")
    library = ExpertLibrary.create(root / "lib")
    tasks = {"parity": (parity_rows(30), None), "add": (addition_rows(30), "plain")}
    for name, (rows, fmt) in tasks.items():
        cfg = TrainConfig(base=str(tiny_base), task=write_task(root / f"{name}.jsonl", rows), prompt_format=fmt, **FAST)
        train_expert(cfg, root / name, progress=False)
        library.add(root / name, name=name)
    router = build_router("arrow", {n: library.path(n) for n in tasks}, root / "arrow", base=tiny_base)
    pool = ModelPool(base=str(tiny_base), library=library, routers={"arrow": router}, auto="arrow")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pool, api_key=KEY, max_tokens=16), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", library, tiny_base
    server.should_exit = True
    thread.join(timeout=10)


def _http(url: str, body: bytes | dict | None = None, key: str | None = KEY) -> tuple[int, bytes]:
    """(status, body) of a raw request: POST when `body` is given."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def _alone(base: Path, folder: Path, prompt: str, max_tokens: int) -> str:
    """The expert's greedy answer computed directly, in its own prompt format (no server)."""
    from moerge.library.expert import read_expert_meta, recorded_format

    model, tokenizer = load_model(base, folder, merge=True)
    fmt, _ = scoring_format(recorded_format(read_expert_meta(folder)))
    example = Example(prompt, "")
    return generate_answers(
        model, tokenizer, [example], fmt=fmt, batch_size=1, max_new_tokens=max_tokens, progress=False
    )[0]


def test_models_chat_and_completions(served):
    url, library, base = served
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["base", "auto", "arrow", "add", "parity"]
    for expert in ("parity", "add"):
        reply = client.chat.completions.create(
            model=expert, messages=[{"role": "user", "content": "Is 4 even?"}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content == _alone(base, library.path(expert), "Is 4 even?", 8)
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
    completion = client.completions.create(model="base", prompt="1+1=", max_tokens=4, temperature=0)
    assert completion.object == "text_completion" and completion.usage.prompt_tokens == 4


def test_greedy_answers_equal_the_expert_alone_also_under_concurrency(served):
    url, library, base = served
    client = _client(url)
    prompts = [f"Is {i} even?" for i in range(6)]
    jobs = [(expert, p) for p in prompts for expert in ("parity", "add")]
    expected = {(e, p): _alone(base, library.path(e), p, 6) for e, p in jobs}

    def ask(job):
        expert, prompt = job
        reply = client.chat.completions.create(
            model=expert, messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(jobs, pool.map(ask, jobs), strict=True))
    assert answers == expected
    metrics = _http(f"{url}/metrics", key=None)[1].decode()
    alone = _metric(metrics, 'moerge_batch_rows_bucket{le="1.0"}')
    assert _metric(metrics, "moerge_batch_rows_count") > alone  # some requests shared a forward pass


def test_streaming_matches_the_whole_answer(served):
    url, _, _ = served
    client = _client(url)
    messages = [{"role": "user", "content": "Is 12 even?"}]
    whole = client.chat.completions.create(model="add", messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(model="add", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_concurrent_streams_of_own_lengths_and_stops_match_their_whole_answers(served):
    """Streams that share the continuous batch: each sends its own text in order, one finish_reason in
    its last chunk, and says what the same request answers unstreamed."""
    url, _, _ = served
    client = _client(url)
    asks = [
        {"model": model, "messages": [{"role": "user", "content": f"Is {i} even?"}], "max_tokens": 3 + 2 * i}
        for i, model in enumerate(["parity", "add", "base", "parity", "add", "base"])
    ]
    for ask in asks[3:]:
        ask["stop"] = ["e", "1"]
    for ask in asks:
        ask["temperature"] = 0

    def streamed(ask: dict) -> tuple[str, str | None, list[str | None]]:
        chunks = list(client.chat.completions.create(**ask, stream=True))
        reasons = [c.choices[0].finish_reason for c in chunks]
        return "".join(c.choices[0].delta.content or "" for c in chunks), reasons[-1], reasons[:-1]

    with ThreadPoolExecutor(6) as pool:
        streams = list(pool.map(streamed, asks))
    for ask, (text, reason, before) in zip(asks, streams, strict=True):
        whole = client.chat.completions.create(**ask).choices[0]
        assert (text, reason) == (whole.message.content, whole.finish_reason)
        assert set(before) == {None}
        assert not any(stop in text for stop in ask.get("stop", []))


def test_routed_answers_carry_the_routing(served):
    url, _, _ = served
    body = {"model": "auto", "messages": [{"role": "user", "content": "2+2="}], "max_tokens": 4, "temperature": 0}
    status, raw = _http(f"{url}/v1/chat/completions", body)
    assert status == 200
    reply = json.loads(raw)
    routing = reply["moerge"]["routing"]
    assert set(routing) == {"parity", "add"} and abs(sum(routing.values()) - 1) < 1e-3
    typed = _client(url).chat.completions.create(
        model="arrow", messages=[{"role": "user", "content": "2+2="}], max_tokens=4, temperature=0
    )
    assert typed.model_extra["moerge"]["routing"] == routing  # the openai client keeps the extra field


def test_errors_are_openai_json_with_the_right_status(served):
    url, _, _ = served
    client = _client(url)
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], temperature=7)
    with pytest.raises(openai.AuthenticationError):
        _client(url, "wrong").models.list()
    status, raw = _http(f"{url}/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(raw)["error"]["message"] == "the body is not valid JSON"
    long = {"model": "base", "messages": [{"role": "user", "content": "x" * 600}]}
    status, raw = _http(f"{url}/v1/chat/completions", long)
    assert status == 413 and "reads at most 512" in json.loads(raw)["error"]["message"]
    long["stream"] = True  # an error before the first token is a plain error, not a 200 stream
    status, raw = _http(f"{url}/v1/chat/completions", long)
    assert status == 413 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, raw = _http(f"{url}/health", key=None)
    assert status == 200 and json.loads(raw)["status"] == "ok"  # still serving


def test_metrics_count_requests_and_tokens(served):
    url, _, _ = served
    _client(url).chat.completions.create(model="parity", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = _http(f"{url}/metrics", key=None)[1].decode()
    assert 'moerge_requests_total{model="parity",status="200"}' in text
    assert 'moerge_tokens_total{kind="completion",model="parity"}' in text
    assert "moerge_queue_depth" in text and "moerge_request_seconds_bucket" in text


def test_plain_format_expert_is_asked_in_its_format(served):
    """The `add` expert was trained in `plain`: the server renders chat in that format, as eval does."""
    _, library, _ = served
    assert library.meta("add").prompt_format == PLAIN


def test_an_expert_added_while_serving_is_served(served, tmp_path):
    import shutil

    url, library, _ = served
    shutil.copytree(library.path("parity"), tmp_path / "copy")
    library.add(tmp_path / "copy", name="parity-copy")
    client = _client(url)
    assert "parity-copy" in [m.id for m in client.models.list().data]
    messages = [{"role": "user", "content": "Is 7 even?"}]
    answers = [
        client.chat.completions.create(model=m, messages=messages, max_tokens=6, temperature=0)
        .choices[0]
        .message.content
        for m in ("parity", "parity-copy")
    ]
    assert answers[0] == answers[1]
    library.remove("parity-copy")


def test_explain_gives_each_generated_token_its_experts(served):
    url, _, _ = served
    body = {
        "model": "arrow",
        "messages": [{"role": "user", "content": "2+2="}],
        "max_tokens": 6,
        "temperature": 0,
        "moerge": {"explain": True},
    }
    status, raw = _http(f"{url}/v1/chat/completions", body)
    reply = json.loads(raw)
    assert status == 200
    (tokens,) = reply["moerge"]["tokens"]
    assert "".join(t["text"] for t in tokens).startswith(reply["choices"][0]["message"]["content"][:1])
    assert all(set(t["weights"]) == {"parity", "add"} for t in tokens)
    assert all(abs(sum(t["weights"].values()) - 1) < 1e-3 for t in tokens)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
def test_page_lists_models_and_colours_a_routed_answer_offline(served, tmp_path):
    url, _, _ = served
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=20000",
    ]
    page = f"{url}/?model=arrow&prompt=2%2B2%3D#key={KEY}"
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    ).stdout
    assert "<td>parity</td>" in dom and "<td>arrow</td>" in dom  # the models table
    assert 'class="tok"' in dom and 'data-expert="' in dom  # tokens coloured by their expert


def test_32_concurrent_clients_mixed_models_and_streams_all_answered(served):
    url, _, _ = served
    client = _client(url)
    models = ["base", "parity", "add", "arrow", "auto"]

    def ask(i: int) -> str:
        options = {"model": models[i % len(models)], "messages": [{"role": "user", "content": f"q{i}"}]}
        options.update(max_tokens=4, temperature=0 if i % 3 else 0.7, seed=i)
        if i % 2:
            chunks = list(client.chat.completions.create(**options, stream=True))
            return chunks[-1].choices[0].finish_reason
        return client.chat.completions.create(**options).choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        reasons = list(pool.map(ask, range(32)))
    assert all(reason in ("stop", "length") for reason in reasons)
    status, raw = _http(f"{url}/health", key=None)
    assert status == 200 and json.loads(raw)["queue_depth"] == 0


def test_a_client_that_leaves_stops_its_generation(tiny_base):
    """The engine stops a job's generation at the next token once its client is gone."""
    import asyncio

    from moerge.serve.engine import DELTA, DONE, Engine, Job
    from moerge.serve.schemas import ChatRequest

    engine = Engine(ModelPool(base=str(tiny_base)))

    async def leave_after_first_text() -> tuple[int, int]:
        request = ChatRequest(model="base", messages=[{"role": "user", "content": "go"}], temperature=0.7, seed=0)
        job = Job("base", request, 200, asyncio.get_running_loop())
        engine.submit(job)
        deltas = 0
        while True:
            kind, *payload = await job.events.get()
            if kind == DELTA:
                deltas += 1
                job.cancelled.set()  # what the HTTP side does when the client disconnects
            elif kind == DONE:
                return deltas, payload[0].choices[0].tokens

    try:
        deltas, tokens = asyncio.run(leave_after_first_text())
    finally:
        engine.close()
    assert deltas >= 1 and tokens < 20  # stopped within a token or two of leaving, not after 200


def _start(app) -> tuple[str, uvicorn.Server]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def test_proxy_mode_routes_auto_here_and_generates_upstream(served, tmp_path):
    from moerge.errors import MoergeError
    from moerge.serve.proxy import Upstream, check_example_level

    upstream_url, library, base = served
    centroid = build_router("centroid", {n: library.path(n) for n in ("parity", "add")}, tmp_path / "c", base=base)
    pool = ModelPool(base=str(base), library=library, routers={"centroid": centroid}, auto="centroid")
    check_example_level(pool)
    tokenwise = ModelPool(base=str(base), routers={"arrow": tmp_path / "arrow"})
    build_router("arrow", {n: library.path(n) for n in ("parity", "add")}, tmp_path / "arrow", base=base)
    with pytest.raises(MoergeError, match="routes per token"):
        check_example_level(tokenwise)
    url, server = _start(create_app(pool, upstream=Upstream(f"{upstream_url}/v1", pool, KEY)))
    try:
        proxy, direct = _client(url, "unused"), _client(upstream_url)
        messages = [{"role": "user", "content": "Is 3 even?"}]
        ask = {"messages": messages, "max_tokens": 6, "temperature": 0}
        routed = proxy.chat.completions.create(model="auto", **ask)
        expert = routed.model_extra["moerge"]["routed_to"]
        assert expert in ("parity", "add") and set(routed.model_extra["moerge"]["routing"]) == {"parity", "add"}
        same = direct.chat.completions.create(model=expert, **ask)
        assert routed.choices[0].message.content == same.choices[0].message.content
        chunks = list(proxy.chat.completions.create(model="parity", stream=True, **ask))
        whole = direct.chat.completions.create(model="parity", **ask).choices[0].message.content
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
        with pytest.raises(openai.NotFoundError):  # the upstream's own error, relayed
            proxy.chat.completions.create(model="nope", **ask)
    finally:
        server.should_exit = True
    dead = ModelPool(base=str(base))
    url, server = _start(create_app(dead, upstream=Upstream(f"http://127.0.0.1:{_free_port()}/v1", dead)))
    try:
        status, raw = _http(f"{url}/v1/chat/completions", {"model": "base", "messages": messages}, key=None)
        assert status == 502 and "did not answer" in json.loads(raw)["error"]["message"]
    finally:
        server.should_exit = True


def test_a_full_queue_is_a_429(tiny_base):
    import asyncio

    from moerge.serve.engine import Engine, Job
    from moerge.serve.schemas import ChatRequest

    engine = Engine(ModelPool(base=str(tiny_base)), max_queue=1)

    async def two_at_once() -> ServeError:
        request = ChatRequest(model="base", messages=[{"role": "user", "content": "go"}])
        first = Job("base", request, 4, asyncio.get_running_loop())
        engine.submit(first)  # queued or running until it is answered
        with pytest.raises(ServeError) as refused:
            engine.submit(Job("base", request, 4, asyncio.get_running_loop()))
        while (await first.events.get())[0] != "done":
            pass
        return refused.value

    try:
        refused = asyncio.run(two_at_once())
    finally:
        engine.close()
    assert refused.status == 429 and refused.kind == "rate_limit_error"
