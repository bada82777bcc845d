"""``vfm-adapters plot RUN``: loss and lr curves and per-class IoU per domain, as PNG files."""

from __future__ import annotations

import argparse

NAME = "plot"
HELP = "draw a run's loss/lr curves and per-class IoU per domain to PNG files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by 'train' (log.jsonl, results.json)")
    parser.add_argument("--output", default=None, help="directory for the PNG files (default: the run directory)")


def run(args: argparse.Namespace) -> int:
    from vfm_adapters.plots import plot_run

    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0
