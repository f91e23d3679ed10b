"""BIG-bench tasks from a tiny sdist built here with the real layout (never the 342 MB one)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moerge.data import bigbench, load_task
from moerge.errors import MoergeError

TOP = "bigbench-1.0.0/bigbench/benchmark_tasks"
MC_EXAMPLES = [
    {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(20)
]
FILES = {
    f"{TOP}/evenness/task.json": {
        "name": "evenness",
        "description": "Tell even numbers",
        "examples": MC_EXAMPLES,
    },
    f"{TOP}/echo/task.json": {
        "description": "Repeat",
        "task_prefix": "Repeat the word.\n",
        "examples": [{"input": f"w{i}", "target": [f"w{i}", "alt"]} for i in range(6)]
        + [{"input": "z", "target": "z"}],
    },
    f"{TOP}/sums/task.json": {"name": "sums", "description": "Sums"},
    f"{TOP}/sums/one_digit/task.json": {
        "description": "1-digit sums",
        "examples": [{"input": f"{i}+1=", "target": str(i + 1)} for i in range(9)],
    },
    f"{TOP}/sums/two_digit/task.json": {"examples": [{"input": "10+1=", "target": "11"}]},
}
OTHER = {f"{TOP}/evenness/README.md": "# evenness", "bigbench-1.0.0/setup.py": "print('never run')"}


def make_sdist(path: Path, files: dict[str, object] = FILES) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in {**files, **OTHER}.items():
            data = (content if isinstance(content, str) else json.dumps(content)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = make_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setenv(bigbench.SDIST_ENV, str(path))
    return path


def test_multiple_choice_task(sdist: Path) -> None:
    task = load_task("bigbench:evenness")
    assert task.name == "evenness" and task.description == "Tell even numbers"
    assert task.is_multiple_choice and sum(task.sizes().values()) == 20
    for ex in task.train + task.validation + task.test:
        number = int(ex.input.split()[1])
        assert ex.choices == ("yes", "no") and ex.target == ("yes" if number % 2 == 0 else "no")


def test_free_form_target_takes_first_of_a_list_and_keeps_input(sdist: Path) -> None:
    task = load_task("bigbench:echo")
    examples = {ex.input: ex.target for ex in task.train + task.validation + task.test}
    assert examples == {**{f"w{i}": f"w{i}" for i in range(6)}, "z": "z"}
    assert not task.is_multiple_choice


def test_subtasks(sdist: Path) -> None:
    task = load_task("bigbench:sums/one_digit")
    assert task.name == "sums_one_digit" and task.description == "1-digit sums"
    assert sum(task.sizes().values()) == 9
    with pytest.raises(MoergeError, match=r"bigbench:sums: task 'sums' needs a subtask.*one_digit, two_digit"):
        load_task("bigbench:sums")
    with pytest.raises(MoergeError, match=r"unknown BIG-bench subtask of sums 'one_digits'.*one_digit"):
        load_task("bigbench:sums/one_digits")


def test_unknown_task_suggests_close_names(sdist: Path) -> None:
    with pytest.raises(MoergeError, match=r"bigbench:evennes: unknown BIG-bench task 'evennes'.*evenness"):
        load_task("bigbench:evennes")
    with pytest.raises(MoergeError, match=r"unknown BIG-bench task '\.\.'"):
        load_task("bigbench:../evenness")


def test_limit_is_seeded(sdist: Path) -> None:
    first = load_task("bigbench:evenness", limit=7, seed=5)
    assert sum(first.sizes().values()) == 7
    assert load_task("bigbench:evenness", limit=7, seed=5).data_hash() == first.data_hash()


def test_extracts_only_task_files_once(sdist: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_task("bigbench:evenness")
    extracted = sorted(p.relative_to(isolated_home / "bigbench") for p in (isolated_home / "bigbench").rglob("*.*"))
    assert [str(p) for p in extracted] == [
        "benchmark_tasks/echo/task.json",
        "benchmark_tasks/evenness/task.json",
        "benchmark_tasks/sums/one_digit/task.json",
        "benchmark_tasks/sums/task.json",
        "benchmark_tasks/sums/two_digit/task.json",
        "sdist.json",
    ]

    def no_second_extraction(*args: object) -> None:
        raise AssertionError("extracted twice")

    monkeypatch.setattr(bigbench, "_extract", no_second_extraction)
    assert load_task("bigbench:echo").name == "echo"


def test_a_different_sdist_is_extracted_again(sdist: Path) -> None:
    load_task("bigbench:evenness")
    make_sdist(sdist, {f"{TOP}/fresh/task.json": {"examples": [{"input": "a", "target": "b"}]}})
    assert load_task("bigbench:fresh").name == "fresh"
    with pytest.raises(MoergeError, match="unknown BIG-bench task 'evenness'"):
        load_task("bigbench:evenness")


def test_bad_sdist_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bigbench.SDIST_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(MoergeError, match=r"MOERGE_BIGBENCH_SDIST=.*missing\.tar\.gz: file not found"):
        load_task("bigbench:evenness")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tarball")
    monkeypatch.setenv(bigbench.SDIST_ENV, str(broken))
    with pytest.raises(MoergeError, match="not a readable BIG-bench sdist"):
        load_task("bigbench:evenness")


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """A local package index (PEP 691 JSON) serving a tiny sdist; PIP_INDEX_URL points at it."""
    served = make_sdist(tmp_path / "served.tar.gz").read_bytes()
    state: dict[str, object] = {"requests": []}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["requests"].append((self.path, self.headers.get("Accept")))
            state.setdefault("auth", []).append(self.headers.get("Authorization"))
            if self.path == "/simple/bigbench/" and state.get("html_only"):
                body, kind = b"<html><body>no JSON here</body></html>", "text/html"
            elif self.path == "/simple/bigbench/":
                # relative to the project page, as PEP 503/691 allow
                files = [{"filename": bigbench.SDIST_NAME, "url": "../../files/sdist.tar.gz", "hashes": {}}]
                body, kind = json.dumps({"files": files}).encode(), bigbench.SIMPLE_JSON
            elif self.path == "/files/sdist.tar.gz":
                body, kind = served, "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv(bigbench.SDIST_ENV, raising=False)
    state["url"] = f"http://127.0.0.1:{server.server_port}/simple"
    monkeypatch.setenv("PIP_INDEX_URL", state["url"])
    monkeypatch.setattr(bigbench, "SDIST_SHA256", hashlib.sha256(served).hexdigest())
    yield state
    server.shutdown()


def test_downloads_from_the_package_index_when_absent(index: dict[str, object], isolated_home: Path) -> None:
    assert load_task("bigbench:evenness").name == "evenness"
    assert load_task("bigbench:echo").name == "echo"
    assert index["requests"] == [
        ("/simple/bigbench/", bigbench.SIMPLE_JSON),
        ("/files/sdist.tar.gz", None),
    ]  # once, and never through pip (which refuses bigbench's metadata)
    sources = isolated_home / "sources"
    assert sorted(p.name for p in sources.iterdir()) == [bigbench.SDIST_NAME]


def test_a_download_with_the_wrong_checksum_is_not_kept(
    index: dict[str, object], isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bigbench, "SDIST_SHA256", "0" * 64)
    with pytest.raises(MoergeError, match=r"its sha256 is [0-9a-f]{64}, expected 0{64}"):
        load_task("bigbench:evenness")
    assert list((isolated_home / "sources").iterdir()) == []


def test_index_credentials_are_sent_as_a_header_and_never_printed(
    index: dict[str, object], isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", str(index["url"]).replace("http://", "http://me:s%40cret@"))
    assert load_task("bigbench:evenness").name == "evenness"
    expected = "Basic " + base64.b64encode(b"me:s@cret").decode()
    assert index["auth"] == [expected, expected]
    monkeypatch.setattr(bigbench, "SDIST_SHA256", "0" * 64)
    shutil.rmtree(isolated_home / "bigbench")
    (isolated_home / "sources" / bigbench.SDIST_NAME).unlink()
    with pytest.raises(MoergeError) as failure:
        load_task("bigbench:evenness")
    assert "cret" not in str(failure.value) and "me:" not in str(failure.value)


def test_an_index_without_the_json_api_is_named_as_the_problem(index: dict[str, object], isolated_home: Path) -> None:
    index["html_only"] = True
    with pytest.raises(MoergeError, match=r"JSON simple API \(PEP 691\).*MOERGE_BIGBENCH_SDIST"):
        load_task("bigbench:evenness")


def test_failed_download_says_how_to_fix_it(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bigbench.SDIST_ENV, raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    with pytest.raises(MoergeError, match=r"could not download .*127\.0\.0\.1.*MOERGE_BIGBENCH_SDIST"):
        load_task("bigbench:intent_recognition")  # a task of the real sdist: unknown ones are refused first


def test_unknown_tasks_are_refused_before_downloading_or_extracting(
    sdist: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MoergeError, match=r"unknown BIG-bench task 'evennes'.*did you mean evenness"):
        load_task("bigbench:evennes")  # a local sdist: its member names are listed, nothing is extracted
    with pytest.raises(MoergeError, match=r"unknown BIG-bench subtask of sums 'three_digit'.*two_digit"):
        load_task("bigbench:sums/three_digit")
    assert not (isolated_home / "bigbench").exists()
    monkeypatch.delenv(bigbench.SDIST_ENV)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # never asked: the shipped index answers
    with pytest.raises(MoergeError, match=r"unknown BIG-bench task 'intent_recognitoin'.*intent_recognition"):
        load_task("bigbench:intent_recognitoin")
    with pytest.raises(MoergeError, match=r"unknown BIG-bench subtask of arithmetic '9_digit_addition'"):
        load_task("bigbench:arithmetic/9_digit_addition")
    assert not (isolated_home / "sources").exists() and not (isolated_home / "bigbench").exists()


def test_the_shipped_index_lists_the_real_sdist() -> None:
    from moerge.data import bigbench_index

    tasks = bigbench_index.known_tasks()
    assert bigbench_index.SDIST_SHA256 == bigbench.SDIST_SHA256
    assert len(tasks) == 167 and sum(map(len, tasks.values())) == 874
    assert "intent_recognition" in tasks and "1_digit_addition" in tasks["arithmetic"]
