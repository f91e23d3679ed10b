"""`make bench`: every benchmark on the packaged SmolLM2-135M-Instruct, side by side with its peer.

Each script prints its own table/JSON; benchmarks/RESULTS.md records measured ratios with the machine
and the command. Pass --only train|merge|route|recipes|serve|precision|routers to run some. `routers` compares every
router on the experts `make demo` trained (runs/demo/library), reusing the demo's cached scores, so it
runs only when asked for and after the demo.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT = ["train", "merge", "route", "recipes", "serve", "precision"]
RECIPES_TASK = "gym:leg_counting?min_animals=1&max_animals=2&max_instances=3&size=300"


def routers_command() -> list[str]:
    """`moerge compare benchmarks/routers.yaml` in runs/routers, seeded with the demo's cache."""
    demo, out = ROOT / "runs" / "demo", ROOT / "runs" / "routers"
    if not (demo / "library").is_dir():
        sys.exit("routers: run `make demo` first (it trains the experts into runs/demo/library)")
    for folder in ("cache", "routers"):
        if (demo / folder).is_dir():
            shutil.copytree(demo / folder, out / folder, dirs_exist_ok=True)
    return ["-c", "from moerge.cli.main import run; run()", "compare", str(HERE / "routers.yaml"), "--out", str(out)]


def main() -> None:
    from moerge.models import fetch_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=[*DEFAULT, "routers"], action="append")
    args = parser.parse_args()
    base = str(fetch_model("smollm2-135m-instruct"))
    commands = {
        "train": [str(HERE / "train_bench.py"), "--base", base],
        "merge": [str(HERE / "merge_bench.py"), "--base", base, "--threads", "1"],
        "route": [str(HERE / "route_bench.py"), "--base", base],
        "serve": [str(HERE / "serve_bench.py"), "--base", base, "--threads", "1"],
        "precision": [str(HERE / "precision_bench.py"), "--base", base, "--steps", "6"],
        "recipes": [
            str(HERE / "recipes_bench.py"),
            "--task",
            RECIPES_TASK,
            "--steps",
            "24",
            "--test",
            "48",
            "--pool-size",
            "192",
        ],
    }
    for name in args.only or DEFAULT:
        if name == "routers":
            commands[name] = routers_command()
        print(f"\n=== {name} ===", flush=True)
        subprocess.run([sys.executable, *commands[name]], check=True)


if __name__ == "__main__":
    main()
