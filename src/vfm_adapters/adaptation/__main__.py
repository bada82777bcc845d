"""``python -m vfm_adapters.adaptation CONFIG [--iterations N]``: run a DACS or self-training config."""

from __future__ import annotations

import argparse

NAME = "adapt"
HELP = "run a domain-adaptation recipe (DACS, DAFormer options, or CLOUDS-style self-training) from a YAML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML/JSON config (see examples/configs/adaptation/)")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")


def run(args: argparse.Namespace) -> int:
    from .recipes import train_adaptation

    train_adaptation(args.config, iterations=args.iterations, device=args.device, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfm_adapters.adaptation", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
