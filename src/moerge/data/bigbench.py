"""`bigbench:<task>[/<subtask>]`: BIG-bench JSON tasks read from the bigbench 1.0.0 sdist.

The sdist is only downloaded from the package index (never installed: it needs tensorflow), and only its
`benchmark_tasks/**/task.json` files are extracted, once, into `$MOERGE_HOME/bigbench/`.
`MOERGE_BIGBENCH_SDIST` points at a local copy of the tar.gz instead.

A task name is checked before anything is fetched: until the official sdist is extracted, against the
index of its tasks shipped with moerge (`bigbench_index`), so a misspelt task costs no download; once
extracted (or with a local sdist), against the extracted folders.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import http.client
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from filelock import FileLock

from moerge.data.bigbench_index import SDIST_SHA256 as INDEXED_SHA256
from moerge.data.bigbench_index import known_tasks
from moerge.data.sources import RawTask, task_source
from moerge.data.task import Example
from moerge.errors import MoergeError
from moerge.paths import atomic_directory, moerge_home, write_json_atomic
from moerge.progress import progress_bar

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_ENV = "MOERGE_BIGBENCH_SDIST"
TASKS_DIR = ("bigbench", "benchmark_tasks")
MARKER = "sdist.json"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # PyPI's published hash
DEFAULT_INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def cache_dir() -> Path:
    return moerge_home() / "bigbench"


def _sdist_identity(sdist: Path) -> dict[str, Any]:
    return {"name": sdist.name, "size": sdist.stat().st_size}


class _Index:
    """The package index moerge downloads from: `PIP_INDEX_URL` or PyPI. Credentials in the URL
    (`https://user:token@host/simple`) go into an Authorization header for that host only and are
    never printed."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url.rstrip("/") + "/")
        self.host = parts.hostname or ""
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        netloc = host + (f":{parts.port}" if parts.port else "")
        self.url = urlunsplit(parts._replace(netloc=netloc))
        login = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        self.auth = "Basic " + base64.b64encode(login.encode()).decode() if parts.username else None

    def open(self, url: str, accept: str | None = None) -> Any:
        headers = {"Accept": accept} if accept else {}
        if self.auth and urlsplit(url).hostname == self.host:
            headers["Authorization"] = self.auth
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)

    def sdist_url(self) -> str:
        """The sdist's download address, from the index's JSON simple API (PEP 691)."""
        with self.open(urljoin(self.url, "bigbench/"), SIMPLE_JSON) as response:
            page = response.geturl()  # file links are relative to the project page, after redirects
            try:
                files = json.load(response)["files"]
            except (ValueError, KeyError) as exc:
                raise ValueError("the index does not answer the JSON simple API (PEP 691)") from exc
        for entry in files:
            if entry.get("filename") == SDIST_NAME:
                return urljoin(page, entry["url"])
        raise ValueError(f"the index lists no {SDIST_NAME}")


def _download_sdist(dest: Path) -> Path:
    """Fetch the sdist from the package index into `dest` (a temp file renamed once its sha256 checks).

    Not `pip download`: pip ≥ 24 prepares the sdist's metadata first and then refuses it, because
    bigbench declares a direct-URL dependency (bleurt). Nothing is installed either way.
    """
    dest.mkdir(parents=True, exist_ok=True)
    sdist, index = dest / SDIST_NAME, _Index(os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX))
    print(f"moerge: downloading the BIG-bench task files ({SDIST_NAME}, ~360 MB) into {dest}", file=sys.stderr)
    partial = dest / f".{SDIST_NAME}.{os.getpid()}.part"
    digest = hashlib.sha256()
    try:
        with index.open(index.sdist_url()) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(enabled=sys.stderr.isatty()) as bar:
                job = bar.add_task("bigbench", total=total, info="download")
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(job, advance=len(chunk))
        if digest.hexdigest() != SDIST_SHA256:
            raise ValueError(f"its sha256 is {digest.hexdigest()}, expected {SDIST_SHA256}")
        partial.replace(sdist)
    except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
        raise MoergeError(
            f"bigbench: could not download {SDIST_NAME} from {index.url} ({exc}); put it at {sdist} or set {SDIST_ENV}"
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    return sdist


def _task_file_target(member: tarfile.TarInfo) -> PurePosixPath | None:
    """Path below benchmark_tasks/ for a task.json member, else None (everything else is skipped)."""
    parts = PurePosixPath(member.name).parts
    if not member.isfile() or parts[-1] != "task.json" or ".." in parts:
        return None
    for i in range(len(parts) - 2):
        if parts[i : i + 2] == TASKS_DIR:
            return PurePosixPath(*parts[i + 2 :])
    return None


def _extract(sdist: Path, final: Path) -> None:
    """Copy the task.json files out of the sdist into `final` in one atomic step."""
    with atomic_directory(final, overwrite=True) as tmp:
        count = 0
        try:
            with tarfile.open(sdist, "r:*") as tar:
                for member in tar:
                    target = _task_file_target(member)
                    source = tar.extractfile(member) if target else None
                    if target is None or source is None:
                        continue
                    out = tmp / "benchmark_tasks" / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(source.read())
                    count += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise MoergeError(f"{sdist}: not a readable BIG-bench sdist ({exc})") from None
        if count == 0:
            raise MoergeError(f"{sdist}: holds no bigbench/benchmark_tasks/**/task.json files")
        write_json_atomic(tmp / MARKER, _sdist_identity(sdist))


def _extracted(override: str | None) -> bool:
    """Whether the cache holds the extracted task files of the sdist in use (`override`: a local one)."""
    if override and not Path(override).is_file():
        raise MoergeError(f"{SDIST_ENV}={override}: file not found")
    marker = cache_dir() / MARKER
    wanted = _sdist_identity(Path(override)) if override else None
    return marker.is_file() and (wanted is None or json.loads(marker.read_text()) == wanted)


def _sdist_tasks(sdist: Path) -> dict[str, tuple[str, ...]]:
    """Task → subtasks of an sdist, from its member names alone (nothing is extracted)."""
    found: dict[str, set[str]] = {}
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                target = _task_file_target(member)
                if target is not None and len(target.parts) in (2, 3):
                    found.setdefault(target.parts[0], set()).update(target.parts[1:-1])
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MoergeError(f"{sdist}: not a readable BIG-bench sdist ({exc})") from None
    return {task: tuple(sorted(subtasks)) for task, subtasks in found.items()}


def tasks_root() -> Path:
    """The extracted `benchmark_tasks` folder, extracting (and downloading) it the first time."""
    final = cache_dir()
    override = os.environ.get(SDIST_ENV)
    moerge_home().mkdir(parents=True, exist_ok=True)
    with FileLock(str(moerge_home() / "bigbench.lock")):
        if _extracted(override):
            return final / "benchmark_tasks"
        sdist = Path(override) if override else moerge_home() / "sources" / SDIST_NAME
        if not sdist.is_file():
            sdist = _download_sdist(sdist.parent)
        print(f"moerge: extracting BIG-bench task files into {final}", file=sys.stderr)
        _extract(sdist, final)
    return final / "benchmark_tasks"


def _with_task_json(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "task.json").is_file())


def _unknown(spec: str, kind: str, name: str, known: list[str]) -> MoergeError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"{len(known)} are available"
    return MoergeError(f"{spec}: unknown BIG-bench {kind} {name!r} (JSON tasks only); {hint}")


def check_known_before_extracting(spec: str, task: str, subtask: str | None) -> None:
    """Refuse a task (or subtask) the sdist does not have before it is downloaded or extracted: a local
    sdist (`MOERGE_BIGBENCH_SDIST`) by listing its members, the official one by the shipped index.
    Once extracted, `_read_task_json` checks the extracted folders instead."""
    override = os.environ.get(SDIST_ENV)
    if _extracted(override):
        return
    if override:
        index = _sdist_tasks(Path(override))
    elif SDIST_SHA256 == INDEXED_SHA256:
        index = known_tasks()
    else:
        return  # an sdist the index does not describe: checked once extracted
    if task not in index:
        raise _unknown(spec, "task", task, sorted(index))
    if subtask is not None and subtask not in index[task]:
        raise _unknown(spec, f"subtask of {task}", subtask, list(index[task]))


def _read_task_json(spec: str, root: Path, task: str, subtask: str | None) -> dict[str, Any]:
    """The task.json for task[/subtask], insisting on a subtask where the task only has those."""
    tasks = _with_task_json(root)
    if task not in tasks:
        raise _unknown(spec, "task", task, tasks)
    subtasks = _with_task_json(root / task)
    if subtask is not None and subtask not in subtasks:
        raise _unknown(spec, f"subtask of {task}", subtask, subtasks)
    folder = root / task / subtask if subtask else root / task
    data = json.loads((folder / "task.json").read_text("utf-8"))
    if subtask is None and not data.get("examples") and subtasks:
        shown = ", ".join(subtasks[:12]) + (f", ... ({len(subtasks)} in all)" if len(subtasks) > 12 else "")
        raise MoergeError(f"{spec}: task {task!r} needs a subtask, bigbench:{task}/<subtask>: {shown}")
    return data


def _example(spec: str, index: int, raw: dict[str, Any]) -> Example:
    """`target_scores` makes a multiple-choice example (target = best-scored choice), else `target`."""
    scores = raw.get("target_scores")
    if scores:
        choices = tuple(str(c) for c in scores)
        best = max(scores, key=lambda c: scores[c])
        return Example(input=str(raw["input"]), target=str(best), choices=choices)
    target = raw.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    if target is None:
        raise MoergeError(f"{spec}: example {index} has neither 'target' nor 'target_scores'")
    return Example(input=str(raw["input"]), target=str(target))


@task_source("bigbench", usage="bigbench:<task>[/<subtask>]", prefix="bigbench")
def load_bigbench(spec: str) -> RawTask:
    """Examples of one BIG-bench JSON task; its `description` becomes the task description."""
    name = spec.removeprefix("bigbench:").strip("/")
    task, _, subtask = name.partition("/")
    if not task:
        raise MoergeError(f"{spec}: expected bigbench:<task>[/<subtask>], e.g. bigbench:strategyqa")
    check_known_before_extracting(spec, task, subtask or None)
    data = _read_task_json(spec, tasks_root(), task, subtask or None)
    examples = [_example(spec, i, raw) for i, raw in enumerate(data.get("examples", []))]
    return RawTask(
        name=f"{task}_{subtask}" if subtask else task,
        examples=examples,
        description=str(data.get("description", "")),
    )
