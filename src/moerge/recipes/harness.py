"""moerge strategies as an lm-evaluation-harness model: `--model moerge --model_args base=B,strategy=S`.

Importing this module registers the model type `moerge` with lm-eval. lm-eval (0.4.8 to 0.4.13 at
least) discovers no model plugins, so a plain `lm_eval --model moerge` does not know the name; use one of:

    python -m moerge.recipes.harness run --model moerge --model_args base=B,strategy=S --tasks T
    moerge eval --harness lm-eval --base B --adapter E --tasks T          (moerge's JSON)
    import moerge.recipes.harness; lm_eval.simple_evaluate(model="moerge", model_args=...)

`strategy` is one of: `base` (the default), an expert folder (moerge or plain peft), `library:NAME`
with `library=PATH`, a router folder (`moerge route build`), or a merge YAML (`moerge merge`'s file:
its experts are merged into a temporary folder; its `output` is not written). Other arguments:
`dtype`, `device` (as `moerge eval`'s flags), `batch_size` (`auto` means 16), `max_length`,
`max_gen_toks`. Scoring is `moerge.eval.harness.HarnessLM`: lm-eval's own prompts, no moerge format.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model

from moerge.data.formats import RAW, PromptFormat, format_name
from moerge.errors import MoergeError
from moerge.eval.harness import DEFAULT_MAX_GEN_TOKS, HarnessLM
from moerge.models.loading import set_load_defaults
from moerge.paths import ROUTER, output_kind
from moerge.progress import output_console
from moerge.recipes.strategies import Loaded, StrategySpec, Workspace, load_strategy

console = output_console(stderr=True)
MODEL_NAME = "moerge"
STRATEGY_HELP = "base, an expert folder, library:NAME (with library=PATH), a router folder or a merge YAML"


class MoergeLM(HarnessLM):
    """The `moerge` model type: a strategy loaded on a base model from lm-eval's `--model_args`."""

    def __init__(
        self,
        base: str | None = None,
        strategy: str | None = None,
        library: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,  # lm-eval passes it; batches here are always batch_size
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        **unknown: Any,
    ) -> None:
        if unknown:
            known = "base, strategy, library, dtype, device, batch_size, max_length, max_gen_toks"
            raise MoergeError(f"model_args: unknown argument {sorted(unknown)[0]!r}; known: {known}")
        if not base:
            raise MoergeError("model_args: base=... is required (a cached name, a local folder or a hub id)")
        set_load_defaults(dtype=str(dtype), device=harness_device(device))
        loaded = load_harness_strategy(str(base), None if strategy is None else str(strategy), library)
        info = {
            "base": str(base),
            "strategy": str(strategy or "base"),
            "prompt_format": format_name(loaded.prompt_format),
        }
        super().__init__(
            loaded.model,
            loaded.tokenizer,
            batch_size=harness_batch_size(batch_size),
            max_length=int(max_length) if max_length else None,
            max_gen_toks=int(max_gen_toks),
            info=info,
        )


def harness_device(device: str | None) -> str:
    """lm-eval's device, as `moerge eval --device` takes it. lm-eval's command line always passes one
    (`cuda:0` unless told), so a CUDA device on a machine without CUDA falls back to `auto`, as lm-eval's
    own HF model does, with a line saying so; other absent devices are refused."""
    import torch

    if device is None or device == "auto":
        return "auto"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        console.print(f"warning: device {device}: no CUDA device is visible to torch; using the cpu")
        return "auto"
    return str(device)


def harness_batch_size(value: int | str | None) -> int:
    """lm-eval's batch size (an int, its text, or `auto`/`auto:N`, which mean the default 16)."""
    if value is None or str(value).startswith("auto"):
        return 16
    try:
        size = int(value)
    except ValueError:
        raise MoergeError(f"batch_size: expected a whole number or auto, got {value!r}") from None
    if size < 1:
        raise MoergeError(f"batch_size: must be at least 1, got {size}")
    return size


def load_harness_strategy(base: str, strategy: str | None, library: str | None = None) -> Loaded:
    """The model `strategy` names, on `base`, through the strategy registry (as `moerge eval` loads it);
    says once on stderr when its experts were trained in a prompt format lm-eval will not render."""
    kind, target = resolve_strategy(strategy, library)
    workspace = Workspace(base=base)
    if kind == "merge":
        with tempfile.TemporaryDirectory(prefix="moerge-harness-merge-") as tmp:
            folder = merge_from_spec(Path(target or ""), Path(tmp))
            loaded = load_strategy(_spec("expert", str(folder)), workspace)
    else:
        loaded = load_strategy(_spec(kind, target), workspace)
    note = format_note(loaded)
    if note:
        console.print(f"warning: {note}")
    return loaded


def _spec(kind: str, path: str | None) -> StrategySpec:
    return StrategySpec.model_validate({"kind": kind, **({"path": path} if path else {})})


def resolve_strategy(strategy: str | None, library: str | None) -> tuple[str, str | None]:
    """`strategy` (and `library`) → (strategy kind: base, expert, router or merge; its folder or file)."""
    if library and not (strategy or "").startswith("library:"):
        raise MoergeError("model_args: library=PATH goes with strategy=library:NAME")
    if strategy in (None, "", "base"):
        return "base", None
    if strategy.startswith("library:"):
        if not library:
            raise MoergeError(f"model_args: strategy={strategy} needs library=PATH (the expert library)")
        from moerge.library import ExpertLibrary

        return "expert", str(ExpertLibrary(library).path(strategy.removeprefix("library:")))
    path = Path(strategy).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise MoergeError(f"model_args: strategy: merge file {path} not found")
        return "merge", str(path)
    if path.is_dir():
        return ("router" if output_kind(path) == ROUTER else "expert"), str(path)
    raise MoergeError(f"model_args: strategy: {strategy!r} is not {STRATEGY_HELP}")


def merge_from_spec(spec_file: Path, work: Path) -> Path:
    """Merge as `moerge merge SPEC` would, into `work` (never into the spec's library or output)."""
    from moerge.merge.config import ExpertRef, load_merge_spec
    from moerge.merge.run import run_merge

    spec = load_merge_spec(spec_file, {})
    folders = spec.folders().values()
    refs = [ExpertRef(path=str(folder), weight=ref.weight) for ref, folder in zip(spec.experts, folders, strict=True)]
    output = spec.output.model_copy(update={"out": str(work / "merged"), "overwrite": False})
    return run_merge(spec.model_copy(update={"library": None, "experts": refs, "output": output})).path


def format_note(loaded: Loaded) -> str | None:
    """Why lm-eval's score may differ from `moerge eval`'s: the experts' own prompt format is not what
    lm-eval renders (None for the base, and for experts trained in the completion-style `raw` format)."""
    fmt = loaded.prompt_format
    if fmt is None or (isinstance(fmt, PromptFormat) and fmt.same_rendering(RAW)):
        return None
    return (
        f"the experts were trained in prompt format {format_name(fmt)!r}; lm-eval renders each task's own "
        "prompts (no chat template unless --apply_chat_template), so scores can differ from `moerge eval`"
    )


def _register() -> None:
    """Register `MoergeLM` as lm-eval's `moerge` model, once (a second import leaves the first in place)."""
    with contextlib.suppress(ValueError, AssertionError):  # 0.4.13 raises, 0.4.8 asserts, on a name taken
        register_model(MODEL_NAME)(MoergeLM)


def main() -> None:
    """`python -m moerge.recipes.harness ARGS`: lm-eval's own command line, with `--model moerge` known."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


_register()

if __name__ == "__main__":
    main()
