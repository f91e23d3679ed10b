"""Router folders: build → save → load_routed gives the same model outputs; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch
from route_helpers import EXPERT_SPECS, load_tiny, other_base

from moerge.errors import MoergeError
from moerge.route import (
    Routing,
    attach_experts,
    build_router,
    load_routed,
    prepare_router,
    read_router_config,
)
from moerge.route.folder import make_policy

NAMES = list(EXPERT_SPECS)


def test_round_trip_matches_in_memory_routing(tmp_path, tiny_base, experts, expert_data):
    out = build_router("centroid", {n: experts[n] for n in NAMES}, tmp_path / "r", base=tiny_base, data=expert_data)
    config = read_router_config(out)
    assert config["router"] == "centroid" and [e["name"] for e in config["experts"]] == NAMES
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tensors.safetensors"]

    routed = load_routed(str(tiny_base), out)
    model, tokenizer = load_tiny(tiny_base)
    handle = attach_experts(model, {n: experts[n] for n in NAMES})
    Routing(
        handle,
        prepare_router(handle, "centroid", tokenizer=tokenizer, data=expert_data),
        make_policy("centroid"),
    )
    ids = torch.randint(0, 200, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(routed(ids).logits, model(ids).logits)
    assert routed.moerge_routing.routing.policy.k == 1


def test_policy_override_and_other_base_refused(tmp_path, tiny_base, experts):
    out = build_router(
        "arrow",
        [experts["alpha"], experts["beta"]],
        tmp_path / "r",
        base=tiny_base,
        policy={"k": 1, "granularity": "example"},
    )
    assert read_router_config(out)["policy"]["granularity"] == "example"
    other = other_base(tiny_base, tmp_path / "other")
    with pytest.raises(MoergeError, match="another base"):
        load_routed(str(other), out)
    with pytest.raises(MoergeError, match="already exists"):
        build_router("arrow", [experts["alpha"]], out, base=tiny_base)


def test_bad_router_folder_and_names(tmp_path, tiny_base, experts):
    with pytest.raises(MoergeError, match=r"config\.json"):
        read_router_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"router": "arrow"}))
    with pytest.raises(MoergeError, match="experts"):
        read_router_config(tmp_path)
    with pytest.raises(MoergeError, match="unknown"):
        build_router("nope", [experts["alpha"]], tmp_path / "x", base=tiny_base)


def test_router_renders_data_in_its_experts_format_and_records_it(tmp_path, tiny_base, experts, expert_data):
    import shutil

    from safetensors.torch import load_file

    from moerge.data.formats import PLAIN, RAW
    from moerge.library.expert import read_expert_meta, write_expert_meta

    def with_format(name: str, fmt) -> str:
        folder = tmp_path / f"{name}-{fmt.name}"
        shutil.copytree(experts[name], folder)
        write_expert_meta(folder, read_expert_meta(folder).model_copy(update={"prompt_format": fmt}))
        return str(folder)

    plain = {n: with_format(n, PLAIN) for n in NAMES[:2]}
    out = build_router("centroid", plain, tmp_path / "plain", base=tiny_base, data=expert_data)
    config = read_router_config(out)
    assert config["prompt_format"]["name"] == "plain"
    assert config["expert_formats"] == dict.fromkeys(NAMES[:2], "plain")
    assert load_routed(str(tiny_base), out).moerge_routing.prompt_format == PLAIN
    forced = build_router("centroid", plain, tmp_path / "forced", base=tiny_base, data=expert_data, prompt_format=RAW)
    assert read_router_config(forced)["prompt_format"]["name"] == "raw"
    # the format is what the centroids are computed from, not a label
    centroids = [load_file(str(f / "tensors.safetensors"))["centroids"] for f in (out, forced)]
    assert not torch.allclose(*centroids)

    mixed = {NAMES[0]: with_format(NAMES[0], RAW), NAMES[1]: plain[NAMES[1]]}
    out = build_router("centroid", mixed, tmp_path / "mixed", base=tiny_base, data=expert_data)
    assert read_router_config(out)["prompt_format"]["name"] == "moerge"
    assert read_router_config(out)["expert_formats"] == {NAMES[0]: "raw", NAMES[1]: "plain"}
    assert load_routed(str(tiny_base), out).moerge_routing.prompt_format == "mixed"


def test_out_that_is_not_a_router_is_refused_before_loading(tmp_path, experts, monkeypatch):
    import moerge.route.folder as folder

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    monkeypatch.setattr(folder, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(MoergeError, match="not a moerge output"):
        build_router("arrow", [experts[NAMES[0]]], out, base="unused", overwrite=True)
    assert (out / "notes.txt").read_text() == "keep"
