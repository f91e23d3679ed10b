"""Writing a merge as a full model: base weights plus the merged update, as sharded safetensors.

Memory stays near one base tensor plus one module's expert updates: base tensors are read one at
a time and streamed into the output shards (safetensors is a JSON header followed by raw bytes,
and every output shape and dtype is known from the base's headers before any data is read). Every
tensor is checked finite (`check_finite`) before its bytes are written, and a merge whose update is
zero everywhere is refused. The base must be a safetensors folder whose fingerprint the experts
recorded (`check_same_base`).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.library.adapter import check_same_base
from moerge.merge.plan import MergePlan, release_freed_memory
from moerge.models.loading import SafetensorsFile, check_finite, open_safetensors
from moerge.paths import parse_json, write_json_atomic

Progress = Callable[[int, int, str], None]
INDEX_FILE = "model.safetensors.index.json"
_ITEM_SIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
              "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * _ITEM_SIZE[self.dtype]


def resolve_base_folder(base: str | Path) -> Path:
    """A local base model folder (a packaged/cached name is turned into its folder)."""
    from moerge.models import resolve_base

    folder = Path(resolve_base(base)).expanduser()
    if not folder.is_dir():
        raise MoergeError(f"output.base: {base} is not a local model folder")
    return folder


def check_base_fingerprint(plan: MergePlan, base: Path) -> str:
    """The base's fingerprint, refused when the experts were trained on another base."""
    from moerge.models import fingerprint

    actual = fingerprint(base)
    check_same_base(plan.experts, actual, base_name=f"output.base {base}")
    return actual


def base_tensors(folder: Path) -> list[TensorSpec]:
    """Every tensor of the base checkpoint (single file or index), in file order."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = parse_json(index.read_bytes(), index)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise MoergeError(f"{index}: weight_map: expected a mapping of tensor names to files")
        files = sorted({folder / str(f) for f in weight_map["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MoergeError(f"output.base: {folder} holds no safetensors weights")
    specs = []
    for file in files:
        with open_safetensors(file) as fh:
            for name in fh:
                view = fh.handle.get_slice(name)
                specs.append(TensorSpec(name, file, view.get_dtype(), tuple(view.get_shape())))
    return specs


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_safetensors_stream(path: Path, specs: list[TensorSpec], tensors: Iterator[torch.Tensor]) -> None:
    """Write the header for `specs`, then each tensor's bytes as it arrives (same order)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for spec, tensor in zip(specs, tensors, strict=True):
            check_finite({spec.name: tensor}, path)
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != spec.nbytes:
                raise MoergeError(f"{spec.name}: merged tensor has {data.nbytes} bytes, expected {spec.nbytes}")
            fh.write(memoryview(data))


def check_modules_in_base(plan: MergePlan, specs: dict[str, TensorSpec]) -> None:
    """Every merged module must be a 2-D weight of the base with the expert's shape."""
    for module in plan.modules:
        spec = specs.get(f"{module}.weight")
        if spec is None:
            raise MoergeError(f"output.base: has no weight {module}.weight that the experts adapt")
        expected = next(e.shape(module) for e in plan.experts if module in e.modules)
        if plan.fan_in_fan_out:
            expected = expected[::-1]
        if spec.shape != expected:
            raise MoergeError(f"output.base: {module}.weight is {spec.shape}, experts expect {expected}")


def merged_tensors(
    plan: MergePlan, shard: list[TensorSpec], on_module: Callable[[str, bool], None]
) -> Iterator[torch.Tensor]:
    """Base tensors of one shard, each target weight plus its merged update, in base dtype."""
    targets = {f"{m}.weight": m for m in plan.modules}
    readers: dict[Path, SafetensorsFile] = {}
    for spec in shard:
        if spec.file not in readers:
            readers[spec.file] = SafetensorsFile.open(spec.file)
        tensor = readers[spec.file].get_tensor(spec.name)
        module = targets.get(spec.name)
        if module is not None:
            delta = plan.delta(module)
            delta = delta.T if plan.fan_in_fan_out else delta
            on_module(module, bool(delta.count_nonzero()))
            tensor = (tensor.float() + delta).to(tensor.dtype)
            del delta
            release_freed_memory()
        yield tensor


def write_full(
    folder: Path,
    plan: MergePlan,
    base: Path,
    *,
    max_shard_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> list[str]:
    """Write base + merged update into `folder` with the base's config and tokenizer files."""
    specs = base_tensors(base)
    check_modules_in_base(plan, {s.name: s for s in specs})
    shards = plan_shards(specs, max_shard_bytes)
    done = itertools.count(1)
    changed_modules: list[bool] = []

    def on_module(module: str, changed: bool) -> None:
        changed_modules.append(changed)
        if progress:
            progress(next(done), len(plan.modules), module)

    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for name, shard in zip(names, shards, strict=True):
        shard = sorted(shard, key=lambda s: -_ITEM_SIZE[s.dtype])  # keeps every tensor aligned
        write_safetensors_stream(folder / name, shard, merged_tensors(plan, shard, on_module))
    plan.check_nonzero(any(changed_modules))
    if len(shards) > 1:
        weight_map = {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard}
        total = sum(s.nbytes for s in specs)
        write_json_atomic(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for extra in sorted(base.iterdir()):
        if (
            extra.is_file()
            and not extra.name.endswith(_WEIGHT_SUFFIXES)
            and extra.name not in (INDEX_FILE, "moerge.json")
        ):
            shutil.copy2(extra, folder / extra.name)
    return names
