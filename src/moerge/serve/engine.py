"""The generation engine: one worker thread that owns the models and answers jobs in arrival order.

HTTP handlers (asyncio) submit a `Job` and read its events (text deltas, then the result) from an
asyncio queue the worker fills through the event loop; a client that goes away sets `cancelled`, which
stops its generation at the next token. The job queue is bounded: a full queue is a 429, never an
unbounded backlog.

Requests for `base` and plain LoRA experts — greedy or sampled, any `n` — are decoded together with
continuous batching (`moerge.serve.batch`): each joins the running batch at the next decoding step and
leaves it when its own answer ends (end token, stop sequence, its max_tokens, or its client left).
Greedy rows give the tokens the request would get alone; a sampled row draws from its own generator
(seeded by the request's `seed` + choice index), so its answer does not depend on its neighbours.
Example-level routers (one decision per prompt, e.g. centroid, classifier) join the same batch: their
prompt is routed once and the row reads its experts with those weights (`ExpertStack.route`). Token-level
routers and experts that cannot be stacked (DoRA, full weights) are generated alone from the model pool,
and the shared batch advances one step between their tokens, so it never waits a whole generation.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from moerge.data.formats import scoring_format
from moerge.data.prompts import chat_prompt_ids
from moerge.serve.batch import DecodeBatch, ExpertStack, Route, next_tokens
from moerge.serve.models import BASE, ModelPool
from moerge.serve.schemas import ChatRequest, CompletionRequest, ServeError

DONE = "done"
DELTA = "delta"
ERROR = "error"


@dataclass(eq=False)
class Job:
    """One request: the resolved model name, the request, and where its events go."""

    model: str
    request: ChatRequest | CompletionRequest
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)  # its choices, while in the shared batch
    route: Route = ()  # the stacked experts its rows read, with their weights
    routing: dict[str, float] | None = None  # a router's decision for its prompt (in the shared batch)
    prompt_tokens: int = 0

    def emit(self, kind: str, *payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, *payload))
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            self.cancelled.set()


@dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: int
    explained: list[dict[str, Any]] | None = None  # per generated token: its text and experts' weights


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
        self.add(value.reshape(-1).tolist())

    def add(self, ids: list[int]) -> None:
        """New tokens of this answer."""
        if self.stopped:
            return
        self.ids.extend(int(t) for t in ids)
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


@dataclass(eq=False)
class Row:
    """One choice of a job in the shared batch: its text so far, the token it feeds next, how it samples."""

    job: Job
    stream: TextStream
    sampler: tuple[float, float, Any] | None  # (temperature, top_p, generator); None: greedy
    last: int = -1
    ended: bool = False  # it generated the end token
    finished: bool = False

    @property
    def done(self) -> bool:
        return self.finished or self.job.cancelled.is_set()

    def advance(self, token: int, eos: int | None) -> None:
        """Take the row's next token; it is finished at its end token, a stop sequence or its max_tokens."""
        self.last = token
        self.stream.add([token])
        self.ended = token == eos
        self.finished = self.ended or self.stream.stopped or len(self.stream.ids) >= self.job.max_tokens

    def choice(self) -> Choice:
        return Choice(self.stream.text, "stop" if self.stream.stopped or self.ended else "length", len(self.stream.ids))


class StopWhen:
    """A stopping criterion: the client left, or the text hit a stop sequence."""

    def __init__(self, job: Job, stream: TextStream) -> None:
        self.job, self.stream = job, stream

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = self.job.cancelled.is_set() or self.stream.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Interleave:
    """A stopping criterion that never stops: between two tokens of a request generated alone, it lets
    the shared batch take its waiting requests and advance one step."""

    def __init__(self, tick: Any) -> None:
        self.tick = tick

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.tick()
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)


class Engine:
    """The worker thread, its bounded job queue and the shared batch."""

    def __init__(self, pool: ModelPool, *, max_queue: int = 64, max_batch: int = 16) -> None:
        self.pool, self.max_queue, self.max_batch = pool, max_queue, max_batch
        self.stack = ExpertStack(pool)
        self.batch = DecodeBatch()
        self.rows: list[Row] = []  # the running rows, in the batch's order
        self.pending: deque[Job] = deque()  # taken from the queue, not started yet
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.depth = 0  # jobs queued or running
        self._depth_lock = threading.Lock()
        self.observers: list[Any] = []  # called with (job, result) after each job (metrics)
        self.batch_observers: list[Any] = []  # called with the number of rows of each batched decoding step
        self._stopping = False
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

    # ------------------------------------------------------------------------------------ scheduling

    def _work(self) -> None:
        try:
            while not self._stopping:
                self._take(block=not self.rows and not self.pending)
                self._admit()
                alone = next((job for job in self.pending if not self._batchable(job)), None)
                if alone is not None:
                    self.pending.remove(alone)
                    self._run_alone(alone)
                elif self.rows:
                    self._step()
        finally:
            stopped = ServeError(503, "the server is shutting down", kind="server_error")
            for job in {row.job: None for row in self.rows} | dict.fromkeys(self.pending):
                self._settle(job, stopped)

    def _take(self, *, block: bool) -> None:
        """Move the submitted jobs to `pending` (waiting for one when `block`)."""
        try:
            job = self.jobs.get() if block else self.jobs.get_nowait()
            while True:
                if job is None:
                    self._stopping = True
                    return
                self.pending.append(job)
                job = self.jobs.get_nowait()
        except queue.Empty:
            return

    def _admit(self) -> None:
        """Start the pending batchable jobs, in arrival order, while the batch has room for their rows."""
        for job in list(self.pending):
            if job.cancelled.is_set():
                self.pending.remove(job)
                self._settle(job)
            elif self._batchable(job):
                if self.rows and len(self.rows) + job.request.n > self.max_batch:
                    return
                self.pending.remove(job)
                try:
                    self._join(job)
                except Exception as exc:
                    self._settle(job, _as_error(exc))

    def _batchable(self, job: Job) -> bool:
        try:
            return job.request.n <= self.max_batch and self.stack.accepts(job.model)
        except Exception:  # e.g. the base does not load: the job alone reports it
            return False

    def _tick(self) -> None:
        """One step of the shared batch, taking waiting requests first (between tokens of a job alone)."""
        if self._stopping:
            return
        self._take(block=False)
        self._admit()
        if self.rows:
            self._step()

    def _settle(self, job: Job, outcome: Result | ServeError | None = None) -> None:
        """The job leaves the engine: give it its result or error (None: its client left before it started)."""
        if isinstance(outcome, ServeError):
            job.emit(ERROR, outcome)
        elif outcome is not None:
            for observe in self.observers:
                observe(job, outcome)
            job.emit(DONE, outcome)
        with self._depth_lock:
            self.depth -= 1

    # --------------------------------------------------------------------------------- shared batch

    def _join(self, job: Job) -> None:
        """Prefill the job's prompt alone, take each choice's first token, add the unfinished rows."""
        self.stack.ensure(self.stack.experts_of(job.model))
        tokenizer = self.stack.tokenizer
        routed = job.model in self.pool.routers
        recorded = self.stack.prompt_format(job.model) if routed else self._recorded(job.model)
        prompt = self._checked_prompt(job, self.stack.model, tokenizer, recorded)
        job.route, job.routing = self.stack.route(job.model, prompt)
        logits, cache = self.stack.prefill(prompt, job.route)
        request, job.prompt_tokens = job.request, len(prompt)
        job.rows = [
            Row(job, TextStream(tokenizer, request.stops, _emitter(job, i)), _sampler(request, i, logits.device))
            for i in range(request.n)
        ]
        first = next_tokens(logits.expand(request.n, -1), [row.sampler for row in job.rows])
        for row, token in zip(job.rows, first, strict=True):
            row.advance(token, tokenizer.eos_token_id)
        live = [row for row in job.rows if not row.done]
        if live:
            self.batch.join(cache, len(prompt), len(live))
            self.rows.extend(live)
        else:
            self._finish(job)

    def _step(self) -> None:
        """One decoding step of every running row; finished rows leave the batch (and their jobs end)."""
        self._retire()
        if not self.rows:
            return
        for observe in self.batch_observers:
            observe(len(self.rows))
        try:
            logits = self.stack.decode(self.batch, [r.last for r in self.rows], [r.job.route for r in self.rows])
            tokens = next_tokens(logits, [row.sampler for row in self.rows])
        except Exception as exc:  # the batch's state is lost: every running job gets the error
            failed = _as_error(exc)
            for job in {row.job: None for row in self.rows}:
                self._settle(job, failed)
            self.rows, self.batch = [], DecodeBatch()
            return
        eos = self.stack.tokenizer.eos_token_id
        for row, token in zip(self.rows, tokens, strict=True):
            row.advance(token, eos)
        self._retire()

    def _retire(self) -> None:
        """Drop the done rows from the batch; a job whose rows are all done is answered."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        ended = {row.job: None for row in self.rows if row.done}
        self.batch.keep(keep)
        self.rows = [self.rows[i] for i in keep]
        for job in ended:
            if all(row.done for row in job.rows):
                self._finish(job)

    def _finish(self, job: Job) -> None:
        for row in job.rows:
            row.stream.end()
        choices = [row.choice() for row in job.rows]
        if job.routing is not None and job.request.moerge.get("explain"):
            for row, choice in zip(job.rows, choices, strict=True):
                choice.explained = self._example_routing(row.stream.ids, job.routing)
        self._settle(job, Result(choices, job.prompt_tokens, time.perf_counter() - job.submitted, job.routing))

    def _example_routing(self, new: list[int], weights: dict[str, float]) -> list[dict[str, Any]]:
        """Per generated token (end token left out), as `_token_routing` gives it for an example-level
        router: every token carries the prompt's weights."""
        tokenizer = self.stack.tokenizer
        return [{"text": tokenizer.decode([t]), "weights": weights} for t in new if t != tokenizer.eos_token_id]

    # ----------------------------------------------------------------------------------- jobs alone

    def _run_alone(self, job: Job) -> None:
        """A job the shared batch cannot take (a router, a DoRA or full-weight expert): its model from the pool."""
        if job.cancelled.is_set():
            self._settle(job)
            return
        try:
            result: Result | ServeError = self.run(job)
        except Exception as exc:
            result = _as_error(exc)
        self._settle(job, result)

    def _recorded(self, name: str) -> Any:
        """The prompt format `name` was trained with (None for the base)."""
        from moerge.library.expert import recorded_format

        return None if name == BASE else recorded_format(self.pool.library.meta(name))

    def run(self, job: Job) -> Result:
        """Load the model, render the prompt in its format, generate `n` choices (streamed as deltas)."""
        import torch

        loaded = self.pool.get(job.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        ids = self._checked_prompt(job, model, tokenizer, loaded.prompt_format)
        routing = getattr(getattr(model, "moerge_routing", None), "routing", None)
        request = job.request
        explain = routing is not None and bool(request.moerge.get("explain"))
        choices, decision = [], None
        for index in range(request.n):
            if request.seed is not None:  # choice i samples with seed + i, as in the shared batch
                torch.manual_seed((request.seed + index) % 2**64)
            if routing is not None:
                routing.start_recording(per_token=explain)
            choice, new = self._generate(job, model, tokenizer, ids, index)
            if routing is not None:
                summary = routing_summary(routing)
                decision = decision or summary
                if explain:
                    choice.explained = _token_routing(routing, tokenizer, new, summary)
            choices.append(choice)
        return Result(choices, len(ids), time.perf_counter() - job.submitted, decision)

    def _checked_prompt(self, job: Job, model: Any, tokenizer: Any, recorded: Any) -> list[int]:
        """The prompt's token ids in the model's format; a prompt longer than the model reads is a 413."""
        ids = request_prompt_ids(job.request, tokenizer, recorded)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and len(ids) + 1 > limit:
            raise ServeError(
                413, f"the prompt is {len(ids)} tokens; {job.model} reads at most {limit}", param="messages"
            )
        return ids

    def _generate(self, job: Job, model: Any, tokenizer: Any, ids: list[int], index: int) -> tuple[Choice, list[int]]:
        import torch

        request = job.request
        stream = TextStream(tokenizer, request.stops, _emitter(job, index))
        # OpenAI's sampling is temperature and top_p only (generate would add its default top_k of 50)
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                max_new_tokens=job.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                streamer=stream,
                stopping_criteria=[StopWhen(job, stream), Interleave(self._tick)],
                **(sampling if request.temperature > 0 else {"do_sample": False}),
            )
        new = out[0, len(ids) :].tolist()
        ended = stream.stopped or (bool(new) and new[-1] == tokenizer.eos_token_id)
        return Choice(stream.text, "stop" if ended else "length", len(new)), new


def _sampler(request: ChatRequest | CompletionRequest, index: int, device: Any) -> tuple[float, float, Any] | None:
    """Choice `index`'s sampling: None when greedy, else its temperature, top_p and own generator
    (seeded with `seed + index`, or at random without a seed)."""
    import torch

    if request.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed((request.seed + index) % 2**64)
    return request.temperature, request.top_p, generator


def _as_error(exc: Exception) -> ServeError:
    if isinstance(exc, ServeError):
        return exc
    return ServeError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")


def request_prompt_ids(request: ChatRequest | CompletionRequest, tokenizer: Any, recorded: Any) -> list[int]:
    """A request's prompt ids: a completion prompt is literal text; chat turns are rendered in the format
    the model was trained with (`recorded`)."""
    if isinstance(request, CompletionRequest):
        return tokenizer(request.text, add_special_tokens=True)["input_ids"]
    fmt, _ = scoring_format(recorded)
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in request.messages]
    try:
        return chat_prompt_ids(tokenizer, turns, fmt)
    except ValueError as exc:
        raise ServeError(400, str(exc), param="messages") from None


def _emitter(job: Job, index: int = 0) -> Any:
    return lambda text: job.emit(DELTA, index, text)


def _token_routing(routing: Any, tokenizer: Any, new: list[int], first: dict[str, float]) -> list[dict[str, Any]]:
    """Each generated token's text and the weights of the forward pass that produced it: the prompt's
    for the first token, then each decoding step's, averaged over layers."""
    import torch

    names = routing.handle.expert_names
    steps = routing.token_records or []
    routing.token_records = None
    out = []
    for i, token in enumerate(t for t in new if t != tokenizer.eos_token_id):
        if i == 0 or i - 1 >= len(steps) or not steps[i - 1]:
            weights = first
        else:
            mean = torch.stack([w[0] for w in steps[i - 1].values()]).mean(0).tolist()
            weights = {name: round(w, 4) for name, w in zip(names, mean, strict=True)}
        out.append({"text": tokenizer.decode([token]), "weights": weights})
    return out


def routing_summary(routing: Any) -> dict[str, float]:
    """Mean routing weight of each expert over the prompt's tokens and the layers."""
    import torch

    records = routing.records or {}
    routing.records = None
    if not records:
        return {}
    per_module = [torch.cat(rows).mean(0) for rows in records.values()]
    weights = torch.stack(per_module).mean(0).tolist()
    return {name: round(w, 4) for name, w in zip(routing.handle.expert_names, weights, strict=True)}
