"""``vfm-adapters configs``: list the configs shipped with the package (usable by name)."""

from __future__ import annotations

import argparse

NAME = "configs"
HELP = "list the example and paper-row configs shipped with the package (train/adapt take them by name)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--paths", action="store_true", help="also print where each file is")
    parser.add_argument("--show", metavar="NAME", default=None, help="print the config NAME")


def run(args: argparse.Namespace) -> int:
    from vfm_adapters.configs import resolve_config, shipped_configs

    if args.show:
        print(resolve_config(args.show).read_text(), end="")
        return 0
    for name, path in shipped_configs().items():
        summary = _first_comment(path)
        print(f"{name:45s} {path}" if args.paths else f"{name:45s} {summary}")
    return 0


def _first_comment(path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
