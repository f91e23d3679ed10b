"""The compare report's paired significance (matrix, conclusions, results.json) and the examples on which
strategies disagree, from hand-made results whose statistics are known in closed form."""

import json
import math

import pytest

from moerge.eval.stats import holm
from moerge.recipes.report import (
    disagreement_table,
    significance_table,
    summarise_results,
    write_predictions,
    write_reports,
)
from moerge.tables import Interval

N = 50  # examples per task


def _task(group: str, right: set[int], predictions: list[dict] | None = None) -> dict:
    scores = [float(i in right) for i in range(N)]
    out = {"group": group, "scores": scores, "n": N, "seconds": 1.0}
    return {**out, "predictions": predictions} if predictions is not None else out


def _raw(name: str, kind: str, tasks: dict[str, dict]) -> dict:
    return {"strategy": {"name": name, "kind": kind}, "tasks": tasks, "forgetting": [], "routing": None}


BASE_RIGHT = set(range(20))  # 20 / 50 on every task
ORACLE_RIGHT = set(range(40))  # the base's 20 and 20 more: 40 / 50
MERGE_A = ORACLE_RIGHT - {39}  # the oracle's, less one example on task a


@pytest.fixture
def results():
    raw = [
        _raw(
            "base",
            "base",
            {"a": _task("held_in", BASE_RIGHT), "b": _task("held_in", BASE_RIGHT), "z": _task("held_out", BASE_RIGHT)},
        ),
        _raw("oracle", "oracle", {"a": _task("held_in", ORACLE_RIGHT), "b": _task("held_in", ORACLE_RIGHT)}),
        _raw(
            "ties",
            "merge",
            {"a": _task("held_in", MERGE_A), "b": _task("held_in", ORACLE_RIGHT), "z": _task("held_out", BASE_RIGHT)},
        ),
    ]
    return summarise_results(raw, held_in=["a", "b"], held_out=["z"])


def _pairs(results, group):
    return {(p["a"], p["b"]): p for p in results["significance"]["groups"][group]["pairs"]}


def test_pair_statistics_against_closed_forms(results):
    pairs = _pairs(results, "held_in")
    assert set(pairs) == {("base", "oracle"), ("base", "ties"), ("oracle", "ties")}
    resamples = results["significance"]["groups"]["held_in"]["resamples"]
    assert resamples == 10_000

    base_oracle = pairs[("base", "oracle")]
    assert base_oracle["diff"] == pytest.approx(-0.4) and base_oracle["tasks"] == ["a", "b"] and base_oracle["n"] == 100
    # per task the difference is −1 on 20 of 50 examples: se of the macro mean = √(2 · 0.24/50) / 2
    se = math.sqrt(2 * 0.4 * 0.6 / N) / 2
    assert base_oracle["ci_low"] == pytest.approx(-0.4 - 1.96 * se, abs=0.02)
    assert base_oracle["ci_high"] == pytest.approx(-0.4 + 1.96 * se, abs=0.02)
    assert base_oracle["p"] == pytest.approx(2 / (resamples + 1))  # no resample reaches 0: the floor
    assert base_oracle["mcnemar"] == {"a_only": 0, "b_only": 40, "p": pytest.approx(2 / 2**40)}
    assert base_oracle["per_task"]["a"] == {"diff": pytest.approx(-0.4), "a_only": 0, "b_only": 20, "p": 2 / 2**20}

    # oracle − ties: one discordant example on task a (of 50), none on b. A resample's difference is 0
    # exactly when that example is not drawn, with probability (49/50)^50, else positive.
    oracle_ties = pairs[("oracle", "ties")]
    assert oracle_ties["diff"] == pytest.approx(0.01)
    assert oracle_ties["p"] == pytest.approx(2 * (49 / 50) ** 50, abs=0.03)
    assert oracle_ties["mcnemar"]["p"] == 1.0  # 1 vs 0 discordant: 2 · ½ = 1

    ps = [p["p"] for p in results["significance"]["groups"]["held_in"]["pairs"]]
    adjusted, rejected = holm(ps)
    assert [p["p_holm"] for p in results["significance"]["groups"]["held_in"]["pairs"]] == adjusted
    assert [p["significant"] for p in results["significance"]["groups"]["held_in"]["pairs"]] == rejected
    assert pairs[("base", "oracle")]["significant"] and pairs[("base", "ties")]["significant"]
    assert not oracle_ties["significant"]


def test_held_out_leaves_out_strategies_without_held_out_tasks(results):
    pairs = _pairs(results, "held_out")
    assert list(pairs) == [("base", "ties")]  # the oracle has no held-out task
    assert pairs[("base", "ties")]["diff"] == 0.0 and pairs[("base", "ties")]["p"] == 1.0
    table = significance_table(results, "held_out")
    assert [c.header for c in table.columns] == ["strategy", "base", "ties"]


def test_matrix_is_row_minus_column_and_marks_significance(results):
    table = significance_table(results, "held_in")
    assert [c.header for c in table.columns] == ["strategy", "base", "oracle", "ties"]
    by_row = {row[0].text: row[1:] for row in table.rows}
    base_oracle = _pairs(results, "held_in")[("base", "oracle")]
    oracle_vs_base = by_row["oracle"][0]
    assert oracle_vs_base.value == Interval(0.4, -base_oracle["ci_high"], -base_oracle["ci_low"])
    assert oracle_vs_base.text.startswith("+0.400 [+0.") and oracle_vs_base.text.endswith("p=<0.001 *")
    assert by_row["base"][1].text.startswith("-0.400 [-0.") and by_row["base"][1].text.endswith(" *")
    assert by_row["oracle"][2].text.startswith("+0.010 [") and not by_row["oracle"][2].text.endswith("*")
    assert [by_row[n][i].text for i, n in enumerate(["base", "oracle", "ties"])] == ["—", "—", "—"]
    assert "Holm-adjusted over 3 pairs" in table.title


def test_conclusions_claim_only_what_is_significant(results):
    held_in = results["conclusions"]["held_in"]
    assert held_in[0] == (
        "no strategy is best on held-in: oracle has the highest mean (0.800), "
        "but the data cannot tell it apart from ties"
    )
    assert held_in[1].startswith("oracle beats base on held-in (+0.400 [+0.") and held_in[1].endswith("p=<0.001 Holm)")
    assert held_in[2].startswith("ties beats base on held-in (+0.390 [")
    assert held_in[3].startswith("the data cannot tell oracle and ties apart on held-in (+0.010 [")
    assert len(held_in) == 4
    held_out = results["conclusions"]["held_out"]
    assert held_out[0].startswith("no strategy is best on held-out: base has the highest mean (0.400)")
    assert held_out[1].startswith(
        "the data cannot tell base and ties apart on held-out (+0.000 [+0.00, +0.00], p=1.000"
    )


def test_a_pair_sharing_fewer_tasks_says_so():
    raw = [
        _raw("base", "base", {"a": _task("held_in", BASE_RIGHT), "b": _task("held_in", BASE_RIGHT)}),
        _raw("partial", "expert", {"a": _task("held_in", BASE_RIGHT)}),  # scored on task a only
    ]
    results = summarise_results(raw, held_in=["a", "b"], held_out=[])
    (pair,) = results["significance"]["groups"]["held_in"]["pairs"]
    assert pair["tasks"] == ["a"] and pair["n"] == N
    row = {r[0].text: r[1:] for r in significance_table(results, "held_in").rows}["partial"]
    assert row[0].text == "+0.000 [+0.00, +0.00] p=1.000 (1/2 tasks)"  # turned round: no "-0.000"


def test_best_is_claimed_when_it_beats_every_other_significantly():
    raw = [
        _raw("base", "base", {"a": _task("held_in", BASE_RIGHT)}),
        _raw("arrow", "router", {"a": _task("held_in", ORACLE_RIGHT)}),
        _raw("soup", "merge", {"a": _task("held_in", BASE_RIGHT | {45})}),
    ]
    results = summarise_results(raw, held_in=["a"], held_out=[])
    lines = results["conclusions"]["held_in"]
    assert lines[0] == "best on held-in: arrow (0.800), significantly above every other strategy"
    assert results["conclusions"]["held_out"] == []  # no held-out tasks: nothing to claim


def test_results_json_and_reports_carry_the_matrix(results, tmp_path):
    write_reports(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    pairs = saved["significance"]["groups"]["held_in"]["pairs"]
    assert saved["significance"]["alpha"] == 0.05 and saved["significance"]["correction"] == "holm"
    first = {(p["a"], p["b"]): p for p in pairs}[("base", "oracle")]
    keys = {"a", "b", "diff", "ci_low", "ci_high", "p", "p_holm", "significant", "n", "tasks", "mcnemar", "per_task"}
    assert keys <= set(first) and first["mcnemar"]["b_only"] == 40
    assert saved["conclusions"] == results["conclusions"]
    report = (tmp_path / "report.md").read_text()
    assert "## Which differences are real" in report and "| oracle | +0.400 [+0." in report
    assert f"- {results['conclusions']['held_in'][1]}" in report
    page = (tmp_path / "report.html").read_text()
    assert 'id="significance-0"' in page and 'id="significance-1"' in page
    assert "<li>no strategy is best on held-in: oracle has the highest mean (0.800)" in page


# ---- where strategies disagree --------------------------------------------------------------------------------


def _rows(answers: list[str], target: str = "x") -> list[dict]:
    return [
        {"index": i, "id": i, "input": f"question {i}", "target": target, "chosen": a, "correct": a == target}
        for i, a in enumerate(answers)
    ]


def _predicted(name: str, answers: list[str] | None) -> dict:
    scores = {i for i, a in enumerate(answers or []) if a == "x"}
    rows = _rows(answers) if answers is not None else None
    task = {"group": "held_in", "scores": [float(i in scores) for i in range(4)], "n": 4, "seconds": 1.0}
    return _raw(name, "merge", {"a": {**task, **({"predictions": rows} if rows is not None else {})}})


def test_disagreements_list_mixed_right_and_wrong_first(tmp_path):
    # example 0: all agree; 1: answers differ, all wrong; 2 and 3: some right, some wrong
    raw = [_predicted("p", ["x", "y", "x", "y"]), _predicted("q", ["x", "w", "y", "x"])]
    results = summarise_results(raw, held_in=["a"], held_out=[])
    found = results["disagreements"]["examples"]["a"]
    assert [e["index"] for e in found] == [2, 3, 1]
    assert found[0] == {
        "index": 2,
        "input": "question 2",
        "target": "x",
        "answers": {"p": "x", "q": "y"},
        "correct": {"p": True, "q": False},
    }
    table = disagreement_table(results, "a")
    assert [c.header for c in table.columns] == ["#", "question", "target", "p", "q"]
    assert [c.text for c in table.rows[0]] == ["2", "question 2", "x", "x ✓", "y ✗"]
    write_reports(results, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "Where strategies disagree" in page and "a: examples where strategies answer differently" in page
    assert "predictions" not in json.dumps(results["rows"])  # rows stay small: predictions are files


def test_missing_predictions_are_said(tmp_path):
    raw = [_predicted("p", ["x", "y", "x", "y"]), _predicted("cached", None)]
    results = summarise_results(raw, held_in=["a"], held_out=[])
    assert results["disagreements"] == {"examples": {}, "missing": ["cached on a"]}
    write_reports(results, tmp_path)
    assert "No predictions for cached on a" in (tmp_path / "report.md").read_text()


def test_predictions_written_per_strategy_and_task(tmp_path):
    raw = [_predicted("ties/0.2", ["x", "y", "x", "y"]), _predicted("cached", None)]
    stale = tmp_path / "predictions" / "cached" / "a.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}\n")
    written = write_predictions(raw, tmp_path)
    assert written == [tmp_path / "predictions" / "ties_0.2" / "a.jsonl"]
    lines = written[0].read_text().splitlines()
    assert [json.loads(line) for line in lines] == _rows(["x", "y", "x", "y"])
    assert not stale.exists()


# ---- through a real compare on the tiny model -----------------------------------------------------------------


def test_compare_keeps_predictions_and_pair_statistics(tmp_path, tiny_base):
    import yaml

    from helpers import parity_rows, write_task
    from moerge.recipes.compare import load_compare_config, run_compare

    parity = write_task(tmp_path / "parity.jsonl", parity_rows(40))
    unseen = write_task(
        tmp_path / "unseen.jsonl",
        [{"input": f"Is {i} odd?", "target": "yes" if i % 2 else "no", "choices": ["yes", "no"]} for i in range(30)],
    )
    recipe = {
        "base": str(tiny_base),
        "library": str(tmp_path / "lib"),
        "hyperparameters": {"rank": 2, "steps": 3, "batch_size": 4, "max_length": 48, "lr": 0.01, "eval_split": None},
        "held_in": [{"task": parity, "name": "parity"}],
        "held_out": [{"task": unseen, "name": "unseen"}],
        "eval_limit": 6,
        "strategies": ["base", "oracle"],
    }
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(recipe))
    config = load_compare_config(tmp_path / "compare.yaml")
    out = tmp_path / "out"
    results = run_compare(config, out, progress=False)

    files = sorted(p.relative_to(out).as_posix() for p in (out / "predictions").rglob("*.jsonl"))
    assert files == [
        "predictions/base/parity.jsonl",
        "predictions/base/unseen.jsonl",
        "predictions/oracle/parity.jsonl",
    ]
    for path in files:
        strategy, task = path.split("/")[1], path.split("/")[2].removesuffix(".jsonl")
        rows = _read_jsonl(out / path)
        scores = [r["score"] for r in rows]
        row = next(r for r in results["rows"] if r["strategy"] == strategy)
        assert len(rows) == 6 and sum(scores) / 6 == pytest.approx(row["per_task"][task]["mean"])
    saved = json.loads((out / "results.json").read_text())
    pair = saved["significance"]["groups"]["held_in"]["pairs"][0]
    assert (pair["a"], pair["b"], pair["tasks"], pair["n"]) == ("base", "oracle", ["parity"], 6)
    assert saved["significance"]["groups"]["held_out"]["pairs"] == []  # only the base was scored held-out
    assert "predictions" not in json.dumps(saved["rows"])

    # A rerun from the cache keeps the predictions; a score cached before predictions were kept is said so.
    (out / "predictions").rename(tmp_path / "first")
    run_compare(config, out, progress=False)
    assert _read_jsonl(out / "predictions/oracle/parity.jsonl") == _read_jsonl(tmp_path / "first/oracle/parity.jsonl")
    old = next((out / "cache").glob("oracle.task_parity.*.json"))
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "predictions"}))
    rerun = run_compare(config, out, progress=False)
    assert rerun["disagreements"]["missing"] == ["oracle on parity"]
    assert "No predictions for oracle on parity" in (out / "report.html").read_text()
    assert not (out / "predictions/oracle/parity.jsonl").exists()  # none left from the earlier run


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
