"""Router options: typed and validated per router, never changed by a build; the registry refuses
duplicates; router folders written before `derived` existed still load and route the same."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import ValidationError
from route_helpers import EXPERT_SPECS, load_tiny

from moerge.errors import MoergeError
from moerge.route import Router, build_router, get_router, load_routed, read_router_config, register_router
from moerge.route.routers.glider import GliderOptions

NAMES = list(EXPERT_SPECS)
GLIDER = {"describer": "chat", "describe_examples": 2, "steps": 2, "alpha": 2.0}


@pytest.fixture(scope="module")
def folders(tiny_base, experts, expert_data, tmp_path_factory):
    """An oracle and a GLIDER (chat describer) router folder: the two routers whose build derives values."""
    root = tmp_path_factory.mktemp("routers")
    chosen = {n: experts[n] for n in NAMES}
    return {
        "oracle": build_router("oracle", chosen, root / "oracle", base=tiny_base, data=expert_data),
        "glider": build_router("glider", chosen, root / "glider", base=tiny_base, data=expert_data, options=GLIDER),
    }


def _logits(model, **context):
    from moerge.route import routing_context

    ids = torch.randint(0, 200, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routing_context(**context):
        return model(ids).logits


def _as_format_1(folder, out):
    """The same router folder as today's code wrote it before `derived`: build results inside `options`."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["options"].update(config.pop("derived"))
    config["format"] = 1
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("router", "options", "message"),
    [
        ("arrow", {"steps": 2}, "options: steps: not an option of router 'arrow' (its options: none)"),
        ("phatgoose", {"step": 2}, "options: step: not an option of router 'phatgoose' (its options: steps, lr)"),
        (
            "phatgoose",
            {"steps": "x"},
            "options: steps: Input should be a valid integer, unable to parse string as an integer",
        ),
        ("glider", {"describer": "poem"}, "options: describer: Input should be 'examples', 'text' or 'chat'"),
        ("learned", {"lr": -1}, "options: lr: Input should be greater than 0"),
    ],
)
def test_bad_options_are_refused_before_the_model_is_loaded(tmp_path, experts, router, options, message):
    with pytest.raises(MoergeError) as caught:
        build_router(router, [experts["alpha"]], tmp_path / "r", base="no/such/base", options=options)
    assert str(caught.value) == message
    assert not (tmp_path / "r").exists()


def test_options_are_typed_coerced_and_frozen():
    options = get_router("glider").parse_options({"steps": "3", "alpha": 2, "descriptions": {"a": "x"}})
    assert isinstance(options, GliderOptions)
    assert (options.steps, options.alpha, options.lr, options.describer) == (3, 2.0, 1e-2, "examples")
    assert get_router("glider").parse_options(options) is options
    with pytest.raises(ValidationError):
        options.steps = 5
    with pytest.raises(TypeError, match="PhatgooseOptions"):
        get_router("phatgoose")(NAMES, GliderOptions())


def test_build_keeps_options_apart_from_what_it_derived(folders):
    oracle = read_router_config(folders["oracle"])
    assert oracle["format"] == 2 and oracle["options"] == {}
    assert oracle["derived"]["task_to_expert"] == {f"task_{n}": n for n in NAMES}
    glider = read_router_config(folders["glider"])
    assert glider["options"] == GLIDER
    assert set(glider["derived"]["descriptions"]) == set(NAMES)


def test_loaded_router_restores_options_and_derived(folders, tiny_base):
    router = load_routed(str(tiny_base), folders["glider"]).moerge_routing.routing.router
    assert router.options == GliderOptions(**GLIDER) and router.options.descriptions is None
    assert set(router.derived["descriptions"]) == set(NAMES)


@pytest.mark.parametrize("name", ["oracle", "glider"])
def test_format_1_folder_with_build_results_in_options_routes_the_same(folders, tiny_base, tmp_path, name):
    legacy = _as_format_1(folders[name], tmp_path / "legacy")
    context = {"task_ids": [f"task_{n}" for n in NAMES]}
    expected = _logits(load_routed(str(tiny_base), folders[name]), **context)
    torch.testing.assert_close(_logits(load_routed(str(tiny_base), legacy), **context), expected)


def test_unknown_saved_option_or_router_names_the_file(folders, tiny_base, tmp_path):
    broken = shutil.copytree(folders["oracle"], tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "options": {"bogus": 1}}))
    with pytest.raises(MoergeError, match=r"config\.json: options\.bogus: not an option of router 'oracle'"):
        load_routed(str(tiny_base), broken)
    (broken / "config.json").write_text(json.dumps({**config, "router": "oracel"}))
    with pytest.raises(MoergeError, match=r"config\.json: router: unknown router 'oracel'; did you mean 'oracle'\?"):
        load_routed(str(tiny_base), broken)
    (broken / "config.json").write_text(json.dumps({**config, "policy": {**config["policy"], "k": 0}}))
    with pytest.raises(MoergeError, match=r"config\.json: policy\.k: Input should be greater than or equal to 1"):
        load_routed(str(tiny_base), broken)


def test_registry_refuses_a_second_router_under_a_name():
    with pytest.raises(ValueError, match="router 'arrow' is already registered"):
        register_router("arrow")(type("AnotherArrow", (Router,), {}))
    with pytest.raises(MoergeError, match="--router: unknown router 'arow'; did you mean 'arrow'"):
        get_router("arow", field="--router")


def test_parameter_counts_follow_the_policy(tiny_base, experts, tmp_path):
    """added = every stacked factor; active = the share of the most experts the policy can select."""
    model, _ = load_tiny(tiny_base)
    routed = load_routed(model, build_router("arrow", experts, tmp_path / "arrow", base=model))
    handle = routed.moerge_routing
    added = sum(layer.A.numel() + layer.B.numel() for layer in handle.layers.values())
    assert handle.routing.parameter_counts() == (added, added * 2 // 4)
    for policy, experts_used in [({"k": 9}, 4), ({"name": "dense"}, 4), ({"name": "top_p", "p": 0.5}, 2)]:
        handle.routing.policy = handle.routing.policy.updated(policy)
        assert handle.routing.parameter_counts() == (added, added * experts_used // 4)
