"""Serving benchmark: `moerge serve` (many LoRA experts, one batched forward pass) against what a user
writes by hand with transformers + peft, on the real model.

K random LoRA experts (r=8, alpha=16, q/k/v/o_proj, random non-zero B) of SmolLM2-135M-Instruct are
imported into a moerge library (prompt format `plain`: the chat template around the user message, the
same prompt `tokenizer.apply_chat_template(..., add_generation_prompt=True)` gives). N client threads
each send R chat completions (temperature 0, max_tokens M, one fixed prompt) for a seeded random
expert, one after another; the same request list drives every variant:

  a  moerge serve in this process (ModelPool + create_app on uvicorn, a free localhost port), `openai`
     client threads over HTTP. Its engine batches continuously: a request joins the running batch at
     the next decoding step and leaves it when its answer ends.
  b  the hand-written server: one PeftModel holding all K adapters (load_adapter), one worker thread
     answering the queued requests one at a time (set_adapter, then generate).
  c  peft's mixed-batch path: the same PeftModel, a worker that takes every waiting request (up to N)
     and answers them with one generate(..., adapter_names=[...]) (static batching: what arrives while
     a batch runs waits for its end).
  d  the floor: the base model alone through moerge serve (a server without a library), model "base".
  e  routed: moerge serve with a centroid router over the K experts as `auto` (built in the bench over a
     small synthetic task per expert: prompts about the expert's own topic); every request is
     `model: auto` with the prompt of its planned expert's topic, so the router spreads them over the
     experts. The centroid router is example-level: each request is routed once on its prompt and
     decodes in the shared batch with its expert's weight.
  f  single expert: the same server and the same prompts as (e), every request for expert e0.
     (e)/(f) is the price of routing (target: ≥ 0.7×).

Latency is measured by each client, submission to answer (queueing included); throughput = requests
(or completion tokens actually generated, end token included) / wall time of the whole drive.
There is no ignore_eos in the API, so the prompt asks for a long answer and generations mostly run
to max_tokens. Greedy texts are compared request by request (a vs b, c vs b).

    python benchmarks/serve_bench.py --base /root/.cache/moerge/models/smollm2-135m-instruct \
        [--experts 16] [--clients 8] [--requests-per-client 8] [--max-tokens 32] [--threads 2] [--only abcdef]
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import random
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOPICS = [
    "a lighthouse keeper", "a volcano", "a chess match", "a bakery", "a submarine", "a desert caravan",
    "a jazz club", "a beehive", "a mountain rescue", "a robot gardener", "a pirate ship", "a snowstorm",
    "a train station", "a lost dog", "a space station", "a rainforest",
]  # fmt: skip


@dataclass
class Answer:
    text: str
    tokens: int
    latency: float = 0.0
    routed_to: str | None = None  # (e): the expert the router gave most weight


def topic(expert: str) -> str:
    """The synthetic topic of expert `e<i>` (its router data and the prompts planned for it)."""
    i = int(expert[1:])
    return TOPICS[i % len(TOPICS)] + (f" number {i // len(TOPICS)}" if i >= len(TOPICS) else "")


def topic_prompt(expert: str) -> str:
    return f"Write a short story about {topic(expert)}."


def router_data(names: list[str]) -> dict[str, list[Any]]:
    """A small synthetic task per expert: requests about its topic."""
    from moerge.data.task import Example

    forms = ["Write a short story about {}.", "Tell me about {}.", "Describe {} in a few sentences.", "A poem on {}."]
    return {name: [Example(form.format(topic(name)), "") for form in forms] for name in names}


@dataclass
class Measured:
    """One variant over every round: wall time summed, answers in plan order, the load average seen."""

    name: str
    wall: float = 0.0
    answers: list[list[Answer]] = field(default_factory=list)  # per client, in its order
    loads: list[float] = field(default_factory=list)

    @property
    def flat(self) -> list[Answer]:
        return [a for row in self.answers for a in row]

    @property
    def requests_per_s(self) -> float:
        return len(self.flat) / self.wall

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.flat)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    def latency(self, q: float) -> float:
        """Nearest-rank quantile of the client-side latencies."""
        values = sorted(a.latency for a in self.flat)
        return values[max(0, math.ceil(q * len(values)) - 1)]


# ---------------------------------------------------------------------------------------------- setup


def load_model(base: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()


def make_experts(base: Path, folder: Path, k: int, seed: int, std: float = 0.02) -> list[Path]:
    """K peft LoRA adapters: peft's own A init, B ~ N(0, std), each from its own seed."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = load_model(base)
    out = []
    for i in range(k):
        torch.manual_seed(seed + i)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=std)
        path = folder / f"e{i}"
        peft_model.save_pretrained(path)
        model = peft_model.unload()
        out.append(path)
    return out


def make_library(base: Path, experts: list[Path], folder: Path) -> Any:
    from moerge.data.formats import PLAIN
    from moerge.library import ExpertLibrary

    library = ExpertLibrary.create(folder)
    for path in experts:
        library.import_peft(path, task="t", base=str(base), name=path.name, prompt_format=PLAIN)
    return library


def request_plan(args: argparse.Namespace) -> list[list[str]]:
    """For each client, the experts its requests ask for, in order (seeded)."""
    rng = random.Random(args.seed)
    return [[f"e{rng.randrange(args.experts)}" for _ in range(args.requests_per_client)] for _ in range(args.clients)]


# --------------------------------------------------------------------------------------------- driving


def drive(measured: Measured, plan: list[list[str]], call: Callable[[str], Answer]) -> None:
    """N client threads, each sending its requests one after another; adds the wall time, the answers
    (appended to each client's row) and the load average before and after to `measured`."""
    answers: list[list[Answer]] = [[] for _ in plan]
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for model in plan[c]:
                started = time.perf_counter()
                answer = call(model)
                answer.latency = time.perf_counter() - started
                answers[c].append(answer)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    measured.loads.append(os.getloadavg()[0])
    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(plan))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    measured.loads.append(os.getloadavg()[0])
    if errors:
        raise RuntimeError(f"{measured.name}: a client failed: {errors[0]!r}") from errors[0]
    measured.wall += wall
    if not measured.answers:
        measured.answers = [[] for _ in plan]
    for row, new in zip(measured.answers, answers, strict=True):
        row.extend(new)
    tokens = sum(a.tokens for row in answers for a in row)
    print(
        f"    {measured.name}: {sum(map(len, answers))} requests, {tokens} tokens in {wall:.1f} s "
        f"(load {measured.loads[-2]:.2f} → {measured.loads[-1]:.2f})",
        flush=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """moerge serve's app on uvicorn in a thread of this process."""

    def __init__(self, pool: Any, max_tokens: int) -> None:
        import openai
        import uvicorn

        from moerge.serve import create_app

        port = _free_port()
        app = create_app(pool, max_tokens=max_tokens, max_queue=256)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600
        )
        self.max_tokens = max_tokens

    def call(self, model: str, prompt: str = PROMPT) -> Answer:
        reply = self.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=self.max_tokens,
            temperature=0,
        )
        routing = (getattr(reply, "moerge", None) or {}).get("routing")
        top = max(routing, key=routing.get) if routing else None
        return Answer(reply.choices[0].message.content or "", reply.usage.completion_tokens, routed_to=top)

    def batch_rows(self) -> str:
        """`moerge_batch_rows` from /metrics: the mean rows per decoding step of the shared batch."""
        import urllib.request

        port = self.server.config.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
            text = response.read().decode()
        values = {
            line.split()[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("moerge_batch_rows")
        }
        count, total = values.get("moerge_batch_rows_count", 0.0), values.get("moerge_batch_rows_sum", 0.0)
        return f"{int(count)} decoding steps, {total / count:.2f} rows each" if count else "no batched steps"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class PeftWorker:
    """The hand-written server: one worker thread over a queue, one PeftModel with every adapter.

    `batch` = 1: one request at a time (set_adapter + generate); more: every waiting request up to
    `batch`, answered by one generate with peft's `adapter_names` (mixed-batch inference)."""

    def __init__(self, model: Any, tokenizer: Any, max_tokens: int, batch: int) -> None:
        self.model, self.tokenizer, self.max_tokens, self.batch = model, tokenizer, max_tokens, batch
        self.prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        self.jobs: queue.Queue[tuple[str, Future] | None] = queue.Queue()
        self.rows: list[int] = []
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def call(self, model: str) -> Answer:
        future: Future = Future()
        self.jobs.put((model, future))
        return future.result()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            jobs = [job]
            while len(jobs) < self.batch:
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)
                    break
                jobs.append(more)
            try:
                answers = self.generate([name for name, _ in jobs])
            except BaseException as exc:  # handed to the waiting clients
                for _, future in jobs:
                    future.set_exception(exc)
                continue
            for (_, future), answer in zip(jobs, answers, strict=True):
                future.set_result(answer)

    def generate(self, adapters: list[str]) -> list[Answer]:
        import torch

        self.rows.append(len(adapters))
        tokenizer = self.tokenizer
        ids = torch.tensor([self.prompt] * len(adapters))  # one fixed prompt: no padding
        extra: dict[str, Any] = {}
        if self.batch == 1:
            self.model.set_adapter(adapters[0])
        else:
            extra["adapter_names"] = adapters
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **extra,
            )
        answers = []
        for row in out[:, ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            answers.append(Answer(tokenizer.decode(row, skip_special_tokens=True), len(row)))
        return answers


# ---------------------------------------------------------------------------------------------- report


def matches(a: Measured, b: Measured, first: int) -> tuple[int, int, int]:
    """(exact text matches among the first `first` requests, among all, number of requests)."""
    same = [x.text == y.text for x, y in zip(a.flat, b.flat, strict=True)]
    return sum(same[:first]), sum(same), len(same)


def first_difference(a: Measured, b: Measured) -> str | None:
    for i, (x, y) in enumerate(zip(a.flat, b.flat, strict=True)):
        if x.text != y.text:
            pairs = zip(x.text, y.text, strict=False)
            at = next((j for j, (p, q) in enumerate(pairs) if p != q), min(len(x.text), len(y.text)))
            lo = max(0, at - 25)
            return f"request {i}, char {at}: {x.text[lo : at + 25]!r} vs {y.text[lo : at + 25]!r}"
    return None


def table(results: list[Measured]) -> str:
    lines = [
        "| variant | requests | completion tokens | wall s | requests/s | tokens/s | p50 latency s | p99 latency s "
        "| load avg (min–max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {len(r.flat)} | {r.tokens} | {r.wall:.1f} | {r.requests_per_s:.3f} | "
            f"{r.tokens_per_s:.1f} | {r.latency(0.5):.2f} | {r.latency(0.99):.2f} | "
            f"{min(r.loads):.2f}–{max(r.loads):.2f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("/root/.cache/moerge/models/smollm2-135m-instruct"))
    parser.add_argument("--experts", type=int, default=16, help="K LoRA experts")
    parser.add_argument("--clients", type=int, default=8, help="N concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (requests split among them)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--compare", type=int, default=16, help="first requests whose texts are compared")
    parser.add_argument("--lora-std", type=float, default=0.02, help="std of the random B factors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="abcdef", help="variants to run, e.g. 'ab' or 'ef'")
    args = parser.parse_args()
    if args.requests_per_client % args.rounds:
        parser.error("--requests-per-client must be a multiple of --rounds")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import AutoTokenizer

    from moerge.data.formats import PLAIN
    from moerge.data.prompts import chat_prompt_ids
    from moerge.route import build_router
    from moerge.serve import ModelPool

    base = args.base.resolve()
    tokenizer = AutoTokenizer.from_pretrained(base)
    plan = request_plan(args)
    names = [f"e{i}" for i in range(args.experts)]
    print(
        f"K={args.experts} experts, N={args.clients} clients × {args.requests_per_client} requests in "
        f"{args.rounds} interleaved rounds, max_tokens={args.max_tokens}, torch threads={torch.get_num_threads()}, "
        f"{len({e for row in plan for e in row})} distinct experts asked",
        flush=True,
    )
    tmp = tempfile.TemporaryDirectory(prefix="serve_bench_")
    started = time.perf_counter()
    experts = make_experts(base, Path(tmp.name) / "adapters", args.experts, args.seed, args.lora_std)
    library = make_library(base, experts, Path(tmp.name) / "lib")
    print(f"  {args.experts} experts written and imported in {time.perf_counter() - started:.1f} s", flush=True)
    hand = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ours = chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}], PLAIN)
    print(f"  prompt: {len(ours)} tokens; moerge's `plain` rendering == apply_chat_template: {list(hand) == ours}")

    # every variant up and warm before any is timed (the first request stacks the experts, etc.)
    variants: dict[str, tuple[Measured, Callable[[str], Answer], Callable[[str], str]]] = {}
    closers: list[Callable[[], None]] = []
    rows: dict[str, Callable[[], str]] = {}
    if "a" in args.only:
        server_a = Server(ModelPool(base=str(base), library=library, max_loaded=1), args.max_tokens)
        server_a.call("e0")
        variants["a"] = (Measured("(a) moerge serve, K experts"), server_a.call, lambda e: e)
        closers.append(server_a.close)
        rows["a"] = server_a.batch_rows
    model = None
    if "b" in args.only or "c" in args.only:
        model = PeftModel.from_pretrained(load_model(base), str(experts[0]), adapter_name=names[0]).eval()
        for name, path in zip(names[1:], experts[1:], strict=True):
            model.load_adapter(str(path), adapter_name=name)
        for key, batch, label in (
            ("b", 1, "(b) peft, one at a time (set_adapter)"),
            ("c", args.clients, "(c) peft mixed batch (adapter_names)"),
        ):
            if key in args.only:
                worker = PeftWorker(model, tokenizer, args.max_tokens, batch)
                worker.call("e0")
                worker.rows.clear()
                variants[key] = (Measured(label), worker.call, lambda e: e)
                closers.append(worker.close)
                rows[key] = lambda w=worker: f"{len(w.rows)} generates, {statistics.mean(w.rows):.2f} rows each"
    if "d" in args.only:
        server_d = Server(ModelPool(base=str(base), library=None, max_loaded=1), args.max_tokens)
        server_d.call("base")
        variants["d"] = (Measured("(d) moerge serve, base only"), server_d.call, lambda e: "base")
        closers.append(server_d.close)
        rows["d"] = server_d.batch_rows

    if "e" in args.only or "f" in args.only:
        started = time.perf_counter()
        router = build_router(
            "centroid",
            {n: library.path(n) for n in names},
            Path(tmp.name) / "centroid",
            base=str(base),
            data=router_data(names),
        )
        print(f"  centroid router over {args.experts} experts built in {time.perf_counter() - started:.1f} s")
        pool = ModelPool(base=str(base), library=library, routers={"centroid": router}, auto="centroid", max_loaded=1)
        server_e = Server(pool, args.max_tokens)
        server_e.call("auto", topic_prompt("e0"))  # stacks the experts and reads the router
        for key, label, model_of in (
            ("e", "(e) moerge serve, model auto (centroid)", lambda e: "auto"),
            ("f", "(f) moerge serve, one expert (e0)", lambda e: "e0"),
        ):
            if key in args.only:
                call = lambda e, model_of=model_of: server_e.call(model_of(e), topic_prompt(e))  # noqa: E731
                variants[key] = (Measured(label), call, lambda e: e)
                rows[key] = server_e.batch_rows
        closers.append(server_e.close)

    keys = list(variants)
    step = args.requests_per_client // args.rounds
    for r in range(args.rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotated, so load drift hits every variant
        print(f"  round {r + 1}/{args.rounds} ({' '.join(order)})", flush=True)
        for key in order:
            measured, call, rename = variants[key]
            drive(measured, [[rename(e) for e in row[r * step : (r + 1) * step]] for row in plan], call)
    for key in keys:
        shared = " (e and f together)" if key in "ef" and {"e", "f"} <= set(keys) else ""
        print(f"  {key}: {rows[key]()}" + (" (warm-up included)" if key in "adef" else "") + shared)

    base_text = None
    if model is not None:
        reference = PeftWorker(model, tokenizer, args.max_tokens, 1)
        with model.disable_adapter():
            base_text = reference.call("e0").text  # adapters off: the base's own greedy answer
        reference.close()
    for close in closers:
        close()
    tmp.cleanup()

    results = {key: variants[key][0] for key in keys}
    print()
    print(table(list(results.values())))
    print()
    if "a" in results:
        a = results["a"]
        for other in ("b", "c", "d"):
            if other in results:
                o = results[other]
                print(
                    f"(a)/({other}): requests/s {a.requests_per_s / o.requests_per_s:.2f}×, "
                    f"tokens/s {a.tokens_per_s / o.tokens_per_s:.2f}×, "
                    f"p50 latency {a.latency(0.5) / o.latency(0.5):.2f}×, "
                    f"p99 latency {a.latency(0.99) / o.latency(0.99):.2f}×"
                )
    flat_plan = [e for row in plan for e in row]
    if "b" in results:
        by_expert = dict(zip(flat_plan, (ans.text for ans in results["b"].flat), strict=True))
        print(f"distinct greedy texts over the {len(by_expert)} experts asked (b): {len(set(by_expert.values()))}")
        as_base = sum(t == base_text for t in by_expert.values())
        print(f"experts whose (b) answer equals the base's (adapters disabled): {as_base}")
        for other in ("a", "c"):
            if other in results:
                first, total, n = matches(results[other], results["b"], args.compare)
                print(f"({other}) vs (b) exact text matches: {first}/{min(args.compare, n)} first, {total}/{n} all")
                diff = first_difference(results[other], results["b"])
                if diff:
                    print(f"    first mismatch: {diff}")
    if "d" in results and base_text is not None:
        same = sum(ans.text == base_text for ans in results["d"].flat)
        print(f"(d) texts equal to peft's base answer: {same}/{len(results['d'].flat)}")
    if "e" in results:
        e = results["e"]
        flat_plan = [x for row in plan for x in row]
        chosen = [ans.routed_to for ans in e.flat]
        print(
            f"(e) the router chose {len(set(chosen))} distinct experts; "
            f"{sum(c == x for c, x in zip(chosen, flat_plan, strict=True))}/{len(chosen)} requests went to "
            "the expert whose topic they ask about"
        )
        if "f" in results:
            f = results["f"]
            print(
                f"(e)/(f): requests/s {e.requests_per_s / f.requests_per_s:.2f}×, "
                f"tokens/s {e.tokens_per_s / f.tokens_per_s:.2f}× (target ≥ 0.7×), "
                f"p50 latency {e.latency(0.5) / f.latency(0.5):.2f}×, "
                f"p99 latency {e.latency(0.99) / f.latency(0.99):.2f}×"
            )
    for key in ("a", "c"):
        if key in results:
            texts: dict[str, set[str]] = {}
            for expert, ans in zip(flat_plan, results[key].flat, strict=True):
                texts.setdefault(expert, set()).add(ans.text)
            varying = sum(len(t) > 1 for t in texts.values())
            print(f"({key}) experts whose answer changed with the batch it ran in: {varying}/{len(texts)}")


if __name__ == "__main__":
    main()
