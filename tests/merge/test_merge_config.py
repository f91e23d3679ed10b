"""Merge configs (YAML + flags) with file:line errors, plans per module, and library round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moerge.errors import MoergeError
from moerge.merge import build_plan, load_merge_spec, run_merge

NO_FLAGS: dict[str, object] = {}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


def test_yaml_config_with_flag_overrides(experts: dict[str, Path], tmp_path: Path) -> None:
    config = write(
        tmp_path,
        f"""method: dare_ties
experts:
  - {{path: {experts["a"]}, weight: 0.5}}
  - {{path: {experts["b"]}}}
parameters: {{density: 0.3}}
output: {{kind: adapter, rank: 4, out: {tmp_path / "o"}}}
""",
    )
    spec = load_merge_spec(config, {"weights": [0.2, 0.8], "parameters": {"density": None, "seed": 3}})
    assert spec.method == "dare_ties" and spec.weights == [0.2, 0.8]
    assert spec.parameters == {"density": 0.3, "seed": 3} and spec.output.rank == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: ties\nexperts: [\n", r"merge\.yaml:3: invalid YAML"),
        (
            "method: ties\nexperts:\n  - {path: x}\noutput:\n  out: o\n  knd: full\n",
            r"merge\.yaml:6: output\.knd",
        ),
        ("method: ties\nexperts:\n  - {path: x, name: y}\noutput: {out: o}\n", r"merge\.yaml:3: experts\.0"),
        (
            "method: ties\nexperts: []\noutput: {out: o}\n",
            r"merge\.yaml:2: experts: List should have at least 1",
        ),
        (
            "method: ties\nexperts:\n  - {path: x}\noutput: {out: o, kind: full}\n",
            r"merge\.yaml:4: output.*needs 'base'",
        ),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_bad_yaml_points_at_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(MoergeError, match=message):
        load_merge_spec(write(tmp_path, text), NO_FLAGS)


def test_flag_errors(tmp_path: Path) -> None:
    with pytest.raises(MoergeError, match="--weights: 3 weights for 2 experts"):
        load_merge_spec(None, {"method": "ties", "experts": ["x", "y"], "weights": [1, 2, 3]})
    flags = {"method": "tie", "experts": ["x"], "output": {"out": "o"}}
    with pytest.raises(MoergeError, match="options: method: unknown merge method 'tie'; did you mean 'ties'"):
        load_merge_spec(None, flags)
    spec = load_merge_spec(None, {**flags, "method": "ties"})
    with pytest.raises(MoergeError, match=r"parameters\.lambda: not an option of merge method 'ties'"):
        build_plan(spec.model_copy(update={"parameters": {"lambda": 2}}))
    with pytest.raises(MoergeError, match=r"options: parameters\.density: not an option of merge method 'linear'"):
        load_merge_spec(None, {**flags, "method": "linear", "parameters": {"density": 0.2}})


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            "  density: 0.2\n",
            r"merge\.yaml:5: parameters\.density: not an option of merge method 'linear'"
            r" \(its options: scaling, lines_alpha, lines_beta\)",
        ),
        ("  scaling: 2\n  lines_alpha: x\n", r"merge\.yaml:6: parameters\.lines_alpha: Input should be a valid number"),
    ],
)
def test_parameters_the_method_does_not_take_point_at_their_line(tmp_path: Path, parameters: str, message: str) -> None:
    text = f"method: linear\nexperts:\n  - {{path: x}}\nparameters:\n{parameters}output: {{out: o}}\n"
    with pytest.raises(MoergeError, match=message):
        load_merge_spec(write(tmp_path, text), NO_FLAGS)


def test_library_name_without_library_is_refused(tmp_path: Path) -> None:
    text = "method: linear\nexperts:\n  - {name: arithmetic}\noutput: {out: o}\n"
    spec = load_merge_spec(write(tmp_path, text), NO_FLAGS)
    with pytest.raises(MoergeError, match="'arithmetic' is a library name but no library"):
        build_plan(spec)


def test_slerp_needs_two_experts(experts: dict[str, Path]) -> None:
    flags = {"method": "slerp", "experts": [str(experts[n]) for n in "abc"], "output": {"out": "o"}}
    with pytest.raises(MoergeError, match="slerp merges exactly 2 experts, got 3"):
        build_plan(load_merge_spec(None, flags))


def test_lines_scales_each_layer_by_depth(experts: dict[str, Path]) -> None:
    flags = {
        "method": "lines",
        "experts": [str(experts["a"])],
        "parameters": {"lines_alpha": 0.25, "lines_beta": 0.5},
    }
    plan = build_plan(load_merge_spec(None, {**flags, "output": {"out": "o"}}))
    for layer, factor in ((0, 0.25), (1, 0.75)):
        module = f"model.layers.{layer}.self_attn.q_proj"
        torch.testing.assert_close(plan.delta(module), factor * plan.task_vectors(module)[0])


def test_dare_masks_differ_per_module_but_repeat_per_run(experts: dict[str, Path]) -> None:
    flags = {"method": "dare_linear", "experts": [str(experts["a"])], "output": {"out": "o"}}
    spec = load_merge_spec(None, {**flags, "parameters": {"density": 0.5, "seed": 1}})
    first, again = build_plan(spec), build_plan(spec)
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert torch.equal(first.delta(q0), again.delta(q0))
    assert not torch.equal(first.delta(q0) != 0, first.delta(q1) != 0)


def test_adapter_merge_joins_the_library(experts: dict[str, Path], tmp_path: Path) -> None:
    from moerge.library import ExpertLibrary

    library = ExpertLibrary.create(tmp_path / "lib")
    for name in ("a", "b"):
        library.add(experts[name], name=name)
    flags = {
        "library": str(tmp_path / "lib"),
        "method": "ties",
        "experts": ["a", "b"],
        "output": {"rank": 2, "out": "merged-ab"},
    }
    result = run_merge(load_merge_spec(None, flags))
    assert "merged-ab" in library.names() and result.path == library.path("merged-ab")
    meta = library.meta("merged-ab")
    assert meta.method == "merge:ties" and [s["name"] for s in meta.provenance["sources"]] == ["a", "b"]
    with pytest.raises(MoergeError, match="already exists"):
        run_merge(load_merge_spec(None, flags))
