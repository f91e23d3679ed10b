"""Training settings: typed options per method, refused with file:line and the method's options."""

import pytest
import yaml

from moerge.errors import MoergeError
from moerge.train.config import StagedConfig, TrainConfig, load_train_config
from moerge.train.methods.datadriven import CordaOptions


def _write(tmp_path, data) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_flat_and_nested_method_options_give_the_same_config(tmp_path):
    flat = load_train_config(_write(tmp_path, {"base": "b", "task": "t", "method": "corda", "corda_mode": "kpm"}))
    nested = load_train_config(
        _write(tmp_path, {"base": "b", "task": "t", "method": {"name": "corda", "corda_mode": "kpm"}})
    )
    assert isinstance(flat.method_options, CordaOptions) and flat.method_options.corda_mode == "kpm"
    assert flat == nested and flat.fingerprint() == nested.fingerprint()


def test_an_option_the_method_does_not_take_is_refused_with_file_line_and_options(tmp_path):
    path = _write(tmp_path, {"base": "b", "task": "t", "method": "ia3", "rank": 8})
    with pytest.raises(
        MoergeError,
        match=r"train\.yaml:4: rank: not a training setting, nor an option of method 'ia3' "
        r"\(its options: target_modules\)",
    ):
        load_train_config(path)
    with pytest.raises(MoergeError, match=r"train\.yaml:3: method: unknown training method 'lorra'"):
        load_train_config(_write(tmp_path, {"base": "b", "task": "t", "method": "lorra"}))
    with pytest.raises(MoergeError, match=r"train\.yaml:4: rank: Input should be greater than or equal to 1"):
        load_train_config(_write(tmp_path, {"base": "b", "task": "t", "method": "lora", "rank": 0}))


def test_command_line_options_win_and_are_checked_the_same_way(tmp_path):
    path = _write(tmp_path, {"base": "b", "task": "t", "rank": 4})
    assert load_train_config(path, {"rank": 16, "steps": None}).method_options.rank == 16
    with pytest.raises(MoergeError, match=r"freeze_layers: not a training setting, nor an option of method 'lora'"):
        load_train_config(path, {"freeze_layers": 2})


def test_top_level_options_are_defaults_for_the_stages_whose_method_takes_them(tmp_path):
    recipe = load_train_config(
        _write(
            tmp_path,
            {"base": "b", "task": "t", "rank": 4, "stages": [{"name": "a"}, {"method": "full", "start": "merge"}]},
        )
    )
    assert isinstance(recipe, StagedConfig)
    assert recipe.stages[0].method_options.rank == 4 and recipe.stages[1].method_options.model_dump() == {}
    with pytest.raises(
        MoergeError, match=r"train\.yaml:\d+: stages\.1\.rank: not a training setting, nor an option of method 'full'"
    ):
        load_train_config(
            _write(tmp_path, {"base": "b", "task": "t", "stages": [{"name": "a"}, {"method": "full", "rank": 2}]})
        )


def test_fingerprints_of_experts_trained_before_the_options_models_are_unchanged():
    """Library experts record `config_hash`; these values were computed by the flat TrainConfig of the
    previous release, so an upgrade does not retrain a library."""
    demo = TrainConfig(
        base="b",
        task="t",
        rank=8,
        alpha=16,
        lr=0.001,
        steps=30,
        batch_size=8,
        max_length=160,
        eval_split=None,
        name="x",
    )
    assert demo.fingerprint() == "0cda24c17e5d0ab5"
    mixture = TrainConfig(
        base="b",
        tasks=["a", "b"],
        rank=8,
        alpha=16,
        lr=0.001,
        steps=180,
        batch_size=8,
        max_length=160,
        mixing="proportional",
        eval_split=None,
    )
    assert mixture.fingerprint() == "6525234330445793"
    assert TrainConfig(base="b", task="t", method="eva", init_batches=2).fingerprint() == "ba585f1d6fa377d3"
    assert TrainConfig(base="b", task="t", method="corda", corda_mode="kpm").fingerprint() == "5e81cd456fedc2ca"
    previous = {
        "full": "ae71320115c5ae93",
        "hft": "aa1726cd6669c0b3",
        "bitfit": "eb581a143f3a4e18",
        "ia3": "efbc7556430e0c23",
    }
    for method, fingerprint in previous.items():
        assert TrainConfig(base="b", task="t", method=method).fingerprint() == fingerprint, method
    assert TrainConfig(base="b", task="t", method="freeze_lower", freeze_layers=2).fingerprint() == "09e6c32ff2b4e129"


def test_a_new_default_setting_does_not_change_the_fingerprint():
    base = TrainConfig(base="b", task="t")
    assert TrainConfig(base="b", task="t", keep_top=None, per_task_loss=False).fingerprint() == base.fingerprint()
    assert TrainConfig(base="b", task="t", per_task_loss=True).fingerprint() != base.fingerprint()


def test_a_misspelt_top_level_key_of_a_staged_recipe_is_refused(tmp_path):
    path = _write(tmp_path, {"base": "b", "task": "t", "rnak": 4, "stages": [{"name": "a"}]})
    with pytest.raises(MoergeError, match=r"train\.yaml:\d+: stages\.0\.rnak: not a training setting"):
        load_train_config(path)


def test_command_line_options_apply_to_the_stages_that_take_them(tmp_path):
    path = _write(tmp_path, {"base": "b", "task": "t", "stages": [{"name": "a"}, {"method": "full", "start": "merge"}]})
    recipe = load_train_config(path, {"rank": 16})
    assert recipe.stages[0].method_options.rank == 16 and recipe.stages[1].method == "full"
    only_full = _write(tmp_path, {"base": "b", "task": "t", "method": "full", "stages": [{"name": "a"}]})
    with pytest.raises(MoergeError, match=r"^command-line options: rank: no stage's method \(full\) takes it$"):
        load_train_config(only_full, {"rank": 16})


@pytest.mark.parametrize("method", [["lora"], {"name": ["x"]}, 3])
def test_a_method_that_is_not_a_name_is_one_line(tmp_path, method):
    with pytest.raises(MoergeError, match=r"train\.yaml:\d+: method: ") as info:
        load_train_config(_write(tmp_path, {"base": "b", "task": "t", "method": method}))
    assert "\n" not in str(info.value)


def test_prompt_format_in_the_fingerprint_only_when_not_moerge(tmp_path):
    base = TrainConfig(base="b", task="t")
    assert TrainConfig(base="b", task="t", prompt_format="moerge").fingerprint() == base.fingerprint()
    assert TrainConfig(base="b", task="t", prompt_format="moerge").prompt_format is None
    plain = TrainConfig(base="b", task="t", prompt_format="plain")
    assert plain.fingerprint() != base.fingerprint() and plain.format.name == "plain"
    inline = TrainConfig(base="b", task="t", prompt_format={"name": "plain", "user_choices": "{input}"})
    assert inline.fingerprint() == plain.fingerprint()
    path = tmp_path / "train.yaml"
    path.write_text("base: b\ntask: t\nprompt_format:\n  user: 'Q: {qestion}'\n")
    with pytest.raises(MoergeError, match=rf"{path}:4: prompt_format: user: unknown placeholder \{{qestion\}}"):
        load_train_config(path)
