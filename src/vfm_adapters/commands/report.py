"""``vfm-adapters report``: inject a method into a timm model and print the parameter report."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "inject a method into a timm model built on the meta device and print its parameter report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_large_patch14_dinov2", help="timm model name (default: %(default)s)")
    parser.add_argument("--method", default="rein", help="adapter method (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    parser.add_argument("--embed-dim", type=int, default=None, help="override the width")


def run(args: argparse.Namespace) -> int:
    import timm
    import torch

    import vfm_adapters as va
    from vfm_adapters.methods.base import get_method, inject

    overrides = {}
    if args.depth is not None:
        overrides["depth"] = args.depth
    if args.embed_dim is not None:
        overrides.update(embed_dim=args.embed_dim, num_heads=max(1, args.embed_dim // 64))
    with torch.device("meta"):
        model = timm.create_model(args.model, pretrained=False, **overrides)
    method = get_method(args.method)
    inject(model, args.method, method.config_class())
    print(va.parameter_report(model))
    return 0
