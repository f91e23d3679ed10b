"""import_peft: a plain peft adapter gets moerge.json from its config; the base is checked by fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from library_testkit import fake_fingerprint, fake_layer_shapes, make_adapter
from safetensors import safe_open

import moerge.library.peft_import as peft_import
from moerge.errors import MoergeError
from moerge.library import ExpertLibrary


@pytest.fixture(autouse=True)
def fingerprints(monkeypatch) -> None:
    monkeypatch.setattr(peft_import, "fingerprint", fake_fingerprint)
    monkeypatch.setattr(peft_import, "base_layer_shapes", fake_layer_shapes)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {
        "lora": make_adapter(root / "lora"),
        "dora": make_adapter(root / "dora", use_dora=True, r=2, lora_alpha=4),
        "rslora": make_adapter(root / "rslora", use_rslora=True, target_modules=["o_proj"]),
    }


def with_base(adapter: Path, dest: Path, base: str | None) -> Path:
    """A copy of `adapter` whose adapter_config.json names `base` (as a user's own training run would)."""
    dest.mkdir()
    for f in adapter.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    config = json.loads((dest / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    ("kind", "method", "rank", "alpha", "targets"),
    [
        ("lora", "lora", 4, 8, ["q_proj", "v_proj"]),
        ("dora", "dora", 2, 4, ["q_proj", "v_proj"]),
        ("rslora", "rslora", 4, 8, ["o_proj"]),
    ],
)
def test_import_fills_metadata_from_peft_config(tmp_path, adapters, kind, method, rank, alpha, targets) -> None:
    lib = ExpertLibrary.create(tmp_path / "lib")
    src = with_base(adapters[kind], tmp_path / kind, "/models/tiny-llama")
    assert lib.import_peft(src, task="gsm", base="tiny-llama") == kind
    meta = lib.meta(kind)
    assert (meta.method, meta.task.name, meta.base.fingerprint) == (method, "gsm", "fp-tiny")
    hp = meta.hyperparameters
    assert (hp["rank"], hp["alpha"], hp["targets"]) == (rank, alpha, targets)
    assert meta.task.data_hash == "unknown" and meta.provenance["data"] == "unknown"
    assert meta.provenance["base_check"].startswith("fingerprint matches")
    with safe_open(str(src / "adapter_model.safetensors"), framework="pt") as fh:
        expected = sum(fh.get_tensor(k).numel() for k in fh.keys())  # noqa: SIM118
    assert meta.cost["trainable_params"] == expected
    folder = lib.path(kind)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "moerge.json",
    ]
    assert (folder / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()


def test_base_mismatch_refused_unresolvable_noted(tmp_path, adapters) -> None:
    lib = ExpertLibrary.create(tmp_path / "lib")
    wrong = with_base(adapters["lora"], tmp_path / "wrong", "/models/other")
    with pytest.raises(MoergeError, match=r"adapter_config.json: base_model_name_or_path '/models/other'.*fp-other"):
        lib.import_peft(wrong, task="t", base="tiny-llama")
    assert lib.names() == []
    hub = with_base(adapters["lora"], tmp_path / "hub", "someone/unreachable-model")
    lib.import_peft(hub, task="t", base="tiny-llama", name="from-hub")
    assert lib.meta("from-hub").provenance["base_check"].startswith("not checked: adapter_config.json base")
    with pytest.raises(MoergeError, match="model not found"):  # the claimed base itself must resolve
        lib.import_peft(hub, task="t", base="nowhere", name="x")


def test_import_refuses_pickles_and_non_adapters(tmp_path, adapters) -> None:
    lib = ExpertLibrary.create(tmp_path / "lib")
    pickled = with_base(adapters["lora"], tmp_path / "pickled", None)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(MoergeError, match=r"adapter_model\.bin: pickle weights are not read"):
        lib.import_peft(pickled, task="t", base="tiny-llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoergeError, match=r"adapter_config\.json: not found"):
        lib.import_peft(tmp_path / "empty", task="t", base="tiny-llama")
    assert lib.names() == []


def test_import_reads_any_peft_adapter_and_refuses_bad_configs(tmp_path, adapters) -> None:
    from library_testkit import tiny_llama_config
    from peft import IA3Config, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), IA3Config(target_modules=["k_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.import_peft(tmp_path / "ia3", task="t", base="tiny-llama")
    meta = lib.meta("ia3")
    assert meta.method == "ia3" and meta.hyperparameters["rank"] == "unknown"
    assert meta.hyperparameters["targets"] == ["k_proj"] and meta.cost["trainable_params"] == 2 * 32
    bad = with_base(adapters["lora"], tmp_path / "bad", None)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": "eight"}))
    with pytest.raises(MoergeError, match=r"bad/adapter_config\.json: r: Input should be a valid integer"):
        lib.import_peft(bad, task="t", base="tiny-llama")
    assert lib.names() == ["ia3"]


def test_real_fingerprints_accept_true_base_and_refuse_another(tmp_path, tiny_base, monkeypatch) -> None:
    """With the real fingerprint (moerge.models.loading): the adapter's recorded base folder decides."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers import make_tiny_base
    from moerge.models.loading import fingerprint

    monkeypatch.setattr(peft_import, "fingerprint", fingerprint)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_base
    )
    other = make_tiny_base(tmp_path / "other", seed=1)
    lib = ExpertLibrary.create(tmp_path / "lib")
    with pytest.raises(MoergeError, match="is not the base"):
        lib.import_peft(tmp_path / "adapter", task="t", base=str(other))
    copy = tmp_path / "copy_of_base"  # same weights in another folder: same fingerprint, accepted
    copy.mkdir()
    for f in Path(tiny_base).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    lib.import_peft(tmp_path / "adapter", task="t", base=str(copy))
    assert lib.meta("adapter").base.fingerprint == fingerprint(str(tiny_base))
    assert lib.meta("adapter").provenance["base_check"].startswith("fingerprint matches")
