"""``vfm-adapters report``: inject a method into a timm model and print the parameter report."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = ("print the parameter report of a method injected into a timm model, or (--config) of a training "
        "config's whole segmentor, built on the meta device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_large_patch14_dinov2", help="timm model name (default: %(default)s)")
    parser.add_argument("--method", default="rein", help="adapter method (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    parser.add_argument("--embed-dim", type=int, default=None, help="override the width")
    parser.add_argument("--config", default=None,
                        help="a training config (e.g. examples/configs/paper/gtav_dinov2_l_rein.yaml): report its "
                             "segmentor's trainable parameters per component (adapters, backbone, neck, head)")
    parser.add_argument("--json", action="store_true", help="with --config: print the counts as JSON")


def _report_config(path: str, as_json: bool) -> int:
    import json

    import torch

    from vfm_adapters.report import format_count, segmentor_parameter_counts
    from vfm_adapters.seg.build import build_segmentor
    from vfm_adapters.seg.config import load_config

    config = load_config(path)
    model_config = dict(config["model"], pretrained=False, backbone_checkpoint=None)  # meta: no weights read
    with torch.device("meta"):
        segmentor = build_segmentor(model_config)
    counts = segmentor_parameter_counts(segmentor)
    if as_json:
        print(json.dumps({"config": str(path), "methods": list(model_config.get("methods") or []), **counts}))
        return 0
    print(f"{path}: {model_config['backbone']} + {', '.join(model_config.get('methods') or ['freeze'])}, "
          f"neck {model_config.get('neck')}, head {model_config.get('head')}")
    for key in ("adapters", "backbone", "neck", "head", "total"):
        print(f"{key:<10} {counts[key]:>14,}  ({format_count(counts[key])})")
    print(f"paper column (adapters + backbone): {format_count(counts['adapters'] + counts['backbone'])}")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "config", None):
        return _report_config(args.config, bool(args.json))
    if getattr(args, "json", False):
        raise SystemExit("--json needs --config")
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
