"""The generation engine: one worker thread that owns the models and answers jobs in arrival order.

HTTP handlers (asyncio) submit a `Job` and read its events (text deltas, then the result) from an
asyncio queue the worker fills through the event loop; a client that goes away sets `cancelled`, which
stops its generation at the next token. The job queue is bounded: a full queue is a 429, never an
unbounded backlog.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from moerge.data.formats import scoring_format
from moerge.data.prompts import chat_prompt_ids
from moerge.serve.models import ModelPool
from moerge.serve.schemas import ChatRequest, CompletionRequest, ServeError

DONE = "done"
DELTA = "delta"
ERROR = "error"


@dataclass
class Job:
    """One request: the resolved model name, the request, and where its events go."""

    model: str
    request: ChatRequest | CompletionRequest
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, *payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, *payload))


@dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: int


@dataclass
class Result:
    """What a finished job returns: its choices, token counts and, for routed models, the routing."""

    choices: list[Choice]
    prompt_tokens: int
    seconds: float
    routing: dict[str, float] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


class TextStream:
    """A transformers streamer: decodes the new tokens, cuts at the first stop sequence (which is not
    sent, as OpenAI does) and emits only text no stop sequence can still claim."""

    def __init__(self, tokenizer: Any, stops: list[str], emit: Any) -> None:
        self.tokenizer, self.stops, self.emit = tokenizer, stops, emit
        self.ids: list[int] = []
        self.text, self.sent, self.stopped, self.prompt_seen = "", 0, False, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        ready = len(text) if self.stopped else len(text.rstrip("\ufffd")) - self.hold  # no half characters
        self._send(ready)

    def end(self) -> None:
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent : upto])
            self.sent = upto


class StopWhen:
    """A stopping criterion: the client left, or the text hit a stop sequence."""

    def __init__(self, job: Job, stream: TextStream) -> None:
        self.job, self.stream = job, stream

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = self.job.cancelled.is_set() or self.stream.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The worker thread and its bounded job queue."""

    def __init__(self, pool: ModelPool, *, max_queue: int = 64) -> None:
        self.pool, self.max_queue = pool, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.depth = 0  # jobs queued or running
        self._depth_lock = threading.Lock()
        self.observers: list[Any] = []  # called with (job, result) after each job (metrics)
        self._thread = threading.Thread(target=self._work, name="moerge-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._depth_lock:
            if self.depth >= self.max_queue:
                raise ServeError(
                    429, f"the server's queue is full ({self.max_queue} requests); retry later", kind="rate_limit_error"
                )
            self.depth += 1
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if not job.cancelled.is_set():
                    result = self.run(job)
                    for observe in self.observers:
                        observe(job, result)
                    job.emit(DONE, result)
            except ServeError as exc:
                job.emit(ERROR, exc)
            except Exception as exc:  # a server answers every request, whatever breaks inside
                job.emit(ERROR, ServeError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error"))
            finally:
                with self._depth_lock:
                    self.depth -= 1

    def run(self, job: Job) -> Result:
        """Load the model, render the prompt in its format, generate `n` choices (streamed as deltas)."""
        import torch

        started = time.perf_counter()
        loaded = self.pool.get(job.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        ids = self._prompt_ids(job, loaded)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and len(ids) + 1 > limit:
            raise ServeError(
                413, f"the prompt is {len(ids)} tokens; {job.model} reads at most {limit}", param="messages"
            )
        routing = getattr(getattr(model, "moerge_routing", None), "routing", None)
        if routing is not None:
            routing.start_recording()
        request = job.request
        if request.seed is not None:
            torch.manual_seed(request.seed)
        choices = [self._generate(job, model, tokenizer, ids, index) for index in range(request.n)]
        decision = _routing_summary(routing) if routing is not None else None
        return Result(choices, len(ids), time.perf_counter() - started, decision)

    def _prompt_ids(self, job: Job, loaded: Any) -> list[int]:
        tokenizer = loaded.tokenizer
        if isinstance(job.request, CompletionRequest):  # a completion prompt is literal text
            return tokenizer(job.request.text, add_special_tokens=True)["input_ids"]
        fmt, _ = scoring_format(loaded.prompt_format)
        turns = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in job.request.messages
        ]
        try:
            return chat_prompt_ids(tokenizer, turns, fmt)
        except ValueError as exc:
            raise ServeError(400, str(exc), param="messages") from None

    def _generate(self, job: Job, model: Any, tokenizer: Any, ids: list[int], index: int) -> Choice:
        import torch

        request = job.request
        stream = TextStream(tokenizer, request.stops, lambda text: job.emit(DELTA, index, text))
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                max_new_tokens=job.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                streamer=stream,
                stopping_criteria=[StopWhen(job, stream)],
                **(sampling if request.temperature > 0 else {"do_sample": False}),
            )
        new = out[0, len(ids) :].tolist()
        ended = stream.stopped or (bool(new) and new[-1] == tokenizer.eos_token_id)
        return Choice(stream.text, "stop" if ended else "length", len(new))


def _routing_summary(routing: Any) -> dict[str, float]:
    """Mean routing weight of each expert over the prompt's tokens and the layers."""
    import torch

    records = routing.records or {}
    routing.records = None
    if not records:
        return {}
    per_module = [torch.cat(rows).mean(0) for rows in records.values()]
    weights = torch.stack(per_module).mean(0).tolist()
    return {name: round(w, 4) for name, w in zip(routing.handle.expert_names, weights, strict=True)}
