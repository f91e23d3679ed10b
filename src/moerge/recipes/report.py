"""Turning raw comparison results into the table, CSV, Markdown and a self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from moerge.eval.stats import stratified_ci, summarise
from moerge.paths import write_json_atomic

COLUMNS = [
    ("strategy", "strategy"),
    ("held_in", "held-in acc"),
    ("held_out", "held-out acc"),
    ("forgetting_loss", "Δ probe loss"),
    ("forgetting_acc", "Δ general acc"),
    ("routing_accuracy", "routing acc"),
    ("added_params", "added params"),
    ("active_params", "active params"),
    ("latency_ms", "ms / example"),
    ("peak_memory_mb", "peak MB"),
]


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
                "per_task": {name: {**summarise(t["scores"]), "group": t["group"]} for name, t in tasks.items()},
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
    base = next((r for r in rows if r["kind"] == "base"), None)
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
    return {"rows": rows, "held_in": held_in, "held_out": held_out}


def fmt(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):  # a score with its interval
        return f"{value['mean']:.3f} [{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
    if key in ("added_params", "active_params"):
        return f"{value / 1e6:.2f}M" if value else "0"
    if key in ("forgetting_loss", "forgetting_acc"):
        return f"{value:+.3f}"
    if key in ("latency_ms", "peak_memory_mb"):
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(label for _, label in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results["rows"]:
        lines.append("| " + " | ".join(fmt(k, r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def per_task_table(results: dict[str, Any]) -> str:
    tasks = [*results["held_in"], *results["held_out"]]
    header = "| strategy | " + " | ".join(f"{t}{' (out)' if t in results['held_out'] else ''}" for t in tasks) + " |"
    lines = [header, "|" + "---|" * (len(tasks) + 1)]
    for r in results["rows"]:
        cells = [f"{r['per_task'][t]['mean']:.3f}" if t in r["per_task"] else "—" for t in tasks]
        lines.append(f"| {r['strategy']} | " + " | ".join(cells) + " |")
    n = {t: next((r["per_task"][t]["n"] for r in results["rows"] if t in r["per_task"]), 0) for t in tasks}
    lines.append("| n test | " + " | ".join(str(n[t]) for t in tasks) + " |")
    return "\n".join(lines)


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

    tasks = [*results["held_in"], *results["held_out"]]
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


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_reports(results: dict[str, Any], out: Path) -> None:
    """results.json, results.csv, report.md (+ plots/*.png) and report.html (self-contained)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "strategy",
            "kind",
            "held_in",
            "held_in_ci_low",
            "held_in_ci_high",
            "held_out",
            "held_out_ci_low",
            "held_out_ci_high",
            "forgetting_loss",
            "forgetting_acc",
            "routing_accuracy",
            "added_params",
            "active_params",
            "latency_ms",
            "peak_memory_mb",
            *[f"task:{t}" for t in [*results["held_in"], *results["held_out"]]],
        ]
    )
    for r in results["rows"]:
        group = [(r[g] or {}).get(k) for g in ("held_in", "held_out") for k in ("mean", "ci_low", "ci_high")]
        writer.writerow(
            [
                r["strategy"],
                r["kind"],
                *group,
                r["forgetting_loss"],
                r["forgetting_acc"],
                r["routing_accuracy"],
                r["added_params"],
                r["active_params"],
                r["latency_ms"],
                r["peak_memory_mb"],
                *[r["per_task"].get(t, {}).get("mean") for t in [*results["held_in"], *results["held_out"]]],
            ]
        )
    _write_text(out / "results.csv", buffer.getvalue())
    plots = make_plots(results)
    (out / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    _write_text(out / "report.md", render_markdown(results, plots))
    _write_text(out / "report.html", render_html(results, plots))


NOTES = (
    "Scores are accuracies on each task's test split; the brackets are 95% bootstrap intervals (stratified by "
    "task for the means). Δ probe loss = base loss − strategy loss on the general text probe and Δ general acc "
    "= strategy − base accuracy on the general task: negative numbers mean forgetting. Routing acc: how often "
    "a held-in example's top expert (weights averaged over layers) is its task's own expert."
)


def experts_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each held-in task: base vs its own expert, and what the expert cost to train."""
    rows = {r["kind"]: r for r in results["rows"]}
    header = [
        "task",
        "n test",
        "base acc",
        "expert acc",
        "Δ",
        "method",
        "steps",
        "train time (s)",
        "trainable params",
        "peak MB",
    ]
    body = []
    for name, cost in results.get("experts", {}).items():
        base = rows.get("base", {}).get("per_task", {}).get(name)
        own = rows.get("oracle", {}).get("per_task", {}).get(name)
        body.append(
            [
                name,
                str((own or base or {}).get("n", "—")),
                f"{base['mean']:.3f}" if base else "—",
                f"{own['mean']:.3f}" if own else "—",
                f"{own['mean'] - base['mean']:+.3f}" if base and own else "—",
                str(cost.get("method")),
                str(cost.get("steps")),
                f"{cost.get('train_time_s') or 0:.0f}",
                f"{cost.get('trainable_params') or 0:,}",
                f"{cost.get('peak_memory_mb') or 0:.0f}",
            ]
        )
    return header, body


def render_markdown(results: dict[str, Any], plots: dict[str, bytes]) -> str:
    images = "\n".join(f"![{name}](plots/{name}.png)" for name in plots)
    header, body = experts_rows(results)
    experts = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(row) + " |" for row in body]]
    )
    return (
        f"# moerge compare\n\n{markdown_table(results)}\n\n{NOTES}\n\n## Per task\n\n{per_task_table(results)}"
        f"\n\n## Experts\n\n{experts}\n\n## Plots\n\n{images}\n"
    )


def render_html(results: dict[str, Any], plots: dict[str, bytes]) -> str:
    """One file, no external resources: the table, per-task table and every plot inlined as base64."""

    def table(headers: list[str], body: list[list[str]], table_id: str) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'

    main = table(
        [label for _, label in COLUMNS], [[fmt(k, r.get(k)) for k, _ in COLUMNS] for r in results["rows"]], "results"
    )
    tasks = [*results["held_in"], *results["held_out"]]
    per_task = table(
        ["strategy", *[f"{t}{' (held-out)' if t in results['held_out'] else ''}" for t in tasks]],
        [
            [r["strategy"], *[fmt("", r["per_task"][t]) if t in r["per_task"] else "—" for t in tasks]]
            for r in results["rows"]
        ],
        "per-task",
    )
    experts = table(*experts_rows(results), "experts")
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in plots.items()
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child{text-align:left}figure{display:inline-block;margin:1em}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>moerge compare</title><style>{style}</style>"
        f"</head><body><h1>moerge compare</h1>{main}<p>{html.escape(NOTES)}</p><h2>Per task</h2>{per_task}"
        f"<h2>Experts</h2>{experts}<h2>Plots</h2>{images}</body></html>"
    )


def results_table(results: dict) -> Table:
    table = Table(*[label for _, label in COLUMNS], title="moerge compare (95% intervals in brackets)")
    for row in results["rows"]:
        table.add_row(*[fmt(key, row.get(key)) for key, _ in COLUMNS])
    return table
