"""The library's SQLite catalog: one row per registered expert, so listing and filtering never walk folders.

The expert folders stay the source of truth (each holds its `moerge.json`); the catalog is an index
that `ExpertLibrary.rebuild` can always regenerate. Writers hold the library's file lock; SQLite's own
locking keeps readers consistent while a writer commits.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from moerge.errors import MoergeError
from moerge.library.expert import ExpertMeta

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    name TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    method TEXT NOT NULL,
    kind TEXT NOT NULL,
    base TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL,
    meta TEXT NOT NULL
)
"""
_COLUMNS = "name, task, method, kind, base, fingerprint, created, meta"


def _row(name: str, meta: ExpertMeta) -> tuple:
    return (
        name,
        meta.task.name,
        meta.method,
        meta.kind,
        meta.base.name_or_path,
        meta.base.fingerprint,
        meta.created,
        meta.model_dump_json(),
    )


class Catalog:
    """Thin wrapper over one `catalog.sqlite` file."""

    def __init__(self, path: Path, *, repair: bool = False) -> None:
        """Open (or create) the catalog. `repair`: an unreadable file is set aside as
        `.catalog.sqlite.damaged` and a new, empty one made (the caller then rebuilds it from the folders)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open_schema()
        except sqlite3.DatabaseError as exc:
            if not repair:
                raise MoergeError(f"{self.path}: unreadable catalog ({exc}); run `moerge library rebuild`") from None
            self.path.replace(self.path.with_name(f".{self.path.name}.damaged"))
            self._open_schema()

    def _open_schema(self) -> None:
        with self._connect() as con:
            con.execute(_SCHEMA)
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise MoergeError(
                    f"{self.path}: catalog schema {version} is newer than this moerge understands "
                    f"({SCHEMA_VERSION}); upgrade moerge"
                )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One short-lived connection per operation; commits on success, rolls back on error."""
        con = sqlite3.connect(self.path, timeout=60)
        try:
            with con:
                yield con
        finally:
            con.close()

    def upsert(self, name: str, meta: ExpertMeta) -> None:
        with self._connect() as con:
            con.execute(f"INSERT OR REPLACE INTO experts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", _row(name, meta))

    def delete(self, name: str) -> None:
        with self._connect() as con:
            con.execute("DELETE FROM experts WHERE name = ?", (name,))

    def replace_all(self, entries: Iterable[tuple[str, ExpertMeta]]) -> None:
        """Swap the whole index in one transaction (used by rebuild)."""
        rows = [_row(name, meta) for name, meta in entries]
        with self._connect() as con:
            con.execute("DELETE FROM experts")
            con.executemany(f"INSERT INTO experts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", rows)

    def names(self) -> list[str]:
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT name FROM experts ORDER BY name")]

    def get(self, name: str) -> ExpertMeta | None:
        with self._connect() as con:
            row = con.execute("SELECT meta FROM experts WHERE name = ?", (name,)).fetchone()
        return None if row is None else ExpertMeta.model_validate_json(row[0])

    def query(self, *, task: str | None = None, method: str | None = None, base: str | None = None) -> list[ExpertMeta]:
        """Experts matching every given filter; `base` matches the base's name/path or its fingerprint."""
        clauses, params = [], []
        for column, value in (("task", task), ("method", method)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if base is not None:
            clauses.append("(base = ? OR fingerprint = ?)")
            params += [base, base]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as con:
            rows = con.execute(f"SELECT meta FROM experts {where} ORDER BY name", params).fetchall()
        return [ExpertMeta.model_validate_json(r[0]) for r in rows]
