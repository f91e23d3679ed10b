"""One Registry type: duplicates refused, unknown names one line with the known ones."""

import pytest

from moerge.errors import MoergeError
from moerge.registry import Registry


def test_second_registration_under_a_name_is_refused():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_name_lists_known_and_suggests_a_close_one():
    reg: Registry[int] = Registry("merge method")
    for i, name in enumerate(["ties", "linear", "dare_ties"]):
        reg.register(name, i)
    with pytest.raises(
        MoergeError,
        match=r"^method: unknown merge method 'tiez'; did you mean 'ties'\? known: dare_ties, linear, ties$",
    ):
        reg.get("tiez", field="method")
    assert list(reg) == reg.names() == ["dare_ties", "linear", "ties"] and "ties" in reg


def test_loader_runs_once_on_first_lookup():
    calls = []
    reg: Registry[str] = Registry("router", load=lambda: calls.append(1) or reg.register("x", "X"))
    assert calls == []
    assert reg.names() == ["x"] and reg.get("x") == "X" and calls == [1]


@pytest.mark.parametrize(
    "registry",
    [
        "moerge.train.methods:METHODS",
        "moerge.merge.methods:MERGE_METHODS",
        "moerge.route.router:ROUTERS",
        "moerge.recipes.strategies:STRATEGIES",
        "moerge.data.sources:SOURCES",
        "moerge.route.policies:SELECTORS",
    ],
)
def test_every_product_registry_refuses_duplicates(registry):
    import importlib

    module, name = registry.split(":")
    reg = getattr(importlib.import_module(module), name)
    first = reg.names()[0]
    with pytest.raises(ValueError, match="already registered"):
        reg.register(first, reg.get(first))
