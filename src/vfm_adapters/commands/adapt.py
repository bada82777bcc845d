"""``vfm-adapters adapt CONFIG [KEY=VALUE ...]``: run a DACS, source-only or self-training config (``vfm-adapters configs``)."""

from __future__ import annotations

import argparse

from ._common import add_config_arguments, add_threads_argument, refuse_plain_torchrun, torch_threads

NAME = "adapt"
HELP = "run a domain-adaptation recipe (DACS, DAFormer options, or CLOUDS-style self-training) from a YAML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "optim.lr=6e-5 dacs.ema_alpha=0.999 train.output_dir=runs/dacs")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")
    parser.add_argument("--resume", action="store_true", help="continue from train.output_dir/checkpoint.pt")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) after this many steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from vfm_adapters.adaptation.recipes import load_adaptation_config, train_adaptation
    from vfm_adapters.configs import resolve_config

    refuse_plain_torchrun()
    flags = [("train.iterations", args.iterations)] if args.iterations is not None else []
    # one loader for file + overrides + flags: the whole config is checked before anything runs
    config = load_adaptation_config(resolve_config(args.config), [*args.overrides, *flags])
    with torch_threads(args.threads):
        train_adaptation(config, device=args.device,
                         overwrite=args.overwrite, resume=args.resume, stop_after=args.stop_after,
                         progress=not args.no_progress)
    return 0
