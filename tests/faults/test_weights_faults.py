"""Faults in weights and their records: pickles, damaged safetensors, NaN/inf values, degenerate merge
options, peft configs and shapes at import, and `moerge.json` file maps that leave the weights unhashed.

Each bad input is refused by the command a user runs: exit 2, one `error:` line naming the file or
field, no traceback, and nothing that existed before changes.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faultkit import assert_refused, interrupt, moerge, unchanged
from safetensors.torch import load_file, save_file

from moerge.library.expert import METADATA_FILE, read_expert_meta, write_expert_meta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def derive(
    src: Path,
    dest: Path,
    *,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    config: dict | None = None,
    plain: bool = False,
    rehash: bool = True,
) -> Path:
    """A copy of the expert `src` with its tensors and/or config changed. `plain` drops `moerge.json`
    (a plain peft folder); otherwise `rehash` re-records the hashes, so only the change itself is at
    fault, not a hash mismatch."""
    shutil.copytree(src, dest)
    if tensors is not None:
        weights = load_file(dest / ADAPTER_WEIGHTS)
        tensors(weights)
        save_file(weights, dest / ADAPTER_WEIGHTS)
    if config is not None:
        raw = json.loads((dest / ADAPTER_CONFIG).read_text())
        raw.update(config)
        (dest / ADAPTER_CONFIG).write_text(json.dumps(raw))
    if plain:
        (dest / METADATA_FILE).unlink()
    elif rehash:
        write_expert_meta(dest, read_expert_meta(dest))
    return dest


def first_key(weights: dict[str, torch.Tensor], part: str = "lora_A") -> str:
    return next(k for k in sorted(weights) if part in k)


def poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(weights: dict[str, torch.Tensor]) -> None:
        weights[first_key(weights, "lora_B")].view(-1)[0] = value

    return change


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_header(path: Path) -> None:
    """Flip a byte inside the JSON header (after the 8-byte length): the file no longer parses."""
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


@pytest.fixture
def pair(trained_expert: Path, inputs: Path) -> tuple[Path, Path]:
    """Two intact experts (same base) to merge a faulty one with."""
    return derive(trained_expert, inputs / "one", rehash=False), derive(trained_expert, inputs / "two", rehash=False)


# ---------------------------------------------------------------------------------------- pickles


def test_pickled_adapter_is_refused_unread_by_eval_and_merge(
    tiny_base: Path, parity_task: str, trained_expert: Path, inputs: Path, tmp_path: Path
) -> None:
    pickled = derive(trained_expert, inputs / "pickled", plain=True)
    (pickled / ADAPTER_WEIGHTS).rename(pickled / "adapter_model.bin")  # never unpickled, so any bytes do
    with unchanged(inputs, trained_expert):
        result = moerge("eval", "--base", tiny_base, "--task", parity_task, "--adapter", pickled)
        line = assert_refused(result, pickled / "adapter_model.bin")
        assert "safetensors" in line and "save_pretrained" in line
        result = moerge(
            "merge", "--method", "linear", "--experts", f"{pickled},{trained_expert}", "--out", tmp_path / "m"
        )
        assert_refused(result, pickled / "adapter_model.bin")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def pickled_base(tiny_base: Path, inputs: Path) -> Path:
    """The tiny base with its weights as `pytorch_model.bin` only (written as a pickle here)."""
    folder = inputs / "pickled_base"
    shutil.copytree(tiny_base, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("command", ["eval", "train", "merge-full"])
def test_base_folder_with_only_pickled_weights_is_refused(
    command: str, pickled_base: Path, parity_task: str, trained_expert: Path, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = {
        "eval": ["eval", "--base", pickled_base, "--task", parity_task, "--limit", "2"],
        "train": ["train", "--base", pickled_base, "--task", parity_task, "--steps", "1", "--out", out],
        "merge-full": [*shlex.split("merge --method linear --kind full --experts"), trained_expert],
    }[command]
    if command == "merge-full":
        args += ["--base", pickled_base, "--out", out]
    with unchanged(inputs, trained_expert):
        line = assert_refused(moerge(*args, cwd=tmp_path), pickled_base / "pytorch_model.bin")
    assert "save_pretrained" in line
    assert not out.exists() and not (tmp_path / ".out.work").exists()


# ---------------------------------------------------------------------------------------- damaged safetensors


def test_truncated_and_bit_flipped_adapters_are_refused(
    tiny_base: Path, parity_task: str, trained_expert: Path, inputs: Path, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    recorded = derive(trained_expert, inputs / "recorded", rehash=False)
    flip_header(recorded / ADAPTER_WEIGHTS)  # an expert: its recorded sha256 catches any change
    truncated = derive(trained_expert, inputs / "truncated", plain=True)
    truncate(truncated / ADAPTER_WEIGHTS)  # plain peft: the safetensors reader catches it
    flipped = derive(trained_expert, inputs / "flipped", plain=True)
    flip_header(flipped / ADAPTER_WEIGHTS)
    with unchanged(inputs, trained_expert):
        result = moerge("merge", "--method", "linear", "--experts", f"{pair[0]},{recorded}", "--out", tmp_path / "m")
        assert "sha256 mismatch" in assert_refused(result, recorded / ADAPTER_WEIGHTS)
        for damaged in (truncated, flipped):
            result = moerge("eval", "--base", tiny_base, "--task", parity_task, "--adapter", damaged)
            assert "not a readable safetensors file" in assert_refused(result, damaged / ADAPTER_WEIGHTS)
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def built_router(tiny_base: Path, trained_expert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real router folder with tensors (Arrow keeps a prototype per expert and layer), built once."""
    folder = tmp_path_factory.mktemp("faults_router")
    experts = [derive(trained_expert, folder / name, rehash=False) for name in ("one", "two")]
    result = moerge(
        "route",
        "build",
        "--router",
        "arrow",
        "--experts",
        ",".join(map(str, experts)),
        "--base",
        tiny_base,
        "--out",
        folder / "router",
        env={"MOERGE_HOME": str(folder / "home")},  # module scope: before the per-test $MOERGE_HOME is set
    )
    assert result.returncode == 0, result.stderr
    return folder / "router"


@pytest.fixture
def router(built_router: Path, inputs: Path) -> Path:
    return Path(shutil.copytree(built_router, inputs / "router"))


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "nan"])
def test_damaged_router_tensors_are_refused(
    damage: str, router: Path, tiny_base: Path, parity_task: str, inputs: Path
) -> None:
    tensors = router / "tensors.safetensors"
    if damage == "truncated":
        truncate(tensors)
    elif damage == "bit-flipped":
        flip_header(tensors)
    else:
        values = load_file(tensors)
        next(v for v in values.values() if v.is_floating_point()).view(-1)[0] = float("nan")
        save_file(values, tensors)
    with unchanged(inputs):
        line = assert_refused(moerge("eval", "--base", tiny_base, "--task", parity_task, "--router", router), tensors)
    assert ("NaN" if damage == "nan" else "not a readable safetensors file") in line


TRAIN = shlex.split("train --rank 2 --steps 400 --batch-size 2 --max-length 32 --checkpoint-every 1 --out expert")


@pytest.fixture(scope="module")
def killed_run(tiny_base: Path, parity_task: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The work folder of a training run killed (SIGKILL) right after its first checkpoint, made once."""
    folder = tmp_path_factory.mktemp("faults_killed")
    args = [*TRAIN, "--base", tiny_base, "--task", parity_task]
    status, stderr = interrupt(args, ".expert.work/checkpoint/state.json", signal.SIGKILL, cwd=folder)
    assert status == -signal.SIGKILL, stderr
    return folder / ".expert.work"


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_damaged_checkpoint_is_refused_on_resume(
    damage: str, killed_run: Path, tiny_base: Path, parity_task: str, tmp_path: Path
) -> None:
    workdir = Path(shutil.copytree(killed_run, tmp_path / ".expert.work"))
    params = workdir / "checkpoint" / "trainable.safetensors"
    truncate(params) if damage == "truncated" else flip_header(params)
    with unchanged(workdir):
        result = moerge(*TRAIN, "--base", tiny_base, "--task", parity_task, "--resume", cwd=tmp_path)
        assert "checkpoint" in assert_refused(result, params.name)
    assert not (tmp_path / "expert").exists()


# ---------------------------------------------------------------------------------------- NaN / inf


def test_nan_and_inf_in_an_adapter_are_refused_by_merge_route_and_eval(
    tiny_base: Path, parity_task: str, trained_expert: Path, inputs: Path, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    nan = derive(trained_expert, inputs / "nan", tensors=poison(float("nan")))  # hashes re-recorded: only NaN is wrong
    inf = derive(trained_expert, inputs / "inf", tensors=poison(float("inf")), plain=True)
    with unchanged(inputs, trained_expert):
        result = moerge("merge", "--method", "ties", "--experts", f"{pair[0]},{nan}", "--out", tmp_path / "m")
        assert "NaN or infinite" in assert_refused(result, nan / ADAPTER_WEIGHTS)
        result = moerge(
            "route",
            "build",
            "--router",
            "uniform",
            "--experts",
            f"{pair[0]},{inf}",
            "--base",
            tiny_base,
            "--out",
            tmp_path / "r",
        )
        assert "NaN or infinite" in assert_refused(result, inf / ADAPTER_WEIGHTS)
        result = moerge("eval", "--base", tiny_base, "--task", parity_task, "--adapter", nan)
        assert "NaN or infinite" in assert_refused(result, nan / ADAPTER_WEIGHTS)
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


def test_nan_scaling_in_an_adapter_config_is_refused(
    trained_expert: Path, inputs: Path, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    nan_alpha = derive(trained_expert, inputs / "nan_alpha", config={"lora_alpha": float("nan")})
    assert "NaN" in (nan_alpha / ADAPTER_CONFIG).read_text()  # what json.dumps writes, and peft would read
    with unchanged(inputs, trained_expert):
        result = moerge("merge", "--method", "linear", "--experts", f"{pair[0]},{nan_alpha}", "--out", tmp_path / "m")
        assert "finite" in assert_refused(result, nan_alpha / ADAPTER_CONFIG, "lora_alpha")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--scaling", "nan"], "scaling"),
        (["--scaling", "0"], "scaling"),
        (["--weights", "1,inf"], "weight"),
        (["--method", "lines", "--lines-alpha", "nan", "--lines-beta", "0.5"], "lines_alpha"),
    ],
)
def test_nan_inf_and_zero_merge_options_are_refused(
    flags: list[str], field: str, pair: tuple[Path, Path], inputs: Path, tmp_path: Path
) -> None:
    method = [] if "--method" in flags else ["--method", "task_arithmetic"]
    with unchanged(inputs):
        result = moerge("merge", *method, *flags, "--experts", ",".join(map(str, pair)), "--out", tmp_path / "m")
        assert_refused(result, field)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_density_zero_is_refused(method: str, pair: tuple[Path, Path], inputs: Path, tmp_path: Path) -> None:
    with unchanged(inputs):
        result = moerge(
            "merge",
            "--method",
            method,
            "--density",
            "0",
            "--experts",
            ",".join(map(str, pair)),
            "--out",
            tmp_path / "m",
        )
        assert "greater than 0" in assert_refused(result, "density")
    assert not (tmp_path / "m").exists()


def test_a_merge_whose_update_is_zero_everywhere_is_refused(
    pair: tuple[Path, Path], inputs: Path, tmp_path: Path
) -> None:
    with unchanged(inputs):
        result = moerge(
            "merge",
            "--method",
            "task_arithmetic",
            "--weights",
            "0,0",
            "--experts",
            ",".join(map(str, pair)),
            "--out",
            tmp_path / "m",
        )
        assert "zero in every module" in assert_refused(result, "merge")
        for rank in ([], ["--rank", "2"]):  # equal experts cancel out: exact factors, and refactored by SVD
            result = moerge(
                "merge",
                "--method",
                "task_arithmetic",
                "--weights",
                "1,-1",
                *rank,
                "--experts",
                ",".join(map(str, pair)),
                "--out",
                tmp_path / "m",
            )
            assert "zero in every module" in assert_refused(result, "merge")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------- import-peft


@pytest.fixture
def library(tmp_path: Path) -> Path:
    from moerge.library import ExpertLibrary

    ExpertLibrary.create(tmp_path / "lib")
    return tmp_path / "lib"


def _narrow(weights: dict[str, torch.Tensor]) -> None:
    """Every lora_A reads 48 inputs instead of the base's 64: an adapter of another base."""
    for key in [k for k in weights if "lora_A" in k and weights[k].shape[1] == 64]:
        weights[key] = weights[key][:, :48].contiguous()


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"config": {"r": "eight"}}, [ADAPTER_CONFIG, "r:"]),
        ({"config": {"target_modules": 42}}, [ADAPTER_CONFIG, "target_modules"]),
        ({"config": {"lora_alpha": float("inf")}}, [ADAPTER_CONFIG, "lora_alpha"]),
        ({"config": {"base_model_name_or_path": None}, "tensors": _narrow}, ["(out, in)", "--base"]),
        ({"tensors": poison(float("nan"))}, [ADAPTER_WEIGHTS, "NaN"]),
    ],
    ids=["rank-not-a-number", "targets-not-names", "inf-alpha", "shapes-of-another-base", "nan-weights"],
)
def test_import_peft_validates_config_shapes_and_values_first(
    change: dict, names: list[str], tiny_base: Path, trained_expert: Path, inputs: Path, library: Path
) -> None:
    adapter = derive(trained_expert, inputs / "peft", plain=True, **change)
    with unchanged(inputs, library):
        result = moerge("library", "import-peft", library, adapter, "--task", "parity", "--base", tiny_base)
        assert_refused(result, adapter, *names)


# ---------------------------------------------------------------------------------------- moerge.json files map


@pytest.fixture
def unlisted(trained_expert: Path, inputs: Path) -> Path:
    """An expert whose moerge.json no longer lists its weights, and whose weights were swapped since."""
    folder = derive(trained_expert, inputs / "unlisted", tensors=poison(123.0), rehash=False)
    meta = json.loads((folder / METADATA_FILE).read_text())
    del meta["files"][ADAPTER_WEIGHTS]
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


def test_unlisted_weights_are_refused_by_load_add_merge(
    unlisted: Path,
    tiny_base: Path,
    parity_task: str,
    pair: tuple[Path, Path],
    inputs: Path,
    library: Path,
    tmp_path: Path,
) -> None:
    with unchanged(inputs, library):
        result = moerge("eval", "--base", tiny_base, "--task", parity_task, "--adapter", unlisted)
        assert "not listed" in assert_refused(result, unlisted / METADATA_FILE, ADAPTER_WEIGHTS)
        assert_refused(moerge("library", "add", library, unlisted), METADATA_FILE, ADAPTER_WEIGHTS)
        result = moerge("merge", "--method", "linear", "--experts", f"{pair[0]},{unlisted}", "--out", tmp_path / "m")
        assert_refused(result, unlisted / METADATA_FILE, ADAPTER_WEIGHTS)
    assert not (tmp_path / "m").exists()


def test_verify_reports_an_expert_whose_map_omits_its_weights(trained_expert: Path, library: Path) -> None:
    from moerge.library import ExpertLibrary

    ExpertLibrary(library).add(trained_expert, name="parity")
    meta_file = library / "parity" / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    del meta["files"][ADAPTER_WEIGHTS]
    meta_file.write_text(json.dumps(meta))
    result = moerge("library", "verify", library)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    report = " ".join(result.stdout.split())  # the console may wrap long lines
    assert "corrupted parity" in report and f"{ADAPTER_WEIGHTS} is not listed" in report


def test_every_file_of_a_full_expert_must_be_listed(tmp_path: Path) -> None:
    from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, verify_expert_files

    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    meta = ExpertMeta(name="f", kind="full", method="full", task=TaskInfo(name="t"), base=BaseInfo(name_or_path="b"))
    write_expert_meta(folder, meta)
    assert verify_expert_files(folder) == []
    (folder / "tokenizer.json").write_text("{}")  # dropped in after the hashes were recorded: a loader reads it
    assert [p.split(": ", 2)[1:] for p in verify_expert_files(folder)] == [
        ["files", "tokenizer.json is not listed (no recorded sha256 vouches for it)"]
    ]
    listed = json.loads((folder / METADATA_FILE).read_text())
    del listed["files"]["model.safetensors"]
    (folder / "tokenizer.json").unlink()
    (folder / METADATA_FILE).write_text(json.dumps(listed))
    assert "*.safetensors (the model's weights) is not listed" in verify_expert_files(folder)[0]
