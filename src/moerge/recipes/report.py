"""Turning raw comparison results into tables, plots, CSV, Markdown and a self-contained HTML report.

Each table (main results, per task, experts) is built once as a moerge.tables.Table; the terminal,
report.md, report.html and results.csv all render that value, so their headers and numbers agree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from moerge.eval.stats import holm, mcnemar, paired_matrix, stratified_ci, summarise
from moerge.paths import write_json_atomic, write_text_atomic
from moerge.tables import Cell, Column, Interval, Table, cell

STRATEGY = Column("strategy", "strategy")
COLUMNS = (
    STRATEGY,
    Column("kind", "kind", shown=False),
    Column("held_in", "held-in acc", "right", interval=True),
    Column("held_out", "held-out acc", "right", interval=True),
    Column("forgetting_loss", "Δ probe loss", "right"),
    Column("forgetting_acc", "Δ general acc", "right"),
    Column("routing_accuracy", "routing acc", "right"),
    Column("added_params", "added params", "right"),
    Column("active_params", "active params", "right"),
    Column("latency_ms", "ms / example", "right"),
    Column("peak_memory_mb", "peak MB", "right"),
)
"""The main table's columns, each a key of a summarised row; kind is data only (results.csv)."""
MISMATCH = "†"


def _reference_rows(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(base, oracle): the untouched model that forgetting and expert gains are measured against, and the
    strategy that gives each task its own expert. The one place the report knows strategy kinds."""

    def first(kind: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["kind"] == kind), None)

    return first("base"), first("oracle")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _group(tasks: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    lists = [tasks[n]["scores"] for n in names if n in tasks]
    if not lists:
        return None
    low, high = stratified_ci(lists)
    return {
        "mean": _mean([sum(s) / len(s) for s in lists]),
        "ci_low": low,
        "ci_high": high,
        "n": sum(len(s) for s in lists),
    }


def _per_task(result: dict[str, Any]) -> dict[str, Any]:
    """A task's summary, with the prompt format it was scored in and the note when that is not the
    format its experts were trained with."""
    fields = {key: result.get(key) for key in ("group", "prompt_format", "format_note")}
    return {**summarise(result["scores"]), **fields}


def format_notes(results: dict[str, Any]) -> list[str]:
    """One line per (strategy, task) scored in a prompt format its experts were not trained with."""
    return [
        f"{row['strategy']} on {task}: {summary['format_note']}"
        for row in results["rows"]
        for task, summary in row["per_task"].items()
        if summary.get("format_note")
    ]


def summarise_results(raw: list[dict[str, Any]], *, held_in: list[str], held_out: list[str]) -> dict[str, Any]:
    """One row per strategy: macro means with stratified 95% intervals, forgetting vs base, cost."""
    rows = []
    for item in raw:
        tasks = item["tasks"]
        forgetting = [f for f in item["forgetting"] if f]
        general = [sum(f["task_scores"]) / len(f["task_scores"]) for f in forgetting if f.get("task_scores")]
        n_total = sum(t["n"] for t in tasks.values()) or 1
        rows.append(
            {
                "strategy": item["strategy"]["name"],
                "kind": item["strategy"]["kind"],
                "held_in": _group(tasks, held_in),
                "held_out": _group(tasks, held_out),
                "per_task": {name: _per_task(t) for name, t in tasks.items()},
                "probe_loss": _mean([f.get("probe_loss") for f in forgetting]),
                "general_acc": _mean(general),
                "routing_accuracy": item["routing"]["accuracy"] if item.get("routing") else None,
                "routing": item["routing"]["report"] if item.get("routing") else None,
                "added_params": max((t.get("added_params", 0) for t in tasks.values()), default=0),
                "active_params": max((t.get("active_params", 0) for t in tasks.values()), default=0),
                "latency_ms": 1000 * sum(t["seconds"] for t in tasks.values()) / n_total,
                "peak_memory_mb": max((t.get("peak_memory_mb", 0) for t in tasks.values()), default=0),
            }
        )
    base, _ = _reference_rows(rows)
    for r in rows:
        # Forgetting as "after − before" in the direction of ability: negative means the strategy forgot.
        r["forgetting_loss"] = (
            (base["probe_loss"] - r["probe_loss"])
            if base and None not in (base["probe_loss"], r["probe_loss"])
            else None
        )
        r["forgetting_acc"] = (
            (r["general_acc"] - base["general_acc"])
            if base and None not in (base["general_acc"], r["general_acc"])
            else None
        )
    results = {"rows": rows, "held_in": held_in, "held_out": held_out}
    results["significance"] = paired_statistics(raw, {"held_in": held_in, "held_out": held_out})
    results["conclusions"] = conclusions(results)
    results["disagreements"] = disagreements(raw, [*held_in, *held_out])
    return results


# ---- paired significance: every strategy is scored on the same examples ----------------------------------

ALPHA = 0.05
GROUP_NAMES = {"held_in": "held-in", "held_out": "held-out"}


def _mcnemar_stats(tasks: dict[str, dict[str, list[float]]], x: str, y: str, shared: list[str]) -> dict[str, Any]:
    """McNemar's exact test on the pooled examples of the shared tasks, and per task the mean difference
    with McNemar's exact p (per-task p-values are not corrected for multiplicity)."""
    pairs = [(tasks[t][x], tasks[t][y]) for t in shared]
    pooled = mcnemar([v for a, _ in pairs for v in a], [v for _, b in pairs for v in b])
    per_task = {
        t: {"diff": (sum(a) - sum(b)) / len(a), **mcnemar(a, b)} for t, (a, b) in zip(shared, pairs, strict=True)
    }
    return {"mcnemar": pooled, "per_task": per_task}


def _resamples(pairs: int, alpha: float) -> int:
    """Enough bootstrap resamples that the smallest p a resample count allows, 2/(B+1), stays well below
    alpha after Holm multiplies it by the number of pairs."""
    return max(10_000, math.ceil(20 * pairs / alpha))


def paired_statistics(raw: list[dict[str, Any]], groups: dict[str, list[str]], *, alpha: float = ALPHA) -> dict:
    """For every group (held-in, held-out) and every pair of strategies scored on it: the paired
    difference of macro means (a − b) with its 95% interval and bootstrap p, the p Holm-adjusted across all
    the group's pairs, whether it is significant at `alpha` after that correction, and McNemar's exact test.

    A pair is compared on the group's tasks both strategies were scored on, with as many examples (an oracle
    has no held-out tasks, so it is left out of held-out comparisons).
    """
    out: dict[str, Any] = {"alpha": alpha, "correction": "holm", "groups": {}}
    names = [item["strategy"]["name"] for item in raw]
    every = [(x, y) for i, x in enumerate(names) for y in names[i + 1 :]]
    for group, members in groups.items():
        tasks = {
            t: {
                item["strategy"]["name"]: item["tasks"][t]["scores"]
                for item in raw
                if item["tasks"].get(t, {}).get("scores")
            }
            for t in members
        }
        resamples = _resamples(len(every), alpha)
        found = paired_matrix(tasks, every, resamples=resamples)
        pairs = [
            {"a": x, "b": y, **found[(x, y)], **_mcnemar_stats(tasks, x, y, found[(x, y)]["tasks"])}
            for x, y in every
            if (x, y) in found
        ]
        adjusted, rejected = holm([p["p"] for p in pairs], alpha=alpha)
        for pair, p_holm, significant in zip(pairs, adjusted, rejected, strict=True):
            pair.update(p_holm=p_holm, significant=significant)
        out["groups"][group] = {"pairs": pairs, "resamples": resamples}
    return out


SWAPPED = ("a", "b", "diff", "ci_low", "ci_high", "p", "p_holm", "significant", "n", "tasks")


def _find_pair(results: dict[str, Any], group: str, x: str, y: str) -> dict[str, Any] | None:
    """The statistics of x − y on `group` (stored once per pair as a − b; turned round when needed)."""
    for pair in results.get("significance", {}).get("groups", {}).get(group, {}).get("pairs", []):
        if (pair["a"], pair["b"]) == (x, y):
            return pair
        if (pair["a"], pair["b"]) == (y, x):
            return _turned(pair)
    return None


def _turned(pair: dict[str, Any]) -> dict[str, Any]:
    """b − a from a − b: the difference and its interval negated; the McNemar details are left out."""
    flipped = {
        "a": pair["b"],
        "b": pair["a"],
        "diff": 0.0 - pair["diff"],  # 0.0 − x, not −x: no "-0.000" for a zero difference
        "ci_low": 0.0 - pair["ci_high"],
        "ci_high": 0.0 - pair["ci_low"],
    }
    return {**{k: pair[k] for k in SWAPPED}, **flipped}


def _evidence(pair: dict[str, Any]) -> str:
    return f"{pair['diff']:+.3f} [{pair['ci_low']:+.2f}, {pair['ci_high']:+.2f}], p={_p(pair['p_holm'])} Holm"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _pair_sentence(pair: dict[str, Any], group: str) -> str:
    """ "X beats Y on held-in (...)" with the winner first, or that the data cannot tell them apart."""
    label = GROUP_NAMES[group]
    if not pair["significant"]:
        return f"the data cannot tell {pair['a']} and {pair['b']} apart on {label} ({_evidence(pair)})"
    if pair["diff"] < 0:
        pair = _turned(pair)
    return f"{pair['a']} beats {pair['b']} on {label} ({_evidence(pair)})"


def _best_sentence(results: dict[str, Any], group: str) -> str | None:
    """The highest macro mean is called best only if it beats every other strategy significantly;
    otherwise the sentence names the strategies the data cannot tell it apart from."""
    scored = [
        (r["strategy"], r[group]["mean"]) for r in results["rows"] if r.get(group) and r[group]["mean"] is not None
    ]
    if len(scored) < 2:
        return None
    leader, mean = max(scored, key=lambda x: x[1])
    label = GROUP_NAMES[group]
    tied = []
    for other, _ in scored:
        pair = _find_pair(results, group, leader, other) if other != leader else None
        if other != leader and not (pair and pair["significant"] and pair["diff"] > 0):
            tied.append(other)
    if not tied:
        return f"best on {label}: {leader} ({mean:.3f}), significantly above every other strategy"
    return (
        f"no strategy is best on {label}: {leader} has the highest mean ({mean:.3f}), but the data cannot tell it "
        f"apart from {', '.join(tied)}"
    )


def conclusions(results: dict[str, Any]) -> dict[str, list[str]]:
    """Per group, the sentences the report prints, all from the significance matrix: who is best (only
    when it beats every other strategy significantly), then each significant win, then the pairs the data
    cannot tell apart."""
    out = {}
    for group, stats in results.get("significance", {}).get("groups", {}).items():
        pairs = stats["pairs"]
        best = _best_sentence(results, group)
        wins = [_pair_sentence(p, group) for p in pairs if p["significant"]]
        ties = [_pair_sentence(p, group) for p in pairs if not p["significant"]]
        out[group] = [*([best] if best else []), *wins, *ties]
    return out


def headline_conclusions(results: dict[str, Any]) -> list[str]:
    """What a terminal prints under the table: who is best and each significant win; the pairs the data
    cannot tell apart are counted, their sentences are in the report."""
    lines = []
    for group, stats in results.get("significance", {}).get("groups", {}).items():
        best = _best_sentence(results, group)
        lines += [*([best] if best else []), *(_pair_sentence(p, group) for p in stats["pairs"] if p["significant"])]
        tied = sum(not p["significant"] for p in stats["pairs"])
        if tied:
            lines.append(f"{GROUP_NAMES[group]}: {tied} pairs the data cannot tell apart (see the report)")
    return lines


def significance_table(results: dict[str, Any], group: str) -> Table:
    """Strategy × strategy: row − column on the group's macro mean, 95% paired interval, Holm-adjusted p,
    and * where the difference is significant after the correction."""
    names = [r["strategy"] for r in results["rows"] if r.get(group)]
    columns = [STRATEGY, *(Column(f"vs:{n}", n, "right", interval=True) for n in names)]
    rows = []
    for x in names:
        cells = [cell(x)]
        for y in names:
            pair = _find_pair(results, group, x, y) if x != y else None
            cells.append(_diff_cell(pair, len(results[group])))
        rows.append(cells)
    stats = results.get("significance", {})
    count = len(stats.get("groups", {}).get(group, {}).get("pairs", []))
    title = (
        f"{GROUP_NAMES[group]}: row − column (macro mean), 95% paired bootstrap interval, p Holm-adjusted over "
        f"{count} pairs; * significant at α={stats.get('alpha', ALPHA)}"
    )
    return Table(title, columns, rows)


def _diff_cell(pair: dict[str, Any] | None, tasks: int) -> Cell:
    """The difference, its interval and Holm p; "(k/m tasks)" when the two share only k of the m tasks."""
    if pair is None:
        return Cell(None, "—")
    text = f"{pair['diff']:+.3f} [{pair['ci_low']:+.2f}, {pair['ci_high']:+.2f}] p={_p(pair['p_holm'])}"
    if len(pair["tasks"]) < tasks:
        text += f" ({len(pair['tasks'])}/{tasks} tasks)"
    return Cell(Interval(pair["diff"], pair["ci_low"], pair["ci_high"]), f"{text} *" if pair["significant"] else text)


# ---- per-example predictions: where strategies disagree ---------------------------------------------------

DISAGREEMENTS = 5
EXCERPT = 120


def _answer(row: dict[str, Any]) -> str:
    return str(row["chosen"] if "chosen" in row else row.get("output", ""))


def _excerpt(text: str, limit: int = EXCERPT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def disagreements(raw: list[dict[str, Any]], tasks: list[str], *, limit: int = DISAGREEMENTS) -> dict[str, Any]:
    """Per task, up to `limit` examples on which the strategies' answers differ (those where some are right
    and some wrong first), each with the question, target and every strategy's answer and correctness;
    and which (strategy, task) had no predictions (scores cached before predictions were kept)."""
    examples: dict[str, list[dict[str, Any]]] = {}
    missing = []
    for task in tasks:
        kept = {}
        for item in raw:
            result = item["tasks"].get(task)
            if result is None:
                continue
            if result.get("predictions") is None:
                missing.append(f"{item['strategy']['name']} on {task}")
            else:
                kept[item["strategy"]["name"]] = result["predictions"]
        if len(kept) >= 2 and len({len(rows) for rows in kept.values()}) == 1:
            examples[task] = _disagreeing(kept, limit)
    return {"examples": examples, "missing": missing}


def _disagreeing(kept: dict[str, list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    found = []
    for rows in zip(*kept.values(), strict=True):
        answers = {name: _answer(row) for name, row in zip(kept, rows, strict=True)}
        correct = {name: bool(row.get("correct")) for name, row in zip(kept, rows, strict=True)}
        if len(set(answers.values())) > 1:
            first = rows[0]
            question = first.get("input", first.get("prompt", ""))
            item = {"index": first["index"], "input": _excerpt(question), "target": first["target"]}
            found.append({**item, "answers": answers, "correct": correct})
    found.sort(key=lambda e: len(set(e["correct"].values())) == 1)  # stable: mixed right/wrong first
    return found[:limit]


def disagreement_table(results: dict[str, Any], task: str) -> Table:
    """One task's disagreeing examples: question excerpt, target, and each strategy's answer (✓ right, ✗ wrong)."""
    found = results.get("disagreements", {}).get("examples", {}).get(task, [])
    names = list(found[0]["answers"]) if found else []
    columns = [Column("index", "#", "right"), Column("input", "question"), Column("target", "target")]
    columns += [Column(f"answer:{n}", n) for n in names]
    rows = []
    for e in found:
        answers = [
            Cell(e["answers"][n], f"{_excerpt(e['answers'][n], 60)} {'✓' if e['correct'][n] else '✗'}") for n in names
        ]
        rows.append([cell(e["index"]), cell(e["input"]), cell(e["target"]), *answers])
    return Table(f"{task}: examples where strategies answer differently", columns, rows)


def _file_name(name: str) -> str:
    """A strategy or task name as one safe path component."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe or "_"


def write_predictions(raw: list[dict[str, Any]], out: Path) -> list[Path]:
    """predictions/<strategy>/<task>.jsonl for every (strategy, task) with predictions, atomically; the
    file of a (strategy, task) scored without predictions is removed, so none is left from another run."""
    written = []
    for item in raw:
        for task, result in item["tasks"].items():
            path = out / "predictions" / _file_name(item["strategy"]["name"]) / f"{_file_name(task)}.jsonl"
            rows = result.get("predictions")
            if rows is None:
                path.unlink(missing_ok=True)
                continue
            write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            written.append(path)
    return written


def fmt(key: str, value: Any) -> str:
    """How the report shows a value of the column `key`: the same text in every table and every output."""
    if value is None:
        return "—"
    if isinstance(value, dict):  # a score with its interval
        return f"{value['mean']:.3f} [{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
    if key in ("added_params", "active_params"):
        return f"{value / 1e6:.2f}M" if value else "0"
    if key == "trainable_params":
        return f"{value:,}"
    if key in ("forgetting_loss", "forgetting_acc", "expert_gain"):
        return f"{value:+.3f}"
    if key in ("latency_ms", "peak_memory_mb", "train_time_s"):
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _cell(key: str, value: Any) -> Cell:
    """A report value as a cell: scores with intervals become Intervals, so the CSV gets three numbers."""
    raw = Interval(value["mean"], value["ci_low"], value["ci_high"]) if isinstance(value, dict) else value
    return Cell(raw, fmt(key, value))


def _tasks(results: dict[str, Any]) -> list[str]:
    return [*results["held_in"], *results["held_out"]]


def _task_column(results: dict[str, Any], task: str) -> Column:
    return Column(f"task:{task}", f"{task} (held-out)" if task in results["held_out"] else task, "right")


def _task_cell(row: dict[str, Any], task: str) -> Cell:
    """A task's mean accuracy; marked † when scored in a format the experts were not trained with."""
    summary = row["per_task"].get(task, {})
    score = _cell(f"task:{task}", summary.get("mean"))
    return replace(score, text=f"{score.text} {MISMATCH}") if summary.get("format_note") else score


def results_table(results: dict[str, Any]) -> Table:
    """The main table, one row per strategy.

    Shown: COLUMNS. results.csv renders it with every column, headed by keys: strategy, kind, held_in,
    held_in_ci_low, held_in_ci_high, the same three for held_out, forgetting_loss, forgetting_acc,
    routing_accuracy, added_params, active_params, latency_ms, peak_memory_mb, then task:<name> (mean
    test accuracy) for each held-in and held-out task. Empty field: not measured.
    """
    tasks = _tasks(results)
    columns = [*COLUMNS, *(replace(_task_column(results, t), shown=False) for t in tasks)]
    rows = [
        [*(_cell(c.key, r.get(c.key)) for c in COLUMNS), *(_task_cell(r, t) for t in tasks)] for r in results["rows"]
    ]
    return Table("moerge compare (95% intervals in brackets)", columns, rows)


def per_task_table(results: dict[str, Any]) -> Table:
    """Mean test accuracy of every strategy on every task, and a last row with each task's test size."""
    tasks = _tasks(results)
    n = {t: next((r["per_task"][t]["n"] for r in results["rows"] if t in r["per_task"]), 0) for t in tasks}
    rows = [[cell(r["strategy"]), *(_task_cell(r, t) for t in tasks)] for r in results["rows"]]
    rows.append([cell("n test"), *(cell(n[t]) for t in tasks)])
    return Table("accuracy per task (test split)", [STRATEGY, *(_task_column(results, t) for t in tasks)], rows)


EXPERT_COLUMNS = (
    Column("task", "task"),
    Column("n_test", "n test", "right"),
    Column("base_acc", "base acc", "right"),
    Column("expert_acc", "expert acc", "right"),
    Column("expert_gain", "Δ", "right"),
    Column("method", "method"),
    Column("steps", "steps", "right"),
    Column("train_time_s", "train time (s)", "right"),
    Column("trainable_params", "trainable params", "right"),
    Column("peak_memory_mb", "peak MB", "right"),
)


def experts_table(results: dict[str, Any]) -> Table:
    """Each held-in task: base vs its own expert (the oracle's score), and what the expert cost to train."""
    base_row, oracle_row = _reference_rows(results["rows"])
    rows = []
    for name, cost in results.get("experts", {}).items():
        base = base_row["per_task"].get(name) if base_row else None
        own = oracle_row["per_task"].get(name) if oracle_row else None
        values = {
            "task": name,
            "n_test": (own or base or {}).get("n"),
            "base_acc": base["mean"] if base else None,
            "expert_acc": own["mean"] if own else None,
            "expert_gain": own["mean"] - base["mean"] if base and own else None,
            **{key: cost.get(key) for key in ("method", "steps", "train_time_s", "trainable_params", "peak_memory_mb")},
        }
        rows.append([_cell(c.key, values[c.key]) for c in EXPERT_COLUMNS])
    return Table("each held-in task: base vs its LoRA expert (test split)", EXPERT_COLUMNS, rows)


class ReportTables(NamedTuple):
    """Every table of the report, built once so report.md, report.html and results.csv agree, and the
    prompt-format notes their † marks refer to."""

    results: Table
    per_task: Table
    experts: Table
    format_notes: list[str]
    significance: list[Table]  # one strategy × strategy matrix per group with at least one pair
    conclusions: list[str]  # every group's sentences, from the matrices
    disagreements: list[Table]  # one per task with examples where the strategies' answers differ
    predictions_missing: list[str]  # "<strategy> on <task>" scored from a cache without predictions


def report_tables(results: dict[str, Any]) -> ReportTables:
    """Build each table once for write_reports, which renders it into every file."""
    groups = [g for g, stats in results.get("significance", {}).get("groups", {}).items() if stats["pairs"]]
    found = results.get("disagreements", {})
    return ReportTables(
        results_table(results),
        per_task_table(results),
        experts_table(results),
        format_notes(results),
        [significance_table(results, g) for g in groups],
        [line for g in groups for line in results.get("conclusions", {}).get(g, [])],
        [disagreement_table(results, t) for t, examples in found.get("examples", {}).items() if examples],
        found.get("missing", []),
    )


# ---- plots ------------------------------------------------------------------------------------------


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def make_plots(results: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes by name: held-in vs held-out scatter, per-task bars, a routing heatmap per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    rows = results["rows"]
    points = [
        (r["strategy"], r["held_in"]["mean"], r["held_out"]["mean"]) for r in rows if r["held_in"] and r["held_out"]
    ]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, x, y in points:
        ax.scatter(x, y, s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("held-in accuracy (macro mean)")
    ax.set_ylabel("held-out accuracy (macro mean)")
    ax.set_title("held-in vs held-out, one point per strategy")
    ax.grid(alpha=0.3)
    plots["scatter_held_in_vs_held_out"] = _figure_png(fig)

    tasks = _tasks(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks) * max(1, len(rows)) / 4), 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        values = [r["per_task"][t]["mean"] if t in r["per_task"] else 0.0 for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], values, width, label=r["strategy"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels([f"{t}{'*' if t in results['held_out'] else ''}" for t in tasks], rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_title("per-task accuracy (* = held-out)")
    ax.legend(fontsize=7, ncol=2)
    plots["per_task_bars"] = _figure_png(fig)

    for r in rows:
        if not r.get("routing"):
            continue
        report = r["routing"]
        names = list(report)
        experts = report[names[0]]["experts"]
        matrix = [report[t]["overall"] for t in names]
        fig, ax = plt.subplots(figsize=(1 + 0.7 * len(experts), 1 + 0.45 * len(names)))
        image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xticks(range(len(experts)))
        ax.set_xticklabels(experts, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(f"{r['strategy']}: mean routing weight (task × expert)")
        fig.colorbar(image, ax=ax)
        plots[f"routing_{r['strategy']}"] = _figure_png(fig)
    return plots


# ---- writing ----------------------------------------------------------------------------------------


def write_reports(results: dict[str, Any], out: Path) -> None:
    """results.json, results.csv (results_table's columns), report.md (+ plots/*.png), report.html (self-contained)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    tables = report_tables(results)
    write_text_atomic(out / "results.csv", tables.results.to_csv())
    plots = make_plots(results)
    (out / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    write_text_atomic(out / "report.md", render_markdown(tables, plots))
    write_text_atomic(out / "report.html", render_html(tables, plots))


NOTES = (
    "Scores are accuracies on each task's test split; the brackets are 95% bootstrap intervals (stratified by "
    "task for the means). Δ probe loss = base loss − strategy loss on the general text probe and Δ general acc "
    "= strategy − base accuracy on the general task: negative numbers mean forgetting. Routing acc: how often "
    "a held-in example's top expert (weights averaged over layers) is its task's own expert."
)


def _formats_section(notes: list[str]) -> str:
    return f"{MISMATCH} scored in a prompt format other than the one its experts were trained with:" if notes else ""


SIGNIFICANCE_NOTES = (
    "Every strategy is scored on the same test examples, so differences are paired: each cell is row − column "
    "on the macro mean, with a 95% paired bootstrap interval (examples resampled within each task, jointly for "
    "both strategies) and its bootstrap p-value, Holm-adjusted over all pairs of the group. A claim is made only "
    "where the adjusted p is below α; results.json also has McNemar's exact test per pair and per task."
)
DISAGREEMENT_NOTES = (
    "Up to five examples per task on which the strategies' answers differ (some right and some wrong first); "
    "✓ right, ✗ wrong. Every example's prediction is in predictions/<strategy>/<task>.jsonl."
)


def _missing_note(missing: list[str]) -> str:
    if not missing:
        return ""
    return (
        f"No predictions for {', '.join(missing)}: scored from a cache written before predictions were kept "
        "(delete those files under cache/ to score them again with predictions)."
    )


def _markdown_significance(tables: ReportTables) -> str:
    if not tables.significance:
        return ""
    matrices = "\n\n".join(f"**{t.title}**\n\n{t.to_markdown()}" for t in tables.significance)
    lines = "".join(f"\n- {line}" for line in tables.conclusions)
    return f"## Which differences are real\n\n{SIGNIFICANCE_NOTES}\n\n{matrices}\n\nWhat the data says:\n{lines}\n\n"


def _markdown_disagreements(tables: ReportTables) -> str:
    if not tables.disagreements and not tables.predictions_missing:
        return ""
    found = "\n\n".join(f"**{t.title}**\n\n{t.to_markdown()}" for t in tables.disagreements)
    note = f"{DISAGREEMENT_NOTES} {_missing_note(tables.predictions_missing)}".rstrip()
    return f"## Where strategies disagree\n\n{note}\n\n{found}\n\n"


def render_markdown(tables: ReportTables, plots: dict[str, bytes]) -> str:
    """report.md: the same sections as report.html, with the plots as files under plots/."""
    images = "\n".join(f"![{name}](plots/{name}.png)" for name in plots)
    formats = "".join(f"\n- {note}" for note in tables.format_notes)
    return (
        f"# moerge compare\n\n{tables.results.to_markdown()}\n\n{NOTES}\n\n{_markdown_significance(tables)}"
        f"## Per task\n\n{tables.per_task.to_markdown()}\n\n{_formats_section(tables.format_notes)}{formats}\n\n"
        f"{_markdown_disagreements(tables)}## Experts\n\n{tables.experts.to_markdown()}\n\n## Plots\n\n{images}\n"
    )


def _formats_html(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return f"<p>{html.escape(_formats_section(notes))}</p><ul>{items}</ul>"


def _html_significance(tables: ReportTables) -> str:
    if not tables.significance:
        return ""
    matrices = "".join(t.to_html(f"significance-{i}") for i, t in enumerate(tables.significance))
    items = "".join(f"<li>{html.escape(line)}</li>" for line in tables.conclusions)
    return (
        f"<h2>Which differences are real</h2><p>{html.escape(SIGNIFICANCE_NOTES)}</p>{matrices}"
        f"<p>What the data says:</p><ul id='conclusions'>{items}</ul>"
    )


def _html_disagreements(tables: ReportTables) -> str:
    if not tables.disagreements and not tables.predictions_missing:
        return ""
    found = "".join(t.to_html(f"disagree-{i}") for i, t in enumerate(tables.disagreements))
    note = f"{DISAGREEMENT_NOTES} {_missing_note(tables.predictions_missing)}"
    return f"<h2>Where strategies disagree</h2><p>{html.escape(note)}</p>{found}"


def render_html(tables: ReportTables, plots: dict[str, bytes]) -> str:
    """One file, no external resources: the tables, and every plot inlined as base64."""
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in plots.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}caption{text-align:left;color:#555}"
        "figure{display:inline-block;margin:1em}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>moerge compare</title><style>{style}</style>"
        f"</head><body><h1>moerge compare</h1>{tables.results.to_html('results')}<p>{html.escape(NOTES)}</p>"
        f"{_html_significance(tables)}"
        f"<h2>Per task</h2>{tables.per_task.to_html('per-task')}{_formats_html(tables.format_notes)}"
        f"{_html_disagreements(tables)}"
        f"<h2>Experts</h2>{tables.experts.to_html('experts')}"
        f"<h2>Plots</h2>{images}</body></html>"
    )
