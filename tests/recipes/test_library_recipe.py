"""Library recipes: shorthand task entries, overrides, derived names, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from moerge.errors import MoergeError
from moerge.recipes.library import load_library_config

GOOD = """
base: tiny-llama
library: experts
method: dora
hyperparameters: {rank: 8, lr: 0.0002, steps: 100}
tasks:
  - gym:chain_sum
  - {task: data/add.jsonl, name: add, overrides: {steps: 300, lr: 0.001}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_good_recipe(tmp_path) -> None:
    recipe = load_library_config(write(tmp_path, GOOD))
    assert recipe.base == "tiny-llama" and recipe.method == "dora"
    assert recipe.library == str(tmp_path / "experts")  # relative to the recipe file
    assert [t.expert_name for t in recipe.tasks] == ["gym-chain_sum", "add"]
    assert recipe.settings(recipe.tasks[0]) == {"rank": 8, "lr": 0.0002, "steps": 100}
    assert recipe.settings(recipe.tasks[1]) == {"rank": 8, "lr": 0.001, "steps": 300}
    url = load_library_config(write(tmp_path, GOOD.replace("library: experts", "library: memory://lib")))
    assert url.library == "memory://lib"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace("tasks:", "taks:"),
            r"recipe.yaml:\d+: taks: Extra inputs",
        ),
        (GOOD.replace("base: tiny-llama\n", ""), r"recipe.yaml: base: Field required"),
        ("base: x\nlibrary: y\ntasks: []\n", r"recipe.yaml:3: tasks: List should have at least 1 item"),
        (GOOD.replace("name: add", "name: ../add"), r"recipe.yaml:\d+: tasks.1.name: expert name '../add'"),
        (GOOD + "  - data/add.jsonl\n  - {task: t, name: add}\n", r"tasks 1 and 3 both make expert 'add'"),
        (
            GOOD.replace("overrides: {steps: 300", "overrides: [steps: 300"),
            r"recipe.yaml:\d+: invalid YAML",
        ),
        ("- just a list\n", r"expected a mapping"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, text, message) -> None:
    with pytest.raises(MoergeError, match=message) as info:
        load_library_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(MoergeError, match=r"nope\.yaml: not found"):
        load_library_config(tmp_path / "nope.yaml")
