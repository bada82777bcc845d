"""Training speed of ``vfm-adapters train synthetic_cpu`` at several torch thread counts.

Each setting trains ``--iterations`` steps (no evaluation) in a fresh process and reads the
steps' wall time from the run's ``log.jsonl`` (``seconds`` of the last entry, which starts
after the model and data are built). Settings are interleaved over ``--rounds`` so that
the machine's background load affects each alike.

    python benchmarks/threads.py --threads 1 2 --iterations 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train_speed(threads: int, iterations: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        run = Path(directory) / "run"
        subprocess.run([sys.executable, "-m", "vfm_adapters", "train", "synthetic_cpu", "--iterations", str(iterations),
                        "--output-dir", str(run), "--no-eval", "--no-progress", "--threads", str(threads)],
                       check=True, stdout=subprocess.DEVNULL)
        entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        return iterations / entries[-1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/threads.json")
    args = parser.parse_args()
    speeds: dict[int, list[float]] = {t: [] for t in args.threads}
    loads = []
    for _ in range(args.rounds):
        for threads in args.threads:
            speeds[threads].append(train_speed(threads, args.iterations))
            loads.append(os.getloadavg()[0])
    for threads, values in speeds.items():
        print(f"--threads {threads}: median {statistics.median(values):.2f} it/s  (runs: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"cpu count {os.cpu_count()}, load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"iterations": args.iterations, "speeds_it_per_s": speeds,
                                             "cpu_count": os.cpu_count(), "load_average": loads}, indent=2) + "\n")


if __name__ == "__main__":
    main()
