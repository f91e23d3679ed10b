"""Routing benchmark: routed top-2-of-8 (moerge Arrow on the stacked-expert layer) against
(a) the base with one LoRA (peft, unmerged) and (b) peft's own Arrow (`create_arrow_model`), in one run.

Workloads: `generate` (batch of prompts, greedy, --new-tokens each) and `forward` (one batch of
--seq tokens, no cache). The three models are timed in interleaved rounds so machine load hits all
alike; the median round is reported, with ratios against moerge. Also checks that moerge's Arrow and
peft's Arrow give (nearly) the same logits: same method, different prototype solvers.

    python benchmarks/route_bench.py --base /tmp/dl/smol_st [--experts d1,...,d8] [--out notes.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import make_experts  # the same random LoRA experts as the merge benchmark


def load_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def build_models(base: Path, experts: list[Path], top_k: int) -> dict[str, torch.nn.Module]:
    from peft import ArrowConfig, PeftModel, create_arrow_model

    from moerge.route import Policy, Routing, attach_experts, prepare_router

    single = PeftModel.from_pretrained(load_base(base), str(experts[0])).eval()
    ours_model = load_base(base)
    handle = attach_experts(ours_model, experts)
    Routing(handle, prepare_router(handle, "arrow"), Policy("top_k", k=top_k))
    peft_arrow = create_arrow_model(load_base(base), [str(e) for e in experts], ArrowConfig(top_k=top_k)).eval()
    return {"moerge routed": ours_model, "peft single LoRA": single, "peft Arrow": peft_arrow}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def workloads(args: argparse.Namespace) -> dict[str, tuple[Callable[[torch.nn.Module], object], int]]:
    """name → (run on a model, tokens produced or processed per run)."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (args.batch, args.prompt), generator=gen)
    long = torch.randint(100, 40000, (args.batch, args.seq), generator=gen)

    def generate(model: torch.nn.Module) -> object:
        return model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )

    def forward(model: torch.nn.Module) -> object:
        return model(input_ids=long, use_cache=False)

    return {"generate": (generate, args.batch * args.new_tokens), "forward": (forward, args.batch * args.seq)}


def agreement(models: dict[str, torch.nn.Module]) -> float:
    """Max |logit difference| between moerge's and peft's Arrow on one batch."""
    ids = torch.randint(100, 40000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = models["moerge routed"](ids).logits
        theirs = models["peft Arrow"](ids).logits
    return float((ours - theirs).abs().max())


def use_exact_prototypes(models: dict[str, torch.nn.Module]) -> None:
    """Give peft's Arrow moerge's exact-SVD prototypes (peft uses 15 power iterations)."""
    from moerge.route.router import module_key

    state = models["moerge routed"].moerge_routing.routing.router.state
    for name, module in models["peft Arrow"].base_model.model.named_modules():
        if hasattr(module, "lora_arrow"):
            module.lora_arrow["arrow_router"].prototypes = state[module_key(name)].clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="base model folder (safetensors)")
    parser.add_argument("--experts", help="comma-separated LoRA folders (default: 8 random r=8 experts)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    # One thread by default: on a shared CPU, oversubscribed OpenMP threads make timings 10-50x noisier.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        experts = (
            [Path(p) for p in args.experts.split(",")] if args.experts else make_experts(args.base, Path(tmp), 8, 8)
        )
        models = build_models(args.base, experts, args.top_k)
        diff = agreement(models)
        times: dict[tuple[str, str], list[float]] = {}
        for name, (run, _) in workloads(args).items():
            for model in models.values():  # warm-up
                timed(lambda m=model, r=run: r(m))
            for _ in range(args.rounds):
                for label, model in models.items():
                    times.setdefault((name, label), []).append(timed(lambda m=model, r=run: r(m)))
                    print(f"{name} {label}: {times[(name, label)][-1]:.3f}s", file=sys.stderr, flush=True)

    lines = [
        f"{len(experts)} experts, top-{args.top_k}, base {args.base}, float32 CPU, {args.threads} threads, "
        f"median of {args.rounds} interleaved rounds; generate: batch {args.batch} × {args.prompt}-token prompt "
        f"+ {args.new_tokens} new tokens; forward: batch {args.batch} × {args.seq} tokens.",
        "",
        "| workload | model | latency (s) | tokens/s | latency ÷ moerge routed |",
        "|---|---|---|---|---|",
    ]
    for name, (_, tokens) in workloads(args).items():
        ours = statistics.median(times[(name, "moerge routed")])
        for label in models:
            latency = statistics.median(times[(name, label)])
            lines.append(f"| {name} | {label} | {latency:.3f} | {tokens / latency:.1f} | {latency / ours:.2f} |")
    use_exact_prototypes(models)
    lines += [
        "",
        f"max |logit diff| moerge Arrow vs peft Arrow: {diff:.2e} with peft's power-iteration prototypes, "
        f"{agreement(models):.2e} once peft is given the exact prototypes (same routing formula).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
