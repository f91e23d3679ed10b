"""Scoring a loaded model through EleutherAI's lm-evaluation-harness (the optional `lm-eval` extra).

`HarnessLM` is lm-eval's model interface over any model moerge loaded (the base, an expert, a merge,
a router). It is neutral: lm-eval renders its own prompts (its task's `doc_to_text`, `target_delimiter`
and choices; no chat template unless lm-eval is run with `--apply_chat_template`), and the wrapper
scores exactly the token ids lm-eval's `TemplateLM` makes of them. It never applies a moerge prompt
format, so a score here equals `moerge eval`'s only when the task's text matches the format the model
is scored in (for example lm-eval's default `"{{input}}"` + `" "` + choice is moerge's `raw` format).

Each (context, continuation) is scored as `moerge eval` scores a choice: the context runs first, the
continuation then continues from its KV cache in the same batch, so a router that decides per example
decides on the context, as it does under `moerge eval`.

Registering the model under a name and loading strategies from `--model_args` is the recipes layer's
job (`moerge.recipes.harness`); this module only scores.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from moerge.data.prompts import pad_batch
from moerge.errors import MoergeError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
Pair = tuple[list[int], list[int]]


class HarnessLM(TemplateLM):
    """lm-eval's LM over a loaded moerge model: `loglikelihood`, `loglikelihood_rolling`, `generate_until`.

    `batch_size`: sequences per forward pass; `max_length`: the longest sequence the model reads (default:
    the model's `max_position_embeddings`); `max_gen_toks`: the generation limit a task does not set.
    """

    backend = "causal"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise MoergeError(f"batch_size: must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or _model_max_length(model)
        self.max_gen_toks = max_gen_toks
        self.info = dict(info or {})
        self._device = next(model.parameters()).device

    # ---- tokens ----------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling window's first token) is conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's own ids (its special tokens by default), none added to text that already
        starts with the BOS token (a chat-templated prompt)."""
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "moerge")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Used by lm-eval's `--apply_chat_template` only: the tokenizer's template, as text."""
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in its results' `config`."""
        return {f"moerge_{k}": v for k, v in self.info.items()}

    # ---- log-likelihoods -------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list:
        """(log p(continuation | context), continuation is the greedy one) per (_, context, continuation)."""
        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            results.extend(continuation_scores(self.model, self.tokenizer, pairs[start : start + self.batch_size]))
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def _fit(self, context: list[int], continuation: list[int]) -> Pair:
        """Left-truncate the context so context + continuation (minus its last token) fits `max_length`."""
        if not continuation:
            raise MoergeError("lm-eval asked for the log-likelihood of an empty continuation")
        if len(continuation) > self.max_length:
            raise MoergeError(
                f"max_length: a continuation of {len(continuation)} tokens does not fit {self.max_length}"
            )
        room = self.max_length + 1 - len(continuation)
        context = context[-room:] if context else [self.prefix_token_id]
        return context, continuation

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) over the whole text, conditioned on the prefix token: windows of `max_length`
        tokens, each token predicted once (lm-eval's own windowing)."""
        windows: list[tuple[int, Pair]] = []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text, add_special_tokens=False)
            for window in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            ):
                windows.append((i, make_disjoint_window(window)))
        scores = self._loglikelihood_tokens([(None, ctx, cont) for _, (ctx, cont) in windows])
        totals = [0.0] * len(requests)
        for (i, _), (logprob, _) in zip(windows, scores, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless the task asks to sample) continuations, cut before the first stop string.
        Requests keep their order; consecutive ones with the same generation settings share batches."""
        outputs: list[str] = []
        for _, group in groupby(requests, key=lambda req: _settings_key(req.args[1])):
            group = list(group)
            settings = dict(group[0].args[1])
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                texts = self._generate([req.args[0] for req in chunk], dict(settings))
                outputs.extend(texts)
                for req, text in zip(chunk, texts, strict=True):
                    self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    def _generate(self, contexts: list[str], settings: dict[str, Any]) -> list[str]:
        import torch

        until = stop_strings(settings.pop("until", None))
        max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
        settings.pop("max_length", None)  # the length limit is max_gen_toks alone
        if not settings.get("do_sample"):
            settings = {k: v for k, v in settings.items() if k not in ("temperature", "top_p", "top_k")}
            settings["do_sample"] = False
        room = max(1, self.max_length - max_new)
        ids, mask = pad_batch([self.tok_encode(c)[-room:] for c in contexts], self.tokenizer.pad_token_id)
        extra = {"stop_strings": until, "tokenizer": self.tokenizer} if until else {}
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self._device),
                attention_mask=mask.to(self._device),
                max_new_tokens=max_new,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **extra,
                **settings,
            )
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [cut_at_stop(text, until) for text in texts]


def _model_max_length(model: Any) -> int:
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)


def _settings_key(settings: Any) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def stop_strings(until: str | list[str] | None) -> list[str]:
    """lm-eval's `until` (a string, a list or nothing) as a list of non-empty stop strings."""
    if until is None:
        return []
    items = [until] if isinstance(until, str) else list(until)
    return [s for s in items if s]


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    cut = min((i for s in until if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def continuation_scores(model: Any, tokenizer: Any, pairs: list[Pair]) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): log p(continuation | context) and whether every
    continuation token is the model's argmax. One batch: the contexts (left-padded) fill a KV cache, the
    continuations (right-padded) continue from it, as `moerge eval` scores a choice after its prompt."""
    import torch
    from transformers import DynamicCache

    from moerge.models.logits import forward_accepts, forward_at

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ids, mask = (t.to(device) for t in pad_batch([ctx for ctx, _ in pairs], pad))
    cache = DynamicCache()
    cache_kw = {"cache" if forward_accepts(model, "cache") else "past_key_values": cache}
    with torch.no_grad():
        prefill = forward_at(
            model,
            1,
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **cache_kw,
        )
    logits = [prefill.logits[:, -1:].float()]
    conts = [cont for _, cont in pairs]
    longest = max(len(c) for c in conts)
    cids, cmask = (t.to(device) for t in pad_batch(conts, pad, left=False))
    if longest > 1:
        with torch.no_grad():
            rest = model(
                input_ids=cids[:, :-1],
                attention_mask=torch.cat([mask, cmask[:, :-1]], dim=1),
                position_ids=mask.sum(-1, keepdim=True) + torch.arange(longest - 1, device=device),
                use_cache=True,
                **cache_kw,
            )
        logits.append(rest.logits.float())
    return _scores(torch.cat(logits, dim=1), cids, cmask)


def _scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, bool]]:
    """Summed log-probabilities of `targets` under `logits` (position i predicts target i) where `mask`."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(2, targets[:, :, None]).squeeze(2)
    greedy = (logprobs.argmax(-1) == targets) | (mask == 0)
    totals = (picked * mask).sum(1)
    return [(float(total), bool(g.all())) for total, g in zip(totals, greedy, strict=True)]


# ---- running lm-eval --------------------------------------------------------------------------------


def task_manager(tasks: list[str], include_path: Path | None) -> Any:
    """lm-eval's task index: the local folder alone when it holds every task asked for (indexing
    lm-eval's whole catalogue takes tens of seconds), else the catalogue plus the folder."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not include_path.is_dir():
            raise MoergeError(f"--include-path: {include_path} is not a folder")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        where = (
            f"{include_path} nor lm-eval's tasks" if include_path else "lm-eval's tasks (--include-path DIR adds yours)"
        )
        raise MoergeError(f"--tasks: {unknown[0]!r} is not a task in {where}")
    return manager


def run_lm_eval(
    lm: HarnessLM,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on `lm`; returns lm-eval's own results dictionary."""
    import lm_eval

    if not tasks:
        raise MoergeError("--tasks: give at least one lm-eval task name")
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        task_manager=task_manager(tasks, include_path),
    )


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's results as moerge's JSON: task → {metric: value, ..., "n": examples scored}.

    lm-eval names a metric `acc,none` (metric, then the filter); the filter is left out where it is
    `none` (`acc_stderr,none` becomes `acc_stderr`) and kept otherwise (`exact_match,strict-match`).
    """
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            name, comma, flt = key.partition(",")
            if not comma or not isinstance(value, int | float):
                continue  # not a metric: the alias, lm-eval's sample_len, a stderr it could not compute (N/A)
            row[name if flt == "none" else key] = value
        n = results.get("n-samples", {}).get(task, {})
        row["n"] = n.get("effective", n.get("original")) if n else None
        out[task] = row
    return out


def lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def task_names(tasks: str) -> list[str]:
    """`T1,T2` → [T1, T2] (blanks dropped)."""
    return [t.strip() for t in tasks.split(",") if t.strip()]
