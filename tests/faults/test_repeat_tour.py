"""Defects the repeat fault tour found, each fixed and kept fixed: names printed as typed (never read as
rich markup), broken base folders and checkpoint files named at the file and field, library experts
never replaced behind the user's back (recipes with other settings, --overwrite over a folder that is
not an expert, a compare --out that only looks like a compare's), a corrupt catalog repaired by
`library rebuild`, adapters missing weights or pickled refused, damaged bases refused, and merges whose
--base or --out contradict their inputs refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faultkit import assert_refused, moerge, unchanged

from helpers import make_tiny_base, parity_rows, write_task
from moerge.errors import MoergeError

# ------------------------------------------------------------------------------ names printed as typed


def test_markup_like_names_are_printed_as_typed(tiny_base: Path, tmp_path: Path) -> None:
    task = write_task(tmp_path / "[red]d.jsonl", parity_rows(40))
    out = tmp_path / "o[b]x"
    result = moerge(
        "train", "--base", tiny_base, "--task", task, "--steps", "1", "--rank", "2", "--out", out, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert f"expert written: {out}  task=[red]d" in result.stdout
    library = tmp_path / "lib[/i]"
    assert moerge("library", "create", library).returncode == 0
    assert moerge("library", "add", library, out, "--name", "e1").returncode == 0
    listed = moerge("library", "list", library)
    assert "[red]d" in listed.stdout and "test=" in listed.stdout, listed.stdout
    assert "scores" not in listed.stdout  # the list shows accuracy and n, not per-example scores


# ---------------------------------------------------------------------------------- bad command lines


def test_empty_target_modules_are_refused(tiny_base: Path, parity_task: str, tmp_path: Path) -> None:
    args = ("train", "--base", tiny_base, "--task", parity_task, "--target-modules", " , ", "--out", tmp_path / "x")
    with unchanged(tmp_path):
        assert_refused(moerge(*args), "target_modules", "at least 1")


def test_a_gym_size_that_is_not_a_number_is_refused() -> None:
    assert_refused(moerge("data", "show", "gym:leg_counting?size=abc"), "size", "whole number")


# ------------------------------------------------------------------------------------ broken base folders


def _broken(tiny_base: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(tiny_base, folder)
    edit(folder)
    return folder


def _set_config(folder: Path, **fields: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer files"),
        (lambda f: (f / "tokenizer_config.json").write_text("{bad"), "tokenizer_config.json: line 1"),
        (lambda f: _set_config(f, model_type="nosuch"), "config.json: model_type: 'nosuch'"),
        (lambda f: (f / "config.json").write_text("[1]"), "config.json: expected a JSON object"),
    ],
    ids=["no-tokenizer", "bad-tokenizer-config", "unknown-model-type", "config-not-object"],
)
def test_a_broken_base_folder_is_named_at_the_file(tiny_base: Path, tmp_path: Path, edit, named: str) -> None:
    from moerge.models import load_base

    folder = _broken(tiny_base, tmp_path, edit)
    with pytest.raises(MoergeError, match="^" + str(folder)) as caught:
        load_base(folder)
    assert named in str(caught.value)


def test_a_base_with_a_nan_weight_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from moerge.models import load_base

    def poison(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        name = next(k for k in tensors if "up_proj" in k)
        tensors[name][0, 0] = float("nan")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    folder = _broken(tiny_base, tmp_path, poison)
    with pytest.raises(MoergeError, match=r"up_proj\.weight: 1 of .* NaN or infinite; the base model's weights"):
        load_base(folder)


# ------------------------------------------------------------------------------------ library experts


def _tiny_expert(tiny_base: Path, task: str, out: Path, **settings: object) -> Path:
    from moerge.recipes.train import train_expert
    from moerge.train import TrainConfig

    cfg = TrainConfig(base=str(tiny_base), task=task, rank=2, steps=1, batch_size=4, max_length=48, **settings)
    train_expert(cfg, out, progress=False)
    return out


def test_train_library_refuses_to_replace_an_expert_other_settings_trained(
    tiny_base: Path, parity_task: str, tmp_path: Path
) -> None:
    from moerge.library import ExpertLibrary
    from moerge.recipes.library import LibraryConfig, train_library

    def recipe(lr: float) -> LibraryConfig:
        settings = {"rank": 2, "steps": 1, "batch_size": 4, "max_length": 48, "lr": lr, "eval_split": None}
        return LibraryConfig(
            base=str(tiny_base), library=str(tmp_path / "lib"), hyperparameters=settings, tasks=[parity_task]
        )

    assert set(train_library(recipe(1e-3), progress=False).values()) == {"trained"}
    with (
        unchanged(tmp_path / "lib"),
        pytest.raises(MoergeError, match=r"already there, .*lr 0\.001 → 0\.01.*--retrain"),
    ):
        train_library(recipe(1e-2), progress=False)
    assert set(train_library(recipe(1e-2), retrain=True, progress=False).values()) == {"trained"}
    name = ExpertLibrary(tmp_path / "lib").names()[0]
    assert ExpertLibrary(tmp_path / "lib").meta(name).hyperparameters["lr"] == pytest.approx(1e-2)


def test_library_add_overwrite_never_replaces_a_folder_that_is_not_an_expert(trained_expert: Path, tmp_path) -> None:
    from moerge.library import ExpertLibrary

    library = ExpertLibrary.create(tmp_path / "lib")
    mine = tmp_path / "lib" / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    with unchanged(tmp_path / "lib"), pytest.raises(MoergeError, match="'notes' is a folder the catalog does not"):
        library.add(trained_expert, name="notes", overwrite=True)


def test_library_add_of_a_pickled_expert_says_how_to_convert(trained_expert: Path, tmp_path: Path) -> None:
    from moerge.library import ExpertLibrary

    pickled = tmp_path / "pickled"
    shutil.copytree(trained_expert, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    library = ExpertLibrary.create(tmp_path / "lib")
    with pytest.raises(MoergeError, match=r"adapter_model\.bin: pickle weights are not read.*safe_serialization"):
        library.add(pickled)


def test_library_rebuild_repairs_a_corrupt_catalog(trained_expert: Path, tmp_path: Path) -> None:
    library = tmp_path / "lib"
    assert moerge("library", "create", library).returncode == 0
    assert moerge("library", "add", library, trained_expert, "--name", "e1").returncode == 0
    (library / "catalog.sqlite").write_bytes(b"not a database")
    assert_refused(moerge("library", "list", library), "catalog.sqlite", "library rebuild")
    rebuilt = moerge("library", "rebuild", library)
    assert rebuilt.returncode == 0 and "1 experts" in rebuilt.stdout, rebuilt.stderr
    assert "e1" in moerge("library", "list", library).stdout
    assert (library / ".catalog.sqlite.damaged").read_bytes() == b"not a database"


def test_a_library_create_that_fails_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    from moerge.library import ExpertLibrary, catalog

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(catalog.Catalog, "__init__", full_disk)
    with pytest.raises(OSError):
        ExpertLibrary.create(tmp_path / "lib")
    assert not (tmp_path / "lib").exists()


# ------------------------------------------------------------------------------------------- adapters


def test_an_adapter_missing_its_weights_is_refused_not_scored_as_the_base(
    tiny_base: Path, trained_expert: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from moerge.library.loading import load_model

    hollow = tmp_path / "hollow"
    hollow.mkdir()
    shutil.copy(trained_expert / "adapter_config.json", hollow)
    save_file({}, hollow / "adapter_model.safetensors")
    with pytest.raises(MoergeError, match=r"lacks weights of modules adapter_config\.json targets"):
        load_model(tiny_base, hollow)


# ---------------------------------------------------------------------------------------------- merges


def test_merge_checks_the_base_it_is_given_and_never_writes_over_an_input(
    tiny_base: Path, trained_expert: Path, tmp_path: Path
) -> None:
    other = make_tiny_base(tmp_path / "other", seed=3)
    second = tmp_path / "second"
    shutil.copytree(trained_expert, second)
    experts = f"{trained_expert},{second}"
    with unchanged(tmp_path):
        assert_refused(
            moerge("merge", "--base", other, "--experts", experts, "--method", "ties", "--out", tmp_path / "m"),
            "output.base",
            "trained on base",
        )
        assert_refused(
            moerge("merge", "--experts", experts, "--method", "ties", "--out", second, "--overwrite"),
            "one of the experts being merged",
        )


# --------------------------------------------------------------------------------------- compare --out


def test_compare_out_refuses_a_folder_of_yours_that_only_looks_like_a_compare(tmp_path: Path) -> None:
    from moerge.recipes.compare import COMPARE_MARKER, claim_out

    yours = tmp_path / "yours"
    yours.mkdir()
    (yours / "report.md").write_text("my own report")
    with unchanged(yours), pytest.raises(MoergeError, match="not a compare's folder"):
        claim_out(yours, str(tmp_path / "lib"))
    older = tmp_path / "older"  # a compare's folder from before the marker existed
    (older / "cache").mkdir(parents=True)
    (older / "report.md").write_text("written by a compare")
    assert claim_out(older, str(tmp_path / "lib")) is False
    assert (older / COMPARE_MARKER).is_file()


def test_a_compare_that_fails_before_writing_leaves_no_out_folder(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base: {tmp_path / 'no-such-base'}\nlibrary: {tmp_path / 'lib'}\nheld_in: [gym:leg_counting]\n"
        "strategies: [{name: base, kind: base}]\n"
    )
    out = tmp_path / "out"
    assert_refused(moerge("compare", recipe, "--out", out), "no-such-base")
    assert not out.exists()


# ----------------------------------------------------------------------------------- small contradictions


def test_resume_and_restart_together_are_refused(tiny_base: Path, parity_task: str, tmp_path: Path) -> None:
    args = ("train", "--base", tiny_base, "--task", parity_task, "--out", tmp_path / "x", "--resume", "--restart")
    with unchanged(tmp_path):
        assert_refused(moerge(*args), "--resume and --restart")


def test_an_unclosed_placeholder_in_a_prompt_format_is_refused(tmp_path: Path) -> None:
    from moerge.data.formats import load_prompt_format

    path = tmp_path / "fmt.yaml"
    path.write_text("user_choices: '{input}\\n{options'\n")
    with pytest.raises(MoergeError, match=r"unclosed placeholder \{options"):
        load_prompt_format(str(path))


def test_route_build_data_for_an_expert_it_does_not_have_is_refused(
    tiny_base: Path, trained_expert: Path, parity_task: str, tmp_path: Path
) -> None:
    args = ("route", "build", "--router", "centroid", "--experts", trained_expert, "--base", tiny_base)
    with unchanged(tmp_path):
        result = moerge(*args, "--data", f"nosuch={parity_task}", "--out", tmp_path / "r")
        assert_refused(result, "--data", "'nosuch' is not one of the experts")


def test_a_folder_of_yours_named_like_the_work_folder_is_left_alone(
    tiny_base: Path, parity_task: str, tmp_path: Path
) -> None:
    yours = tmp_path / ".x.work"
    yours.mkdir()
    (yours / "notes.txt").write_text("mine")
    args = ("train", "--base", tiny_base, "--task", parity_task, "--steps", "1", "--out", tmp_path / "x")
    with unchanged(tmp_path):
        assert_refused(moerge(*args), ".x.work", "moerge did not make it")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_output_to_a_full_disk_is_named_as_standard_output(trained_expert: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    library = tmp_path / "lib"
    assert moerge("library", "create", library).returncode == 0
    assert moerge("library", "add", library, trained_expert, "--name", "e1").returncode == 0
    for args in (("library", "list", library), ("library", "show", library, "e1")):
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [sys.executable, "-m", "moerge.cli", *map(str, args)],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        assert_refused(result, "error: standard output: No space left on device")
