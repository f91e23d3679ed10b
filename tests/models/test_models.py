from pathlib import Path

import pytest
import torch

from helpers import make_tiny_base
from moerge.errors import MoergeError
from moerge.models import fetch_model, fingerprint, load_base, resolve_base


def test_fingerprint_same_for_folder_and_loaded_model(tiny_base):
    model, _ = load_base(tiny_base)
    assert fingerprint(tiny_base) == fingerprint(model)


def test_fingerprint_ignores_dtype_but_not_weights(tiny_base, tmp_path):
    model, _ = load_base(tiny_base)
    assert fingerprint(model.to(torch.bfloat16)) == fingerprint(tiny_base)
    other = make_tiny_base(tmp_path / "other", seed=1)
    assert fingerprint(other) != fingerprint(tiny_base)


def test_resolve_base_accepts_folder_and_passes_hub_ids(tiny_base):
    assert resolve_base(tiny_base) == str(tiny_base)
    assert resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_resolve_base_rejects_folder_without_config(tmp_path):
    with pytest.raises(MoergeError, match=r"no config\.json"):
        resolve_base(tmp_path)


def test_missing_local_path_is_clear():
    with pytest.raises(MoergeError, match="no such model folder"):
        resolve_base("./not/here/model")


def test_unknown_packaged_model_lists_known():
    with pytest.raises(MoergeError, match="smollm2-135m-instruct"):
        fetch_model("gpt-17")


def test_cached_name_resolves(isolated_home: Path, tiny_base):
    import shutil

    shutil.copytree(tiny_base, isolated_home / "models" / "mine")
    assert resolve_base("mine") == str(isolated_home / "models" / "mine")
