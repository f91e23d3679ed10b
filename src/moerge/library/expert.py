"""The expert folder: peft's own files plus `moerge.json` (what, from where, how, and file hashes).

Layout (see GUIDE.md):
    <name>/adapter_config.json, adapter_model.safetensors   peft's files, loadable as-is
    <name>/model.safetensors, config.json                   instead, for full fine-tuning experts
    <name>/mixture_config.json, mixture_model.safetensors   instead, for trained mixtures (models.mixture)
    <name>/moerge.json                                      this module's metadata
    <name>/artifacts/*.safetensors                          derived data (router prototypes, gates, ...)
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moerge._version import __version__
from moerge.data.formats import MOERGE, UNKNOWN, PromptFormat, Recorded
from moerge.errors import MoergeError
from moerge.paths import parse_json, write_json_atomic
from moerge.yamlconf import validate

METADATA_FILE = "moerge.json"
ARTIFACTS_DIR = "artifacts"
FORMAT_VERSION = 1
REQUIRED_FILES = {
    "adapter": ("adapter_config.json", "adapter_model.safetensors"),
    "full": ("config.json",),
    "mixture": ("mixture_config.json", "mixture_model.safetensors"),
}
"""Per kind, the files `moerge.json`'s `files` map must list (their sha256 vouches for them): what peft
reads of an adapter; a full expert is a model folder whose every file a loader may read, so there
every payload file present must be listed too."""


class TaskInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    source: str = "unknown"
    data_hash: str = "unknown"


class BaseInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name_or_path: str
    fingerprint: str = "unknown"


class ExpertMeta(BaseModel):
    """What `moerge.json` holds. Unknown fields are kept, so newer files survive older readers."""

    model_config = ConfigDict(extra="allow")
    format: int = FORMAT_VERSION
    name: str
    kind: Literal["adapter", "full", "mixture"] = "adapter"
    method: str
    task: TaskInfo
    base: BaseInfo
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    cost: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    prompt_format: PromptFormat | Literal["unknown", "mixed"] | None = None
    dtype: str | None = Field(
        None, description="compute dtype it was trained in (bf16, fp16, fp32); None: older files (fp32)"
    )
    quantize: str | None = Field(None, description="4bit or 8bit when trained on a quantised base (QLoRA)")
    moerge_version: str = "unknown"
    created: float = Field(default_factory=time.time)
    files: dict[str, str] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _inside_the_folder(cls, files: dict[str, str]) -> dict[str, str]:
        """Every listed file is a relative path inside the expert folder: a `..` or absolute entry would
        let a crafted moerge.json make export or hashing reach files outside it."""
        for rel in files:
            parts = PurePosixPath(rel).parts
            if not parts or rel.startswith("/") or "\\" in rel or ".." in parts or ":" in parts[0]:
                raise ValueError(f"{rel!r} is not a path inside the expert folder")
        return files


def recorded_format(meta: ExpertMeta) -> Recorded:
    """The prompt format the expert was trained with. Files written before formats were recorded hold
    none: moerge trained those in its own format; an imported adapter's is unknown."""
    if meta.prompt_format is not None:
        return meta.prompt_format
    return UNKNOWN if "imported_from" in meta.provenance else MOERGE


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def payload_files(folder: Path) -> list[str]:
    """Files the metadata vouches for: everything except moerge.json and derived artifacts."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != METADATA_FILE and not rel.startswith(f"{ARTIFACTS_DIR}/"):
            out.append(rel)
    return out


def write_expert_meta(folder: Path, meta: ExpertMeta) -> ExpertMeta:
    """Hash the folder's files into `meta.files` and write `moerge.json` atomically."""
    folder = Path(folder)
    meta = meta.model_copy(
        update={
            "files": {rel: sha256_file(folder / rel) for rel in payload_files(folder)},
            "moerge_version": __version__,
        }
    )
    write_json_atomic(folder / METADATA_FILE, meta.model_dump(mode="json"))
    return meta


def read_expert_meta(folder: Path) -> ExpertMeta:
    """Read and validate `moerge.json`; errors name the file and the field."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise MoergeError(f"{path}: not found (is {folder} a moerge expert folder?)")
    return parse_expert_meta(path.read_bytes(), path)


def parse_expert_meta(text: str | bytes, source: object) -> ExpertMeta:
    """Validate `moerge.json` text read from anywhere (local file, remote library); errors name `source`."""
    return validate(ExpertMeta, parse_json(text, source), str(source))


def unlisted_files(folder: Path, meta: ExpertMeta) -> list[str]:
    """Problems of `meta.files` coverage: a file the expert's kind requires (`REQUIRED_FILES`; for a full
    expert also a `*.safetensors` weights file and every payload file present) that the map does not
    list, so no hash would vouch for it."""
    folder = Path(folder)
    where = folder / METADATA_FILE
    required = list(REQUIRED_FILES.get(meta.kind, ()))
    if meta.kind == "full":
        if not any(rel.endswith(".safetensors") for rel in meta.files):
            required.append("*.safetensors (the model's weights)")
        required += payload_files(folder) if folder.is_dir() else []
    missing = [rel for rel in dict.fromkeys(required) if rel not in meta.files]
    return [f"{where}: files: {rel} is not listed (no recorded sha256 vouches for it)" for rel in missing]


def verify_expert_files(folder: Path, meta: ExpertMeta | None = None) -> list[str]:
    """Problems with the folder's files against their recorded sha256 (empty list: intact), the required
    files' coverage (`unlisted_files`) first."""
    folder = Path(folder)
    meta = meta or read_expert_meta(folder)
    problems = unlisted_files(folder, meta)
    for rel, expected in meta.files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 mismatch (file corrupted or modified)")
    return problems


def check_expert_intact(folder: Path) -> ExpertMeta:
    """Refuse to use an expert whose files fail their recorded hashes."""
    meta = read_expert_meta(folder)
    problems = verify_expert_files(folder, meta)
    if problems:
        raise MoergeError(f"refusing to load expert {folder}: {problems[0]}")
    return meta


def is_expert_folder(folder: Path) -> bool:
    return (Path(folder) / METADATA_FILE).is_file()
