"""``python -m vfm_adapters.adaptation CONFIG [--iterations N] [--resume] [--stop-after N] [--no-progress]``:
run a DACS, source-only or self-training config."""

from __future__ import annotations

import argparse

NAME = "adapt"
HELP = "run a domain-adaptation recipe (DACS, DAFormer options, or CLOUDS-style self-training) from a YAML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML/JSON config (see examples/configs/adaptation/)")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")
    parser.add_argument("--resume", action="store_true", help="continue from train.output_dir/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this many steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from .recipes import train_adaptation

    train_adaptation(args.config, iterations=args.iterations, device=args.device, overwrite=args.overwrite,
                     resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfm_adapters.adaptation", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
