"""How long ``vfm-adapters --help`` and each sub-command's ``--help`` take (wall clock).

Each command runs in a fresh process ``--repeats`` times; the median and the range are
printed and saved as JSON. A bare ``python -c pass`` is measured too: the interpreter's
own start-up is part of every number and no change to this package can remove it.

    python benchmarks/cli_latency.py --repeats 7 --output benchmarks/results/cli_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ["configs", "demo", "eval", "train", "adapt", "params", "report", "plot"]


def time_command(argv: list[str], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default="benchmarks/results/cli_latency.json")
    args = parser.parse_args()
    python = sys.executable
    cases = {"python -c pass": [python, "-c", "pass"], "vfm-adapters --help": [python, "-m", "vfm_adapters", "--help"]}
    cases.update({f"vfm-adapters {name} --help": [python, "-m", "vfm_adapters", name, "--help"] for name in COMMANDS})
    results = {}
    for label, argv in cases.items():
        seconds = time_command(argv, args.repeats)
        results[label] = {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}
        print(f"{label:35s} median {results[label]['median_s']:.3f} s  (min {min(seconds):.3f}, max {max(seconds):.3f})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"load average (1 min) at the end: {load}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"repeats": args.repeats, "load_average": load, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
