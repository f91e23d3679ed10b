"""Merging experts: a registry of merge methods, adapter-level and full-weight outputs."""

from moerge.merge.config import ExpertRef, MergeSpec, OutputSpec, load_merge_spec
from moerge.merge.methods import MERGE_METHODS, MergeMethod, MergeOptions, merge_method
from moerge.merge.run import MergeResult, build_plan, run_merge

__all__ = [
    "MERGE_METHODS",
    "ExpertRef",
    "MergeMethod",
    "MergeOptions",
    "MergeResult",
    "MergeSpec",
    "OutputSpec",
    "build_plan",
    "load_merge_spec",
    "merge_method",
    "run_merge",
]
