"""Merging benchmark: moerge against peft and against a naive full-weight merge.

1. Adapter: TIES-merge 8 LoRA experts to one rank-16 adapter, experts on disk → adapter on disk.
   moerge (`run_merge`, reads safetensors only) vs peft (`PeftModel` + `load_adapter` × 8 +
   `add_weighted_adapter(combination_type="ties_svd")` + `save_pretrained`).
2. Full: TIES-merge the same experts into a full model on disk. moerge (streams the base tensor by
   tensor) vs holding all 8 merged models in memory (`merge_and_unload` each, then TIES over their
   weight differences, then `save_pretrained`).

Each side runs in its own subprocess and reports its own wall time (after imports) and peak RSS.
Without --experts, 8 random LoRA experts (r=8 on q,k,v,o,gate,up,down) of --base are generated.

    python benchmarks/merge_bench.py --base /tmp/dl/smol_st [--experts d1,d2,...] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_experts(base: Path, folder: Path, n: int, rank: int, seed: int = 0) -> list[Path]:
    """Random LoRA experts of `base` (shapes from its safetensors headers, no model is built)."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    shapes = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
                    shapes[module] = fh.get_slice(key).get_shape()
    generator = torch.Generator().manual_seed(seed)
    experts = []
    for k in range(n):
        tensors = {}
        for module, (out_features, in_features) in shapes.items():
            a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            b = torch.randn(out_features, rank, generator=generator) * 0.01
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
        expert = folder / f"expert{k}"
        expert.mkdir(parents=True, exist_ok=True)
        save_file(tensors, expert / "adapter_model.safetensors", {"format": "pt"})
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
        config.base_model_name_or_path = str(base)
        config.save_pretrained(expert)
        experts.append(expert)
    return experts


# --- sides (each runs in its own process) -----------------------------------------------------------


def moerge_spec(args: argparse.Namespace, kind: str, out: Path):  # -> MergeSpec (imported lazily)
    from moerge.merge import MergeSpec

    output = {"kind": kind, "rank": args.rank, "out": str(out), "base": str(args.base), "overwrite": True}
    return MergeSpec.model_validate(
        {
            "method": "ties",
            "experts": [{"path": str(p)} for p in args.experts],
            "parameters": {"density": args.density},
            "output": {k: v for k, v in output.items() if not (kind == "full" and k == "rank")},
        }
    )


def side_moerge(kind: str) -> Callable[[argparse.Namespace], Callable[[], None]]:
    def side(args: argparse.Namespace) -> Callable[[], None]:
        from moerge.merge import run_merge

        def work() -> None:
            run_merge(moerge_spec(args, kind, args.work / f"moerge_{kind}"))

        return work

    return side


def side_peft_adapter(args: argparse.Namespace) -> Callable[[], None]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def work() -> None:
        names = [f"e{k}" for k in range(len(args.experts))]
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(args.base), args.experts[0], adapter_name=names[0]
        )
        for name, folder in zip(names[1:], args.experts[1:], strict=True):
            model.load_adapter(folder, adapter_name=name)
        model.add_weighted_adapter(
            names,
            [1.0] * len(names),
            "merged",
            combination_type="ties_svd",
            svd_rank=args.rank,
            density=args.density,
        )
        model.save_pretrained(args.work / "peft_adapter", selected_adapters=["merged"])

    return work


def side_naive_full(args: argparse.Namespace) -> Callable[[], None]:
    import torch
    from peft import PeftModel
    from peft.utils.merge_utils import ties
    from transformers import AutoModelForCausalLM

    def work() -> None:
        base = AutoModelForCausalLM.from_pretrained(args.base)
        merged_models = [
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base), folder).merge_and_unload()
            for folder in args.experts
        ]
        states = [m.state_dict() for m in merged_models]
        weights = torch.ones(len(states))
        with torch.no_grad():
            for name, param in base.state_dict().items():
                if name.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS:
                    diffs = [s[name].float() - param.float() for s in states]
                    param += ties(diffs, weights, args.density).to(param.dtype)
        base.save_pretrained(args.work / "naive_full")

    return work


SIDES = {
    "moerge_adapter": side_moerge("adapter"),
    "peft_adapter": side_peft_adapter,
    "moerge_full": side_moerge("full"),
    "naive_full": side_naive_full,
}


def run_side_here(name: str, args: argparse.Namespace) -> None:
    """Child process: do the work, print one JSON line with seconds and peak RSS."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = SIDES[name](args)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({"side": name, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": usage.ru_maxrss / 1024}))


def run_side(name: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--side", name, "--base", str(args.base), "--work", str(args.work)]
    command += ["--experts", ",".join(map(str, args.experts)), "--rank", str(args.rank)]
    command += ["--density", str(args.density), "--threads", str(args.threads or 0)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {name:15s} {result['seconds']:8.2f} s wall {result['cpu_seconds']:8.2f} s CPU"
        f" {result['peak_rss_mb']:8.0f} MB peak RSS",
        flush=True,
    )
    return result


def adapter_agreement(ours: Path, theirs: Path) -> float:
    """Largest relative difference between the two merged adapters' per-module updates."""
    from safetensors.torch import load_file

    a, b = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    worst = 0.0
    for key in a:
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            mine, peft = a[b_key] @ a[key], b[b_key].float() @ b[key].float()
            worst = max(worst, float((mine - peft).norm() / peft.norm().clamp(min=1e-12)))
    return worst


def compare(label: str, ours: dict[str, float], theirs: dict[str, float]) -> str:
    speed = theirs["seconds"] / ours["seconds"]
    cpu = theirs["cpu_seconds"] / ours["cpu_seconds"]
    memory = theirs["peak_rss_mb"] / ours["peak_rss_mb"]
    return f"{label}: moerge {speed:.2f}x faster (wall), {cpu:.2f}x less CPU time, {memory:.2f}x less peak RSS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="base model folder (safetensors)")
    parser.add_argument("--experts", type=lambda s: [Path(p) for p in s.split(",")], default=None)
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--expert-rank", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="rank of the merged adapter")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    parser.add_argument("--skip-full", action="store_true", help="only the adapter comparison")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side_here(args.side, args)
        return
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        args.work = args.work or Path(tmp)
        if args.experts is None:
            args.experts = make_experts(args.base, args.work / "experts", args.n_experts, args.expert_rank)
        threads = args.threads or "default"
        print(f"{len(args.experts)} experts, TIES density {args.density}, base {args.base}, torch threads {threads}")
        print(f"adapter (rank {args.rank}):")
        ours, theirs = run_side("moerge_adapter", args), run_side("peft_adapter", args)
        lines = [compare(f"adapter TIES→rank-{args.rank} vs peft ties_svd", ours, theirs)]
        difference = adapter_agreement(args.work / "moerge_adapter", args.work / "peft_adapter" / "merged")
        lines.append(f"adapter agreement with peft: max relative difference of updates {difference:.2e}")
        if not args.skip_full:
            print("full model:")
            ours, theirs = run_side("moerge_full", args), run_side("naive_full", args)
            lines.append(compare(f"full TIES vs {len(args.experts)} merged models in memory", ours, theirs))
        print("\n".join(lines))


if __name__ == "__main__":
    main()
