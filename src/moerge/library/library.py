"""The expert library: a folder of expert folders plus an SQLite catalog, safe under crashes and writers.

Layout of a library root (a local folder or any fsspec URL):
    library.json           marks the folder as a library
    catalog.sqlite         the index (local libraries; remote ones keep it in the local cache)
    <name>/                one expert folder each (see expert.py)
    .lock, .tmp-*, .old-*, .pending-*   bookkeeping; never listed as experts

Every change goes: copy into a temp folder inside the library, verify the sha256s, then, under a file
lock, write a `.pending-<name>` marker, swap the folder in by rename, update the catalog and drop the
marker. A crash leaves the marker behind; the next writer (or opener) finishes or undoes the swap, so
the library shows either the old state or the new one.

Only regular files are copied in: a symbolic link, FIFO, socket or device in the source folder is
refused (or, with `skip_links`, left out), so nothing from outside it reaches the library. A temp
folder is locked by the add that writes it (created under the library lock), so a temp folder
nobody holds is the leftover of an add that died, even by SIGKILL: `verify` reports it, and `rebuild`
and the next writer remove it. Remote libraries cannot lock a folder; there a temp folder older
than STALE_TMP_SECONDS counts as left over. Derived artifacts (`<name>/artifacts/*.safetensors`) are
written the same way through a locked temp file beside them (`*.tmp`), reported and removed alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem

from moerge.data.formats import PromptFormat
from moerge.errors import MoergeError
from moerge.library import artifacts
from moerge.library.adapter import check_adapter_files
from moerge.library.catalog import Catalog
from moerge.library.expert import (
    ARTIFACTS_DIR,
    METADATA_FILE,
    ExpertMeta,
    check_expert_intact,
    parse_expert_meta,
    read_expert_meta,
    verify_expert_files,
)
from moerge.paths import CAN_LOCK, atomic_directory, copy_regular_tree, hold, in_use, moerge_home, special_entries

MARKER_FILE = "library.json"
CATALOG_FILE = "catalog.sqlite"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
PENDING_PREFIX = ".pending-"
STALE_TMP_SECONDS = 3600.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_ARTIFACT_TMP = re.compile(r".+\.(?:(\d+)-)?[0-9a-f]{8}\.tmp")
"""An artifact write's temp file: `<kind>.safetensors.<time>-<id>.tmp` (older moerge: no time)."""
_RESERVED = {MARKER_FILE, CATALOG_FILE}


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for a library location; an unknown scheme or a missing backend is one line."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:
        raise MoergeError(f"{url}: cannot open this library location ({exc})") from None


def validate_name(name: Any, what: str = "expert name") -> str:
    """Refuse names that could escape the library or collide with its own files."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise MoergeError(
            f"{what} {name!r}: use 1-128 letters, digits, '.', '_', '+' or '-', "
            "not starting with '.' and without path separators"
        )
    return name


SKIP_HINT = " into a library (remove it, or pass --skip-links to leave it out)"


def _check_source(folder: Path, skip_links: bool) -> list[str]:
    """Refuse a source folder holding a symlink or special file (unless `skip_links`); returns what the
    copy will leave out. moerge.json itself must always be a regular file."""
    if not folder.is_dir():
        return []  # reading its moerge.json gives the error
    found = special_entries(folder)
    for rel, what in found:
        if rel == METADATA_FILE:
            raise MoergeError(f"{folder / rel}: is {what}; an expert's moerge.json must be a regular file")
        if not skip_links:
            raise MoergeError(f"{folder / rel}: is {what}; only regular files are copied{SKIP_HINT}")
    return [rel for rel, _ in found]


def _metric_value(metrics: dict[str, Any], dotted: str) -> Any:
    """`metrics["a"]["b"]` for "a.b"; None when absent."""
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _meta_json(meta: ExpertMeta) -> bytes:
    return (json.dumps(meta.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


@dataclass
class VerifyReport:
    """What `verify` found; `ok` is False when anything needs attention."""

    checked: int = 0
    corrupted: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # bookkeeping entries of writers that died

    @property
    def ok(self) -> bool:
        return not (self.corrupted or self.missing or self.unregistered or self.leftovers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "corrupted": self.corrupted,
            "missing": self.missing,
            "unregistered": self.unregistered,
            "leftovers": self.leftovers,
        }


class ExpertLibrary:
    """Open an existing library at a local path or fsspec URL (`ExpertLibrary.create` makes one)."""

    def __init__(self, location: str | Path, *, repair_catalog: bool = False) -> None:
        """Open a library. `repair_catalog` (for `rebuild`): an unreadable catalog is set aside and
        rebuilt from the experts' folders instead of refused."""
        self.url = str(location)
        self.fs, root = _filesystem(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = posixpath.normpath(root) if self.local else root.rstrip("/")
        if not self.fs.isfile(self._p(MARKER_FILE)):
            raise MoergeError(f"{self.url}: not a moerge library (create one with `moerge library create`)")
        canonical = self.fs.unstrip_protocol(self.root)
        self.state_dir = (
            Path(self.root)
            if self.local
            else moerge_home() / "libraries" / hashlib.sha256(canonical.encode()).hexdigest()[:16]
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.state_dir / LOCK_FILE))
        fresh = not (self.state_dir / CATALOG_FILE).is_file()
        self.catalog = Catalog(self.state_dir / CATALOG_FILE, repair=repair_catalog)
        if self._entries(PENDING_PREFIX):
            with self._lock:
                self._recover()
        # A remote catalog is a local cache: rebuild it when missing or when others changed the folders.
        if fresh or (not self.local and set(self._folders()) != set(self.catalog.names())):
            self.rebuild()

    @classmethod
    def create(cls, location: str | Path) -> ExpertLibrary:
        """Make an empty library; refuses a folder that already holds something."""
        fs, root = _filesystem(str(location))
        marker = posixpath.join(root, MARKER_FILE)
        if fs.isfile(marker):
            raise MoergeError(f"{location}: already a moerge library")
        if fs.exists(root) and (not fs.isdir(root) or fs.ls(root)):
            raise MoergeError(f"{location}: exists and is not an empty folder; choose a new path")
        existed = fs.exists(root)
        fs.makedirs(root, exist_ok=True)
        try:
            fs.pipe_file(marker, json.dumps({"format": 1, "created": time.time()}).encode())
            return cls(location)
        except BaseException:  # a full disk, an interrupt: no half-made library is left to trip over
            with contextlib.suppress(OSError):  # the folder was new or empty: all in it is ours
                for child in fs.ls(root, detail=False):
                    fs.rm(child, recursive=True)
                if not existed:
                    fs.rmdir(root)
            raise

    # ---- storage helpers -------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _entries(self, prefix: str) -> list[str]:
        """Base names of the root's entries starting with `prefix`."""
        names = (posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))
        return sorted(n for n in names if n.startswith(prefix))

    def _folders(self) -> list[str]:
        """Folders that look like experts (everything not hidden)."""
        out = []
        for entry in self.fs.ls(self.root, detail=True):
            base = posixpath.basename(entry["name"].rstrip("/"))
            if entry["type"] == "directory" and not base.startswith("."):
                out.append(base)
        return sorted(out)

    def _read_meta(self, folder: str) -> ExpertMeta:
        path = posixpath.join(folder, METADATA_FILE)
        if not self.fs.isfile(path):
            raise MoergeError(f"{self.fs.unstrip_protocol(path)}: not found (not an expert folder)")
        return parse_expert_meta(self.fs.cat_file(path), self.fs.unstrip_protocol(path))

    def _problems(self, folder: str, meta: ExpertMeta | None = None) -> list[str]:
        """sha256 problems of a folder in the library (remote folders are checked on a local copy)."""
        try:
            meta = meta or self._read_meta(folder)
            if self.local:
                return verify_expert_files(Path(folder), meta)
            with tempfile.TemporaryDirectory() as tmp:
                self.fs.get(folder.rstrip("/") + "/", tmp, recursive=True)
                return [p.replace(tmp, self.fs.unstrip_protocol(folder)) for p in verify_expert_files(Path(tmp), meta)]
        except MoergeError as exc:
            return [str(exc)]

    def _upload(self, src: Path, dest: str, skip_links: bool) -> None:
        """Copy the regular files below `src` to `dest` (a symlink or special file refuses the copy,
        or is left out with `skip_links`)."""
        if self.local:
            copy_regular_tree(src, dest, skip_special=skip_links, hint=SKIP_HINT, into=self.url)
            return
        special = {rel for rel, _ in special_entries(src)}
        for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not Path(dirpath, d).is_symlink())
            for name in sorted(filenames):
                rel = Path(dirpath, name).relative_to(src).as_posix()
                if rel not in special:
                    self.fs.makedirs(posixpath.dirname(posixpath.join(dest, rel)), exist_ok=True)
                    self.fs.put_file(str(Path(dirpath, name)), posixpath.join(dest, rel))

    @contextlib.contextmanager
    def _new_temp(self, name: str):
        """A fresh temp folder path inside the library, removed on the way out unless swapped in.

        Locally the folder is created and locked under the library lock, which every cleaner holds,
        so a cleaner never mistakes it for a dead add's leftover.
        """
        tmp = self._p(f"{TMP_PREFIX}{time.time():.0f}-{uuid.uuid4().hex[:8]}-{name}")
        with contextlib.ExitStack() as held:
            try:
                if self.local:
                    with self._lock:
                        os.mkdir(tmp)
                        held.enter_context(hold(tmp))
                yield tmp
            finally:
                self._remove_tree(tmp)

    def _remove_tree(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ---- the atomic swap and its recovery --------------------------------------------------------

    def _swap(self, name: str, new_folder: str | None, meta: ExpertMeta | None) -> None:
        """Under the lock: put `new_folder` in place of `name` (or remove it when None), then index it.

        The steps: write the `.pending-<name>` marker, set the old folder aside (`.old-<name>`), rename
        the new one in, commit its catalog row (or delete the row); then drop the marker and the old
        folder. Folder and row agree at whatever point this is stopped:

        - an exception (a signal included) anywhere up to and including the catalog commit undoes both
          halves: `_undo_swap` puts the old folder back by looking at what is on disk (not at how far
          this got, which a signal between a rename and the next line would misstate), then re-derives
          the row from that folder, so a row committed just before the exception is replaced too;
        - once the row is committed the swap is done: a failure while dropping the marker or the old
          folder leaves only bookkeeping, which `_recover` (re-deriving the row from the folder on disk)
          and the orphan sweep tidy;
        - a crash (SIGKILL) or an undo that fails itself leaves the marker for `_recover`, which keeps
          whichever folder is intact and re-derives the row from it.
        """
        final, old, pending = self._p(name), self._p(OLD_PREFIX + name), self._p(PENDING_PREFIX + name)
        had_old = self.fs.exists(final)
        self.fs.pipe_file(pending, b"")
        try:
            if had_old:
                self.fs.mv(final, old, recursive=True)
            if new_folder is None:
                self.catalog.delete(name)
            else:
                self.fs.mv(new_folder, final, recursive=True)
                self.catalog.upsert(name, meta)
        except BaseException:
            with contextlib.suppress(Exception):  # a failing undo leaves the marker for `_recover`
                self._undo_swap(name, had_old, new_folder)
                self.fs.rm(pending)
            raise
        self.fs.rm(pending)
        self._remove_tree(old)

    def _undo_swap(self, name: str, had_old: bool, new_folder: str | None) -> None:
        """Put back the state before an interrupted `_swap`: the old folder (or none) and its row."""
        final, old = self._p(name), self._p(OLD_PREFIX + name)
        if self.fs.exists(old):  # the old folder was set aside: whatever is at `final` now is the new one
            self._remove_tree(final)
            self.fs.mv(old, final, recursive=True)
        elif not had_old:
            self._remove_tree(final)  # nothing was there before: whatever is there now is the new one
        self._reindex(name)

    def _reindex(self, name: str) -> None:
        """The catalog row of `name` re-derived from its folder, as `rebuild` does: from its moerge.json,
        or no row when the folder is missing or holds no readable one."""
        final = self._p(name)
        try:
            meta = self._read_meta(final) if self.fs.exists(final) else None
        except MoergeError:
            meta = None
        if meta is None:
            self.catalog.delete(name)
        else:
            self.catalog.upsert(name, meta.model_copy(update={"name": name}))

    def _recover(self) -> None:
        """Under the lock: finish or undo swaps a crash interrupted, and drop orphaned old folders."""
        for marker in self._entries(PENDING_PREFIX):
            name = marker[len(PENDING_PREFIX) :]
            final, old = self._p(name), self._p(OLD_PREFIX + name)
            if self.fs.exists(final) and self.fs.exists(old) and self._problems(final):
                self._remove_tree(final)  # a half-moved new folder (non-atomic stores): keep the old one
            if not self.fs.exists(final) and self.fs.exists(old):
                self.fs.mv(old, final, recursive=True)
            self._reindex(name)
            self.fs.rm(self._p(marker))
        for orphan in self._entries(OLD_PREFIX):
            self._remove_tree(self._p(orphan))

    def _dead(self, path: str, started: str) -> bool:
        """Whether the temp folder or file at `path` is a dead writer's: nobody holds its lock (local),
        or, where nothing can be locked, it was started (`started`, the time in its name) more than
        STALE_TMP_SECONDS ago."""
        if self.local and CAN_LOCK:
            return not in_use(path)
        try:
            return time.time() - float(started) > STALE_TMP_SECONDS
        except ValueError:
            return True

    def _stale_temps(self) -> list[str]:
        """Temp folders of adds that died (their name starts with the time they were started)."""
        return [
            entry
            for entry in self._entries(TMP_PREFIX)
            if self._dead(self._p(entry), entry[len(TMP_PREFIX) :].split("-", 1)[0])
        ]

    def _remove_stale_temps(self) -> None:
        """Under the lock: remove the temp folders of adds that died."""
        for entry in self._stale_temps():
            self._remove_tree(self._p(entry))

    def _stale_artifact_temps(self, names: list[str] | None = None) -> list[str]:
        """Temp files of artifact writes that died (`<expert>/artifacts/<kind>.safetensors.<time>-<id>.tmp`,
        see `save_artifact`), as paths relative to the library root; of every expert folder, or `names`."""
        stale = []
        for name in self._folders() if names is None else names:
            folder = self._p(name, ARTIFACTS_DIR)
            if not self.fs.isdir(folder):
                continue
            for entry in sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(folder, detail=False)):
                match = _ARTIFACT_TMP.fullmatch(entry)
                if match and self._dead(posixpath.join(folder, entry), match.group(1) or ""):
                    stale.append(posixpath.join(name, ARTIFACTS_DIR, entry))
        return stale

    def _remove_stale_artifact_temps(self, names: list[str] | None = None) -> None:
        """Under the lock: remove the temp files of artifact writes that died."""
        for rel in self._stale_artifact_temps(names):
            self._remove_tree(self._p(rel))

    def _leftovers(self) -> list[str]:
        """What writers that died left in the library: stale temp copies, set-aside old folders,
        unfinished swap markers (the last two only outside a swap, i.e. under the lock) and stale
        artifact temp files (`<expert>/artifacts/*.tmp`)."""
        found = self._stale_temps() + self._entries(OLD_PREFIX) + self._entries(PENDING_PREFIX)
        return sorted(found + self._stale_artifact_temps())

    # ---- public API --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return self.catalog.names()

    def list(
        self,
        task: str | None = None,
        method: str | None = None,
        base: str | None = None,
        metric: str | None = None,
        min_value: float | None = None,
    ) -> list[ExpertMeta]:
        """Registered experts matching all filters; `metric` keeps experts reporting it (dotted for nested),
        `min_value` additionally requires it to be at least that."""
        metas = self.catalog.query(task=task, method=method, base=base)
        if metric is None:
            if min_value is not None:
                raise MoergeError("list: min_value needs a metric name")
            return metas
        out = []
        for meta in metas:
            value = _metric_value(meta.metrics, metric)
            if isinstance(value, (int, float)) and (min_value is None or value >= min_value):
                out.append(meta)
        return out

    def meta(self, name: str) -> ExpertMeta:
        meta = self.catalog.get(validate_name(name))
        if meta is None:
            raise MoergeError(f"{self.url}: no expert named {name!r} (see `moerge library list`)")
        return meta

    def path(self, name: str) -> Path:
        """A local folder with the expert's files, refused when any file fails its sha256."""
        self.meta(name)
        if not self.fs.isdir(self._p(name)):
            raise MoergeError(
                f"refusing to load expert {name!r}: its folder is missing from {self.url} (see `moerge library verify`)"
            )
        folder = Path(self._p(name)) if self.local else self._cached_copy(name)
        check_expert_intact(folder)
        return folder

    def _cached_copy(self, name: str) -> Path:
        """Download a remote expert into the local cache unless the cached copy is current."""
        dest = self.state_dir / "experts" / name
        remote_meta = self.fs.cat_file(self._p(name, METADATA_FILE))
        cached = dest / METADATA_FILE
        if cached.is_file() and cached.read_bytes() == remote_meta:
            return dest
        with atomic_directory(dest, overwrite=True) as tmp:
            self.fs.get(self._p(name) + "/", str(tmp), recursive=True)
        return dest

    def add(
        self, folder: str | Path, name: str | None = None, overwrite: bool = False, skip_links: bool = False
    ) -> str:
        """Copy an expert folder in (regular files only, verified, atomic) and register it; returns its
        name in the library. A symbolic link, FIFO, socket or device in `folder` is refused, or left
        out with `skip_links` (never one that moerge.json lists)."""
        folder = Path(folder)
        skipped = _check_source(folder, skip_links)
        meta = read_expert_meta(folder)
        if meta.kind != "full":
            check_adapter_files(folder)  # before copying: a pickled expert is named with how to convert it
        needed = [rel for rel in skipped if rel in meta.files]
        if needed:
            raise MoergeError(
                f"{folder / needed[0]}: is not a regular file but moerge.json lists it, so it cannot be "
                "left out; only regular files are copied into a library"
            )
        name = validate_name(meta.name if name is None else name)
        self._refuse_clobber(name, overwrite)
        meta = meta.model_copy(update={"name": name})
        with self._new_temp(name) as tmp:
            self._upload(folder, tmp, skip_links)
            problems = self._problems(tmp, meta)
            if problems:
                raise MoergeError(f"{folder}: copy failed verification ({problems[0]}); nothing was added")
            self.fs.pipe_file(posixpath.join(tmp, METADATA_FILE), _meta_json(meta))
            with self._lock:
                self._recover()
                self._remove_stale_temps()
                self._refuse_clobber(name, overwrite)
                self._swap(name, tmp, meta)
        return name

    def _refuse_clobber(self, name: str, overwrite: bool) -> None:
        """A name taken by an expert needs `overwrite`; a folder of that name that is not a registered
        expert (yours, put there by hand) is never replaced."""
        registered = self.catalog.get(name) is not None
        if self.fs.exists(self._p(name)) and not registered:
            raise MoergeError(
                f"{self.url}: {name!r} is a folder the catalog does not list as an expert; it is left alone "
                "(move it away, or run `moerge library rebuild` if it is an expert)"
            )
        if registered and not overwrite:
            raise MoergeError(f"{self.url}: expert {name!r} already exists (pass --overwrite to replace it)")

    def import_peft(
        self,
        adapter_dir: str | Path,
        *,
        task: str,
        base: str,
        name: str | None = None,
        prompt_format: PromptFormat | None = None,
        overwrite: bool = False,
    ) -> str:
        """Add a plain peft adapter (no moerge.json): metadata from its config, the base checked, the
        prompt format it was trained with recorded (`unknown` when not given)."""
        from moerge.library.expert import write_expert_meta
        from moerge.library.peft_import import peft_meta, stage_peft_files

        adapter_dir = Path(adapter_dir)
        name = validate_name(adapter_dir.resolve().name if name is None else name)
        meta = peft_meta(adapter_dir, task=task, base=base, name=name, prompt_format=prompt_format)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / name
            stage_peft_files(adapter_dir, staged)
            write_expert_meta(staged, meta)
            return self.add(staged, name=name, overwrite=overwrite)

    def remove(self, name: str) -> None:
        validate_name(name)
        with self._lock:
            self._recover()
            self._remove_stale_temps()
            if self.catalog.get(name) is None:  # only what the library registered: never a folder of yours
                hint = (
                    " (a folder of that name is not a registered expert: left alone)"
                    if self.fs.exists(self._p(name))
                    else ""
                )
                raise MoergeError(f"{self.url}: no expert named {name!r}{hint} (see `moerge library list`)")
            self._swap(name, None, None)

    def export(self, name: str, dest: str | Path, *, peft_only: bool = False) -> Path:
        """Write the expert to a new local folder: its payload (peft's files) and `moerge.json`, so the
        folder loads in peft and `library add` elsewhere keeps its record (prompt format, provenance,
        hashes); `peft_only` leaves `moerge.json` out. Derived artifacts are never exported."""
        src, meta = self.path(name), self.meta(name)
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise MoergeError(f"{dest}: exists and is not an empty folder; choose a new one")
        with atomic_directory(dest, overwrite=True) as tmp:
            for rel in [*meta.files, *([] if peft_only else [METADATA_FILE])]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, tmp / rel)
        return dest

    def verify(self) -> VerifyReport:
        """Recompute every registered file's sha256; report corrupted, missing and unregistered experts,
        and what writers that died left behind (temp copies, set-aside folders, swap markers)."""
        try:
            with self._lock:
                leftovers = self._leftovers()
        except OSError:  # a library we may not write to: report what is there without the lock
            leftovers = self._leftovers()
        registered, folders = set(self.catalog.names()), set(self._folders())
        report = VerifyReport(
            missing=sorted(registered - folders), unregistered=sorted(folders - registered), leftovers=leftovers
        )
        for name in sorted(registered & folders):
            report.checked += 1
            problems = self._problems(self._p(name))
            if not problems and self._read_meta(self._p(name)).files != self.meta(name).files:
                problems = ["catalog entry differs from moerge.json (run `moerge library rebuild`)"]
            if problems:
                report.corrupted[name] = problems
        return report

    def rebuild(self) -> list[str]:
        """Regenerate the catalog from the folders' moerge.json files (folders without one are skipped),
        after finishing interrupted swaps and removing what writers that died left behind (temp copies,
        set-aside folders, artifact temp files)."""
        with self._lock:
            self._recover()
            self._remove_stale_temps()
            self._remove_stale_artifact_temps()
            entries = []
            for name in self._folders():
                try:
                    meta = self._read_meta(self._p(name))
                except MoergeError:
                    continue
                entries.append((name, meta.model_copy(update={"name": name})))
            self.catalog.replace_all(entries)
        return [name for name, _ in entries]

    # ---- derived artifacts -------------------------------------------------------------------------

    def artifact_path(self, name: str, kind: str) -> Path | str:
        """Where an artifact lives: a Path for local libraries, an fsspec URL for remote ones."""
        self.meta(name)
        path = self._p(name, ARTIFACTS_DIR, f"{validate_name(kind, 'artifact kind')}.safetensors")
        return Path(path) if self.local else self.fs.unstrip_protocol(path)

    def save_artifact(self, name: str, kind: str, key: dict[str, Any], tensors: dict[str, Any]) -> Path | str:
        """Store tensors derived from expert `name`, stamped with `key` (and the expert's file hashes).

        Written to a temp file beside the target and renamed over it. Locally the temp file is created
        and locked under the library lock (as `_new_temp` does for folders), so one a writer that died
        left is told from a live one: `verify` reports it, `rebuild` and the next artifact write of the
        expert remove it. An error or signal removes the temp file on the way out.
        """
        digest, key_json = artifacts.key_digest(key, self.meta(name).files)
        data = artifacts.encode(tensors, digest, key_json)
        target = self._p(name, ARTIFACTS_DIR, f"{validate_name(kind, 'artifact kind')}.safetensors")
        tmp = f"{target}.{time.time():.0f}-{uuid.uuid4().hex[:8]}.tmp"
        with contextlib.ExitStack() as held:
            try:
                if self.local:
                    with self._lock:
                        self._remove_stale_artifact_temps([name])
                        os.makedirs(posixpath.dirname(target), exist_ok=True)
                        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                        held.enter_context(hold(tmp))
                else:
                    self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, target)
            except BaseException:
                with contextlib.suppress(Exception):
                    if self.fs.exists(tmp):
                        self.fs.rm(tmp)
                raise
        return self.artifact_path(name, kind)

    def load_artifact(self, name: str, kind: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored tensors, or None when missing or computed from something else (stale)."""
        digest, _ = artifacts.key_digest(key, self.meta(name).files)
        target = self._p(name, ARTIFACTS_DIR, f"{validate_name(kind, 'artifact kind')}.safetensors")
        if not self.fs.isfile(target):
            return None
        return artifacts.decode(self.fs.cat_file(target), digest)
