"""Derived per-expert data (router prototypes, gates, embeddings) stored as safetensors with a key.

The key says what the artifact was computed from (plus the expert's own file hashes, added by the
library); its hash lives in the safetensors metadata. A different key means the artifact is stale and
must be recomputed, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from moerge.errors import MoergeError

KEY_HASH_FIELD = "moerge.key_sha256"
KEY_JSON_FIELD = "moerge.key"


def key_digest(key: dict[str, Any], expert_files: dict[str, str]) -> tuple[str, str]:
    """(sha256, canonical JSON) of the key together with the expert's file hashes."""
    try:
        blob = json.dumps({"key": key, "expert_files": expert_files}, sort_keys=True)
    except TypeError as exc:
        raise MoergeError(f"artifact key: must be JSON-serialisable (str, number, list, dict): {exc}") from None
    return hashlib.sha256(blob.encode()).hexdigest(), blob


def encode(tensors: dict[str, Any], digest: str, key_json: str) -> bytes:
    from safetensors.torch import save

    return save(
        {k: t.detach().cpu().contiguous() for k, t in tensors.items()},
        metadata={KEY_HASH_FIELD: digest, KEY_JSON_FIELD: key_json},
    )


def _header_metadata(data: bytes) -> dict[str, str]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def decode(data: bytes, digest: str) -> dict[str, Any] | None:
    """The tensors if the stored key matches `digest`; None when stale or unreadable (recompute it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        if _header_metadata(data).get(KEY_HASH_FIELD) != digest:
            return None
        return load(data)
    except (struct.error, ValueError, SafetensorError):
        return None
