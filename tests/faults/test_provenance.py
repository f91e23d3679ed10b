"""Provenance: every place that combines experts or puts one on a base (route build, a router folder
loaded for eval, merge to an adapter or a full model, eval of one expert) refuses experts trained on
another base, through the one check (`moerge.library.adapter.check_same_base`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faultkit import assert_refused, moerge, unchanged
from safetensors.torch import load_file, save_file

from helpers import make_tiny_base
from moerge.errors import MoergeError
from moerge.library.expert import METADATA_FILE, BaseInfo, read_expert_meta, write_expert_meta

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def copy_expert(src: Path, dest: Path, *, base: Path | None = None) -> Path:
    """A copy of `src`; with `base`, its moerge.json records that base (hashes re-recorded): an expert
    of another base, as `moerge train --base <base>` would have written it."""
    from moerge.models import fingerprint

    shutil.copytree(src, dest)
    if base is not None:
        meta = read_expert_meta(dest)
        write_expert_meta(
            dest, meta.model_copy(update={"base": BaseInfo(name_or_path=str(base), fingerprint=fingerprint(base))})
        )
    return dest


def narrow(folder: Path) -> Path:
    """Make the adapter's lora_A read 48 inputs instead of the tiny base's 64 (a differently shaped base)."""
    weights = load_file(folder / ADAPTER_WEIGHTS)
    for key in [k for k in weights if "lora_A" in k and weights[k].shape[1] == 64]:
        weights[key] = weights[key][:, :48].contiguous()
    save_file(weights, folder / ADAPTER_WEIGHTS)
    return folder


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base of the same architecture and shapes as `tiny_base`, other weights (another fingerprint)."""
    return make_tiny_base(tmp_path_factory.mktemp("other_base"), seed=1)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


@pytest.fixture
def mine(trained_expert: Path, inputs: Path) -> Path:
    return copy_expert(trained_expert, inputs / "mine")


@pytest.fixture
def foreign(trained_expert: Path, other_base: Path, inputs: Path) -> Path:
    """Same shapes as `mine`, recorded as trained on `other_base`."""
    return copy_expert(trained_expert, inputs / "foreign", base=other_base)


def test_route_build_refuses_experts_of_two_bases_with_the_same_shapes(
    tiny_base: Path, mine: Path, foreign: Path, inputs: Path, tmp_path: Path
) -> None:
    with unchanged(inputs):
        result = moerge(
            "route",
            "build",
            "--router",
            "uniform",
            "--experts",
            f"{mine},{foreign}",
            "--base",
            tiny_base,
            "--out",
            tmp_path / "r",
        )
        assert "different base models" in assert_refused(result, foreign / METADATA_FILE, "mine=", "foreign=")
    assert not (tmp_path / "r").exists()


def test_route_build_refuses_an_expert_of_another_base_than_the_base(
    tiny_base: Path, foreign: Path, inputs: Path, tmp_path: Path
) -> None:
    with unchanged(inputs):
        result = moerge(
            "route", "build", "--router", "uniform", "--experts", foreign, "--base", tiny_base, "--out", tmp_path / "r"
        )
        assert_refused(result, foreign / METADATA_FILE, "base.fingerprint")
    assert not (tmp_path / "r").exists()


def test_route_build_refuses_experts_of_a_differently_shaped_base(
    tiny_base: Path, trained_expert: Path, other_base: Path, mine: Path, inputs: Path, tmp_path: Path
) -> None:
    recorded = copy_expert(trained_expert, inputs / "recorded")
    narrow(recorded)
    write_expert_meta(
        recorded,
        read_expert_meta(recorded).model_copy(
            update={"base": BaseInfo(name_or_path="wide", fingerprint="sha256:wide")}
        ),
    )
    plain = narrow(copy_expert(trained_expert, inputs / "plain"))
    (plain / METADATA_FILE).unlink()  # no record at all: only the shapes can tell
    with unchanged(inputs):
        result = moerge(
            "route",
            "build",
            "--router",
            "uniform",
            "--experts",
            f"{mine},{recorded}",
            "--base",
            tiny_base,
            "--out",
            tmp_path / "r",
        )
        assert_refused(result, "different base models", "recorded=")
        result = moerge(
            "route",
            "build",
            "--router",
            "uniform",
            "--experts",
            f"{mine},{plain}",
            "--base",
            tiny_base,
            "--out",
            tmp_path / "r",
        )
        assert_refused(result, plain, "(out, in)")
    assert not (tmp_path / "r").exists()


@pytest.fixture
def router(tiny_base: Path, mine: Path, inputs: Path) -> Path:
    folder = inputs / "router"
    result = moerge("route", "build", "--router", "uniform", "--experts", mine, "--base", tiny_base, "--out", folder)
    assert result.returncode == 0, result.stderr
    return folder


def test_a_router_edited_to_use_another_bases_expert_is_refused(
    router: Path, foreign: Path, tiny_base: Path, parity_task: str, inputs: Path
) -> None:
    config = json.loads((router / "config.json").read_text())
    config["experts"][0]["path"] = str(foreign)
    (router / "config.json").write_text(json.dumps(config))
    with unchanged(inputs):
        result = moerge("eval", "--base", tiny_base, "--task", parity_task, "--router", router)
        assert_refused(result, foreign / METADATA_FILE, "base.fingerprint")
    from moerge.models import load_base
    from moerge.route import load_routed

    model, tokenizer = load_base(tiny_base)
    with pytest.raises(MoergeError, match=r"foreign/moerge\.json: base\.fingerprint: expert mine was trained on base"):
        load_routed(model, router, tokenizer=tokenizer)


def test_attaching_experts_of_another_base_is_refused(tiny_base: Path, foreign: Path) -> None:
    from moerge.models import load_base
    from moerge.route import attach_experts

    model, _ = load_base(tiny_base)
    with pytest.raises(MoergeError, match=r"foreign/moerge\.json: base\.fingerprint"):
        attach_experts(model, [foreign])
    assert not any("Stacked" in type(m).__name__ for m in model.modules())  # the model is left as it was


def test_merge_refuses_experts_of_two_bases_and_a_full_merge_onto_another_base(
    mine: Path, foreign: Path, other_base: Path, inputs: Path, tmp_path: Path
) -> None:
    with unchanged(inputs, other_base):
        result = moerge("merge", "--method", "linear", "--experts", f"{mine},{foreign}", "--out", tmp_path / "m")
        assert_refused(result, "different base models", "mine=", "foreign=")
        result = moerge(
            "merge",
            "--method",
            "linear",
            "--experts",
            mine,
            "--kind",
            "full",
            "--base",
            other_base,
            "--out",
            tmp_path / "m",
        )
        assert_refused(result, mine / METADATA_FILE, "output.base")
    assert not (tmp_path / "m").exists()


def test_eval_refuses_an_expert_of_another_base(tiny_base: Path, foreign: Path, parity_task: str, inputs: Path) -> None:
    with unchanged(inputs):
        result = moerge("eval", "--base", tiny_base, "--task", parity_task, "--adapter", foreign)
        assert_refused(result, foreign / METADATA_FILE, "--base")


def test_check_same_base_is_the_one_rule(mine: Path, foreign: Path) -> None:
    from moerge.library.adapter import RecordedBase, check_same_base, open_adapter

    a, b = open_adapter(mine), open_adapter(foreign)
    check_same_base([a, a], a.fingerprint)
    check_same_base([a, RecordedBase("unrecorded", mine, "unknown")], a.fingerprint)  # unknown is not compared
    with pytest.raises(MoergeError, match=r"foreign/moerge\.json: base\.fingerprint: experts trained on diff"):
        check_same_base([a, b])
    with pytest.raises(MoergeError, match=r"foreign/moerge\.json: base\.fingerprint: .* but the full base"):
        check_same_base([b], a.fingerprint, base_name="the full base")
