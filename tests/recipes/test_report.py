"""The report: tables and plots from results, and the HTML page checked in headless Chromium."""

import os
import re
import shutil
import subprocess

import pytest

from moerge.recipes.report import results_table, summarise_results, write_reports


def _raw(name, kind, scores_in, scores_out, probe_loss, routing=None):
    tasks = {
        "a": {"group": "held_in", "scores": scores_in, "n": len(scores_in), "seconds": 1.0},
        "z": {"group": "held_out", "scores": scores_out, "n": len(scores_out), "seconds": 1.0},
    }
    return {
        "strategy": {"name": name, "kind": kind},
        "tasks": tasks,
        "forgetting": [{"probe_loss": probe_loss, "task_scores": [1.0, 0.0]}],
        "routing": routing,
    }


ROUTING = {
    "report": {
        "a": {"experts": ["a", "b"], "overall": [0.9, 0.1], "top1": [1.0, 0.0]},
        "z": {"experts": ["a", "b"], "overall": [0.4, 0.6], "top1": [0.0, 1.0]},
    },
    "accuracy": 1.0,
}


@pytest.fixture
def results():
    raw = [
        _raw("base", "base", [0.0, 1.0], [0.0, 0.0], 2.0),
        _raw("arrow", "router", [1.0, 1.0], [1.0, 0.0], 2.5, ROUTING),
    ]
    return summarise_results(raw, held_in=["a"], held_out=["z"])


def test_summary_means_and_forgetting(results):
    base, arrow = results["rows"]
    assert base["held_in"]["mean"] == 0.5 and arrow["held_in"]["mean"] == 1.0
    assert arrow["held_out"]["mean"] == 0.5
    assert arrow["forgetting_loss"] == pytest.approx(-0.5)  # loss went up: forgetting is negative
    assert arrow["routing_accuracy"] == 1.0
    assert "| arrow | 1.000 [1.00, 1.00] | 0.500" in results_table(results).to_markdown()


def test_reports_written(results, tmp_path):
    write_reports(results, tmp_path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "per_task_bars.png",
        "routing_arrow.png",
        "scatter_held_in_vs_held_out.png",
    ]
    csv_text = (tmp_path / "results.csv").read_text()
    assert csv_text.splitlines()[0].startswith("strategy,kind,held_in") and "arrow,router,1.0" in csv_text
    assert "![routing_arrow](plots/routing_arrow.png)" in (tmp_path / "report.md").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
def test_html_report_loads_offline_in_headless_chromium(results, tmp_path):
    write_reports(results, tmp_path)
    page = (tmp_path / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
        "document.body.dataset.images=imgs.length;"
        "document.body.dataset.loaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
        "document.body.dataset.rows=document.querySelectorAll('#results tbody tr').length;});</script>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
        "--virtual-time-budget=5000",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", f"file://{tmp_path / 'probe.html'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images="3"' in body and 'data-loaded="3"' in body, body
    assert 'data-rows="2"' in body
    assert "held-in acc" in dom and "routing acc" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2400", f"file://{tmp_path / 'report.html'}"],
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page with plots, not a blank one
