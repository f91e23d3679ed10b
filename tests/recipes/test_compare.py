"""The comparison protocol on a tiny model: every strategy kind, caching, no leakage, reports."""

import json

import pytest
import yaml

from helpers import addition_rows, parity_rows, write_task
from moerge.errors import MoergeError
from moerge.recipes.compare import load_compare_config, run_compare


def _recipe(tmp_path, tiny_base, strategies, **extra) -> dict:
    parity = write_task(tmp_path / "parity.jsonl", parity_rows(40))
    colours = write_task(
        tmp_path / "colour.jsonl",
        [
            {"input": f"Colour of item {i}?", "target": ["red", "blue"][i % 2], "choices": ["red", "blue"]}
            for i in range(40)
        ],
    )
    unseen = write_task(
        tmp_path / "unseen.jsonl",
        [{"input": f"Is {i} odd?", "target": "yes" if i % 2 else "no", "choices": ["yes", "no"]} for i in range(30)],
    )
    probe = write_task(tmp_path / "probe.jsonl", addition_rows(30))
    return {
        "base": str(tiny_base),
        "library": str(tmp_path / "lib"),
        "method": "lora",
        "hyperparameters": {"rank": 2, "steps": 3, "batch_size": 4, "max_length": 48, "lr": 0.01, "eval_split": None},
        "held_in": [{"task": parity, "name": "parity"}, {"task": colours, "name": "colour"}],
        "held_out": [{"task": unseen, "name": "unseen"}],
        "forgetting": {"probe": probe, "task": unseen, "limit": 6},
        "eval_limit": 6,
        "explain_limit": 3,
        "strategies": strategies,
        **extra,
    }


def _load(tmp_path, raw):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_compare_config(path)


def test_every_strategy_kind_runs_and_reports(tmp_path, tiny_base):
    strategies = [
        "base",
        "oracle",
        "multitask",
        "ties",
        {"name": "soup", "kind": "merge", "method": "linear"},
        {"name": "arrow", "kind": "router", "router": "arrow", "policy": {"name": "top_k", "k": 1}},
        "uniform",
    ]
    recipe = _load(tmp_path, _recipe(tmp_path, tiny_base, strategies))
    out = tmp_path / "out"
    results = run_compare(recipe, out, progress=False)
    rows = {r["strategy"]: r for r in results["rows"]}
    assert set(rows) == {"base", "oracle", "multitask", "ties", "soup", "arrow", "uniform"}
    assert rows["oracle"]["held_out"] is None and "unseen" not in rows["oracle"]["per_task"]
    for name, row in rows.items():
        assert row["held_in"]["n"] == 12, name
        assert row["held_in"]["ci_low"] <= row["held_in"]["mean"] <= row["held_in"]["ci_high"]
    assert rows["base"]["forgetting_loss"] == 0 and rows["base"]["added_params"] == 0
    assert rows["oracle"]["added_params"] > 0
    assert 0 <= rows["arrow"]["routing_accuracy"] <= 1
    assert set(rows["arrow"]["routing"]) == {"parity", "colour", "unseen"}
    for file in ("results.json", "results.csv", "report.md", "report.html"):
        assert (out / file).is_file()
    assert set(results["experts"]) == {"parity", "colour"}
    assert results["experts"]["parity"]["steps"] == 3 and results["experts"]["parity"]["trainable_params"] > 0
    assert "## Experts" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 + 2  # scatter, bars, one heatmap per router
    assert "http://" not in html and "https://" not in html


def test_rerun_reuses_cache_and_changed_expert_invalidates(tmp_path, tiny_base, monkeypatch):
    import moerge.recipes.compare as compare

    recipe = _load(tmp_path, _recipe(tmp_path, tiny_base, ["base", "oracle"]))
    out = tmp_path / "out"
    first = run_compare(recipe, out, progress=False)
    calls = []
    real = compare._score_task
    monkeypatch.setattr(compare, "_score_task", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    assert run_compare(recipe, out, progress=False)["rows"] == first["rows"]
    assert calls == []  # everything came from the cache
    # Retrain one expert with other settings: only what depends on it is scored again.
    raw = _recipe(tmp_path, tiny_base, ["base", "oracle"])
    raw["held_in"][0]["overrides"] = {"lr": 0.02}
    with pytest.raises(MoergeError, match="trained with other settings"):  # replacing it is the user's call
        run_compare(_load(tmp_path, raw), out, progress=False)
    run_compare(_load(tmp_path, raw), out, retrain=True, progress=False)
    assert calls == ["parity"]


def test_held_out_tasks_never_train(tmp_path, tiny_base):
    raw = _recipe(tmp_path, tiny_base, ["base", "multitask"])
    recipe = _load(tmp_path, raw)
    run_compare(recipe, tmp_path / "out", progress=False)
    from moerge.library import ExpertLibrary

    library = ExpertLibrary(raw["library"])
    unseen = raw["held_out"][0]["task"]
    for name in library.names():
        meta = library.meta(name)
        sources = json.dumps(meta.model_dump(mode="json"))
        assert unseen not in sources, name
    leaked = dict(raw, held_out=[raw["held_in"][0]])
    with pytest.raises(MoergeError, match="also held-in"):
        _load(tmp_path, leaked)


def test_unknown_strategy_is_one_clear_error(tmp_path, tiny_base):
    with pytest.raises(MoergeError, match="unknown strategy 'tiez'"):
        _load(tmp_path, _recipe(tmp_path, tiny_base, ["tiez"]))


def test_prompt_formats_train_score_and_mark_mismatches(tmp_path, tiny_base):
    """Each task's `prompt` trains its expert and scores it; a merge of experts trained in different
    formats is scored in each task's format and the report marks (†) and explains the mismatch."""
    from moerge.library import ExpertLibrary

    raw = _recipe(tmp_path, tiny_base, ["base", "oracle", "linear", "arrow"], prompt_format="plain")
    raw["held_in"][0]["prompt"] = "raw"
    raw["forgetting"] = {}
    results = run_compare(_load(tmp_path, raw), tmp_path / "out", progress=False)
    library = ExpertLibrary(raw["library"])
    assert library.meta("parity").prompt_format.name == "raw"
    assert library.meta("colour").prompt_format.name == "plain"
    rows = {r["strategy"]: r for r in results["rows"]}
    expected = {"parity": "raw", "colour": "plain", "unseen": "plain"}
    for strategy in ("base", "oracle"):  # (the oracle has no expert for the held-out task)
        formats = {task: summary["prompt_format"] for task, summary in rows[strategy]["per_task"].items()}
        assert formats == {task: expected[task] for task in formats} and len(formats) >= 2, strategy
        assert not any(t["format_note"] for t in rows[strategy]["per_task"].values())
    for strategy in ("linear", "arrow"):
        per_task = rows[strategy]["per_task"]
        assert per_task["parity"]["prompt_format"] == "raw" and per_task["colour"]["prompt_format"] == "plain"
        assert "different prompt formats" in per_task["parity"]["format_note"]
    merged = library.meta(next(n for n in library.names() if n.startswith("merge-linear")))
    assert merged.prompt_format == "mixed"
    assert merged.provenance["prompt_formats"] == {"parity": "raw", "colour": "plain"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "†" in report and "linear on parity: experts were trained with different prompt formats" in report
    from moerge.recipes.compare import best_router  # what `serve --from-compare` serves as `auto`

    name, folder = best_router(tmp_path / "out")
    assert name == "arrow" and folder.parent == tmp_path / "out" / "routers" and (folder / "config.json").is_file()
    # told otherwise: every strategy is scored in the override, and says so where it differs
    forced = _load(tmp_path, {**raw, "strategies": ["base", "oracle"], "override_prompt_format": "moerge"})
    rows = {r["strategy"]: r for r in run_compare(forced, tmp_path / "out", progress=False)["rows"]}
    assert rows["oracle"]["per_task"]["parity"]["prompt_format"] == "moerge"
    assert rows["oracle"]["per_task"]["parity"]["format_note"] == "trained with prompt format 'raw', scored in 'moerge'"
    assert rows["base"]["per_task"]["unseen"]["format_note"] is None


def test_out_holding_other_files_is_refused_before_any_work(tmp_path, tiny_base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    recipe = _load(tmp_path, _recipe(tmp_path, tiny_base, ["base"]))
    with pytest.raises(MoergeError, match=r"out: --out holds 'thesis.tex', which a compare does not write"):
        run_compare(recipe, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"] and not (tmp_path / "lib").exists()


def test_demo_prints_the_command_that_serves_its_library(tmp_path, tiny_base, capsys):
    from moerge.recipes.demo import run_demo

    raw = _recipe(tmp_path, tiny_base, ["base", "arrow"])
    raw["forgetting"] = {}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_demo(path, tmp_path / "out")
    printed = capsys.readouterr().out
    assert f"serve its experts: moerge serve --library {tmp_path / 'lib'} --from-compare {tmp_path / 'out'}" in printed
