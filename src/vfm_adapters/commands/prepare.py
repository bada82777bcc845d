"""``vfm-adapters prepare mapillary --half``: dataset files prepared for a published protocol."""

from __future__ import annotations

import argparse

NAME = "prepare"
HELP = "prepare dataset files for a protocol (Mapillary halved, as the Rein authors evaluate it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=("mapillary",), help="the dataset to prepare")
    parser.add_argument("--root", required=True, help="the dataset as downloaded (e.g. data/mapillary)")
    parser.add_argument("--output", required=True, help="where the prepared copy goes (e.g. data/mapillary_half)")
    parser.add_argument("--half", action="store_true", required=True,
                        help="store images (bicubic) and labels (nearest) at half width and height")
    parser.add_argument("--splits", nargs="+", default=["validation"], help="splits to prepare (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite files already in --output")


def run(args: argparse.Namespace) -> int:
    from vfm_adapters.seg.prepare import halve_mapillary

    counts = halve_mapillary(args.root, args.output, args.splits, overwrite=args.overwrite)
    print(f"mapillary halved into {args.output}: {counts['written']} written, {counts['kept']} already there")
    return 0
