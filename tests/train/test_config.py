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


def test_a_new_default_setting_does_not_change_the_fingerprint():
    base = TrainConfig(base="b", task="t")
    assert TrainConfig(base="b", task="t", keep_top=None, per_task_loss=False).fingerprint() == base.fingerprint()
    assert TrainConfig(base="b", task="t", per_task_loss=True).fingerprint() != base.fingerprint()
