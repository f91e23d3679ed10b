"""Expert folders and the expert library (catalog, import/export, verification)."""

from moerge.library.expert import (
    ExpertMeta,
    check_expert_intact,
    read_expert_meta,
    verify_expert_files,
    write_expert_meta,
)
from moerge.library.library import ExpertLibrary, VerifyReport, validate_name

__all__ = [
    "ExpertLibrary",
    "ExpertMeta",
    "VerifyReport",
    "check_expert_intact",
    "read_expert_meta",
    "validate_name",
    "verify_expert_files",
    "write_expert_meta",
]
