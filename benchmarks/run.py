"""`make bench`: every benchmark on the packaged SmolLM2-135M-Instruct, side by side with its peer.

Each script prints its own table/JSON; benchmarks/RESULTS.md records measured ratios with the machine
and the command. Pass --only train|merge|route to run one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    from moerge.models import fetch_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["train", "merge", "route"], action="append")
    args = parser.parse_args()
    base = str(fetch_model("smollm2-135m-instruct"))
    commands = {
        "train": [str(HERE / "train_bench.py"), "--base", base],
        "merge": [str(HERE / "merge_bench.py"), "--base", base, "--threads", "1"],
        "route": [str(HERE / "route_bench.py"), "--base", base],
    }
    for name in args.only or list(commands):
        print(f"\n=== {name} ===", flush=True)
        subprocess.run([sys.executable, *commands[name]], check=True)


if __name__ == "__main__":
    main()
