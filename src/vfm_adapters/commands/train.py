"""``vfm-adapters train CONFIG [KEY=VALUE ...]``: train adapters + a segmentation head from a YAML/JSON config.

Works unchanged under ``accelerate launch`` (multi-GPU data parallel, bf16 on CUDA).
See :mod:`vfm_adapters.seg.training` for the config reference and
``examples/configs/`` for complete configs.
"""

from __future__ import annotations

import argparse

from ._common import add_config_arguments, add_threads_argument, refuse_plain_torchrun, torch_threads

NAME = "train"
HELP = "train adapters + a segmentation head from a YAML/JSON config (accelerate launch-able, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "optim.lr=2e-4 train.batch_size=8 model.method_options.rein.token_length=50")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt if present")
    parser.add_argument("--overwrite", action="store_true",
                        help="start from scratch even if OUTPUT_DIR already holds a run (its files are replaced)")
    parser.add_argument("--output-dir", default=None, help="override train.output_dir")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (after checkpointing) once this many steps ran; continue later with --resume")
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default=None,
                        help="override train.mixed_precision (the paper configs train in fp32: 'no')")
    parser.add_argument("--bf16", action="store_const", const="bf16", dest="mixed_precision",
                        help="shorthand for --mixed-precision bf16 (faster, not the authors' fp32)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from vfm_adapters.configs import resolve_config
    from vfm_adapters.seg.config import load_config
    from vfm_adapters.seg.training import train

    refuse_plain_torchrun()
    flags = {"train.output_dir": args.output_dir, "train.iterations": args.iterations,
             "train.mixed_precision": getattr(args, "mixed_precision", None)}
    # the flags are overrides too (after the KEY=VALUE ones): the whole config is checked before anything runs
    config = load_config(resolve_config(args.config),
                         [*args.overrides, *((k, v) for k, v in flags.items() if v is not None)])
    with torch_threads(args.threads):
        outcome = train(config, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                        progress=not args.no_progress, evaluate_at_end=not args.no_eval)
    state = "finished" if outcome["finished"] else f"stopped at step {outcome['step']} (continue with --resume)"
    print(f"{state}; outputs in {outcome['output_dir']}")
    return 0
