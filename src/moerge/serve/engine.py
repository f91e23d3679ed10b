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
from moerge.serve.batch import ExpertStack
from moerge.serve.models import BASE, ModelPool
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


class BatchStream:
    """A transformers streamer for a batch: hands each row's new token to that row's `TextStream` until
    the row has ended (its end token; afterwards generate pads it)."""

    def __init__(self, rows: list[TextStream], eos: int) -> None:
        self.rows, self.eos = rows, eos
        self.ended = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            if not self.ended[i]:
                self.rows[i].add([token])
                self.ended[i] = token == self.eos

    def end(self) -> None:
        for row in self.rows:
            row.end()


class RowsDone:
    """Per-row stopping: the client left, a stop sequence, the end token, or the row's own max_tokens."""

    def __init__(self, jobs: list[Job], stream: BatchStream) -> None:
        self.jobs, self.stream = jobs, stream

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = [
            job.cancelled.is_set() or row.stopped or ended or len(row.ids) >= job.max_tokens
            for job, row, ended in zip(self.jobs, self.stream.rows, self.stream.ended, strict=True)
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


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

    def __init__(self, pool: ModelPool, *, max_queue: int = 64, max_batch: int = 16) -> None:
        self.pool, self.max_queue, self.max_batch = pool, max_queue, max_batch
        self.stack = ExpertStack(pool)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.depth = 0  # jobs queued or running
        self._depth_lock = threading.Lock()
        self.observers: list[Any] = []  # called with (job, result) after each job (metrics)
        self.batch_observers: list[Any] = []  # called with the number of rows of each batched generate
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

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            arrived = [job, *self._waiting()]
            live = [j for j in arrived if not j.cancelled.is_set()]
            together = [j for j in live if self._batchable(j)]
            if together:
                self._answer(together, self.run_batch)
            for single in (j for j in live if j not in together):
                self._answer([single], lambda jobs: [self.run(jobs[0])])
            with self._depth_lock:
                self.depth -= len(arrived)
            if self._stopping:
                return

    def _waiting(self) -> list[Job]:
        """The jobs that arrived while the last ones ran (up to `max_batch` in all), without waiting."""
        found: list[Job] = []
        while len(found) < self.max_batch - 1:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
                break
            found.append(job)
        return found

    def _batchable(self, job: Job) -> bool:
        return job.request.temperature == 0 and job.request.n == 1 and self.stack.accepts(job.model)

    def _answer(self, jobs: list[Job], run: Any) -> None:
        """Run `jobs`, then give each its result or its error (a server answers every request)."""
        try:
            results = run(jobs)
        except ServeError as exc:
            results = [exc] * len(jobs)
        except Exception as exc:
            failed = ServeError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")
            results = [failed] * len(jobs)
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, ServeError):
                job.emit(ERROR, result)
                continue
            for observe in self.observers:
                observe(job, result)
            job.emit(DONE, result)

    def run_batch(self, jobs: list[Job]) -> list[Result | ServeError]:
        """Greedy answers for several jobs of `base` or plain LoRA experts in one batched generate."""
        import torch

        from moerge.data.prompts import pad_batch

        started = time.perf_counter()
        self.stack.ensure({j.model for j in jobs} - {BASE})
        model, tokenizer = self.stack.model, self.stack.tokenizer
        out: list[Result | ServeError] = []
        prompts: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            try:
                prompts[i] = self._checked_prompt(job, model, tokenizer, self._recorded(job.model))
                out.append(ServeError(500, "not generated", kind="server_error"))
            except ServeError as exc:
                out.append(exc)
        ready = [jobs[i] for i in prompts]
        if not ready:
            return out
        rows = [TextStream(tokenizer, job.request.stops, _emitter(job)) for job in ready]
        for row in rows:
            row.prompt_seen = True
        stream = BatchStream(rows, tokenizer.eos_token_id)
        ids, mask = pad_batch(list(prompts.values()), tokenizer.pad_token_id)
        device = next(model.parameters()).device
        for observe in self.batch_observers:
            observe(len(ready))
        self.stack.select([job.model for job in ready])
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max(job.max_tokens for job in ready),
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    streamer=stream,
                    stopping_criteria=[RowsDone(ready, stream)],
                )
        finally:
            self.stack.release()
        seconds = time.perf_counter() - started
        for (i, prompt), row, ended in zip(prompts.items(), rows, stream.ended, strict=True):
            choice = Choice(row.text, "stop" if row.stopped or ended else "length", len(row.ids))
            out[i] = Result([choice], len(prompt), seconds)
        return out

    def _recorded(self, name: str) -> Any:
        """The prompt format `name` was trained with (None for the base)."""
        from moerge.library.expert import recorded_format

        return None if name == BASE else recorded_format(self.pool.library.meta(name))

    def run(self, job: Job) -> Result:
        """Load the model, render the prompt in its format, generate `n` choices (streamed as deltas)."""
        import torch

        started = time.perf_counter()
        loaded = self.pool.get(job.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        ids = self._checked_prompt(job, model, tokenizer, loaded.prompt_format)
        routing = getattr(getattr(model, "moerge_routing", None), "routing", None)
        request = job.request
        explain = routing is not None and bool(request.moerge.get("explain"))
        if request.seed is not None:
            torch.manual_seed(request.seed)
        choices, decision = [], None
        for index in range(request.n):
            if routing is not None:
                routing.start_recording(per_token=explain)
            choice, new = self._generate(job, model, tokenizer, ids, index)
            if routing is not None:
                summary = routing_summary(routing)
                decision = decision or summary
                if explain:
                    choice.explained = _token_routing(routing, tokenizer, new, summary)
            choices.append(choice)
        return Result(choices, len(ids), time.perf_counter() - started, decision)

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
        return Choice(stream.text, "stop" if ended else "length", len(new)), new


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
