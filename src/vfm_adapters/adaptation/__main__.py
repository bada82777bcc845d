"""``python -m vfm_adapters.adaptation CONFIG``: the same as ``vfm-adapters adapt CONFIG``."""

from __future__ import annotations

import argparse

from ..commands.adapt import HELP, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfm_adapters.adaptation", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
