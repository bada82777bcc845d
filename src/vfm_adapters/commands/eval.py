"""``vfm-adapters eval RUN_DIR``: mIoU of a trained segmentor on one or more datasets.

``RUN_DIR`` is a directory written by ``vfm-adapters train`` (or ``demo``): it holds
``segmentor.json``, ``head.safetensors`` and ``adapters/``. Datasets are given as
``--data NAME=TYPE:ROOT[:SPLIT]`` (types: cityscapes, gta5, synthia, bdd100k,
mapillary, acdc, folder; or ``synthetic:DOMAIN[:SIZE[:COUNT]]`` for the demo's scenes) or, by default, taken from the run's config
(``data.val``). The protocol defaults to the benchmark's: sliding window 512 / 341.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_threads_argument, torch_threads

NAME = "eval"
HELP = "evaluate a trained segmentor (adapters + head) and print mIoU per dataset and per class"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="directory with segmentor.json, head.safetensors and adapters/")
    parser.add_argument("overrides", nargs="*", metavar="eval.KEY=VALUE",
                        help="overrides of the run's eval section right after RUN_DIR (before the flags), e.g. eval.mode=whole "
                             "eval.crop=768 eval.stride=512 (checked like a config: the stride must not exceed the crop)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=TYPE:ROOT[:SPLIT]",
                        help="a dataset to evaluate on (repeatable), e.g. citys=cityscapes:/data/cityscapes:val; "
                             "default: data.val of the run's config")
    parser.add_argument("--resize", action="append", default=[], metavar="NAME=WxH",
                        help="run inference at this size for dataset NAME (logits resized back), e.g. citys=1024x512")
    parser.add_argument("--mode", choices=("slide", "whole"), default=None, help="inference mode (default: config's)")
    parser.add_argument("--crop", type=_positive_int, default=None, help="sliding-window size (default: config's, 512)")
    parser.add_argument("--stride", type=_positive_int, default=None, help="sliding-window stride (default: config's, 341)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N images of each dataset only")
    parser.add_argument("--per-class", action="store_true", help="also print per-class IoU")
    parser.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    add_threads_argument(parser)
    parser.add_argument("--no-verify", action="store_true",
                        help="load a run without checking its files against manifest.json (runs saved before manifests)")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or a negative value is refused, never replaced by a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_data(spec: str) -> tuple[str, dict]:
    """``NAME=TYPE:ROOT[:SPLIT]`` -> (name, dataset config entry).

    Example:
        >>> parse_data("citys=cityscapes:/data/cs:val")
        ('citys', {'type': 'cityscapes', 'root': '/data/cs', 'split': 'val'})
        >>> parse_data("fog=synthetic:fog:64:32")
        ('fog', {'type': 'synthetic', 'domain': 'fog', 'seed': 7, 'size': 64, 'num_images': 32})
    """
    if "=" in spec:
        name, rest = spec.split("=", 1)
    else:
        name, rest = spec.split(":", 1)[0], spec
    parts = rest.split(":")
    if len(parts) < 2:
        raise ValueError(f"--data {spec!r}: expected NAME=TYPE:ROOT[:SPLIT]")
    if parts[0] == "synthetic":  # synthetic:DOMAIN[:SIZE[:COUNT]] (the demo's scenes, seed 7 as in the demo)
        entry = {"type": "synthetic", "domain": parts[1], "seed": 7}
        for key, value in zip(("size", "num_images"), parts[2:]):
            entry[key] = int(value)
        return name, entry
    entry = {"type": parts[0], "root": parts[1]}
    if len(parts) > 2 and parts[2]:
        entry["split"] = parts[2]
    if parts[0] in ("gta5", "synthia", "folder"):
        entry.pop("split", None)
    return name, entry


def run(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        return _evaluate(args)


def _eval_config(stored: dict, args: argparse.Namespace) -> dict:
    """The run's ``eval`` section + ``eval.KEY=VALUE`` overrides + flags, through the one config loader.

    ``limit`` stays the command's own (``--limit``): a run's training-time limit does not
    shrink a later evaluation.
    """
    from vfm_adapters.seg.config import ConfigError, load_config

    outside = [item for item in args.overrides if not str(item).startswith("eval.")]
    if outside:
        raise ConfigError(f"eval overrides set keys of the eval section only (eval.mode, eval.crop, eval.stride), "
                          f"got {outside}")
    flags = [(f"eval.{key}", getattr(args, key)) for key in ("mode", "crop", "stride") if getattr(args, key) is not None]
    stored = {key: value for key, value in dict(stored).items() if key != "limit"}
    return load_config({"eval": stored}, [*args.overrides, *flags])["eval"]


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from vfm_adapters.seg.datasets import build_dataset
    from vfm_adapters.seg.inference import evaluate
    from vfm_adapters.seg.metrics import results_table
    from vfm_adapters.seg.checkpoints import load_segmentor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config_path = Path(args.run_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    eval_cfg = _eval_config(config.get("eval") or {}, args)  # checked before the model is loaded
    model, info = load_segmentor(args.run_dir, map_location=device, verify=not args.no_verify)
    resize = {}
    for item in args.resize:
        name, size = item.split("=", 1)
        width, height = size.lower().split("x")
        resize[name] = (int(width), int(height))
    if args.data:
        entries = [dict(parse_data(spec)[1], name=parse_data(spec)[0]) for spec in args.data]
    else:
        entries = list(config.get("data", {}).get("val", []))
        if not entries:
            print("no dataset given (--data) and the run's config has no data.val")
            return 2
    num_classes = info["settings"]["num_classes"]
    results = {}
    for i, entry in enumerate(entries):
        name = entry.get("name") or f"{entry['type']}{i}"
        dataset = build_dataset(entry)
        size = resize.get(name) or (tuple(entry["resize"]) if entry.get("resize") else None)
        # keep-ratio test resize (e.g. half-size Mapillary into (1024, 512)), unless --resize overrides it
        scale = tuple(entry["scale"]) if entry.get("scale") and name not in resize else None
        results[name] = evaluate(model, dataset, num_classes, mode=eval_cfg["mode"], crop=eval_cfg["crop"],
                                 stride=eval_cfg["stride"],
                                 resize=size if scale is None else None, mean=model.mean, std=model.std,
                                 limit=args.limit, progress=True, scale=scale)
        print(f"{name}: mIoU {results[name]['mIoU']:.2f} on {results[name]['images']} images")
    print(results_table({Path(args.run_dir).name: results}, per_class=args.per_class))
    if args.output:
        from vfm_adapters._io import write_atomically

        write_atomically(args.output, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    return 0
