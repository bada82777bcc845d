"""The ``vfm-adapters`` command line: one sub-command per module in :mod:`.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from . import __version__, commands


def command_modules() -> dict[str, ModuleType]:
    modules = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        modules[module.NAME] = module
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfm-adapters",
        description="Parameter-efficient fine-tuning of vision foundation models for domain-generalised segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"vfm-adapters {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in command_modules().items():
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vfm-adapters``.

    Example:
        >>> main(["report", "--model", "vit_small_patch14_dinov2", "--depth", "2",
        ...       "--embed-dim", "64", "--method", "rein"])  # doctest: +ELLIPSIS
        part ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
