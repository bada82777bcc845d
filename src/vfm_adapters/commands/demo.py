"""``vfm-adapters demo``: train adapters on a synthetic source domain and test under domain shift.

Runs on a laptop CPU in a few minutes and needs no download. The steps:

1. Generate procedural street scenes (:mod:`vfm_adapters.seg.synthetic`): a training
   set in the source domain and an evaluation set shown in every domain (source, fog,
   night, noise, colour shift).
2. Stand-in for foundation-model pre-training (no pretrained weights can be downloaded
   here): a small timm ViT, randomly initialised, is trained in full for
   ``--pretrain-steps`` steps on *separately generated* scenes with strong photometric
   augmentation, then frozen. ``--pretrain-steps 0`` keeps the random backbone.
3. For every method in ``--methods`` (``freeze`` = frozen backbone + head only, ``full``
   = fine-tune everything, or any registered adapter method such as ``rein``, ``lora``,
   ``vpt``, ``adaptformer``): inject it into a copy of the frozen backbone and train the
   adapter plus a fresh FPN head on the clean source domain.
4. Evaluate every method on every domain and print a mIoU table; save each method's
   adapters + head under ``--output`` and a PNG of predictions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import add_threads_argument, torch_threads

if TYPE_CHECKING:  # torch is imported where it is used, so that building the CLI stays light
    from torch import nn

NAME = "demo"
HELP = "train adapters on a synthetic source domain on CPU and report mIoU under domain shift (fog, night, noise, colour)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo_output", help="output directory (default: %(default)s)")
    parser.add_argument("--methods", default="freeze,rein",
                        help="comma-separated methods to compare: freeze, full, or any registered adapter method "
                             "(e.g. rein,lora,vpt,adaptformer); default: %(default)s")
    parser.add_argument("--steps", type=int, default=150, help="training steps per method (default: %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="steps of the backbone pre-training stand-in; 0 keeps a random backbone (default: %(default)s)")
    parser.add_argument("--unfreeze-backbone", action="store_true",
                        help="also train the backbone (lr x0.1) together with each method's adapter")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of adapters and head (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="scene size in pixels (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=256, help="source training scenes (default: %(default)s)")
    parser.add_argument("--eval-images", type=int, default=32, help="evaluation scenes per domain (default: %(default)s)")
    parser.add_argument("--embed-dim", type=int, default=128, help="ViT width (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=6, help="ViT blocks (default: %(default)s)")
    parser.add_argument("--patch-size", type=int, default=8, help="ViT patch size (default: %(default)s)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long smoke run (tiny model, few steps and images) for tests")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier demo's results in --output (moved aside first, removed at the end)")


def _apply_tiny(args: argparse.Namespace) -> None:
    args.steps, args.pretrain_steps, args.batch_size = min(args.steps, 4), min(args.pretrain_steps, 2), 2
    args.image_size, args.train_images, args.eval_images = 32, 8, 2
    args.embed_dim, args.depth, args.patch_size = 32, 4, 8


def demo_config(args: argparse.Namespace, methods: list[str], output: Path, pretrain: bool,
                backbone_checkpoint: str | None) -> dict:
    """The training config of one demo run (pre-training or one method)."""
    from vfm_adapters.seg.synthetic import SYNTHETIC_CLASSES

    size = args.image_size
    return {
        "model": {
            "backbone": "vit_tiny_patch16_224",
            "backbone_kwargs": {"img_size": size, "patch_size": args.patch_size, "embed_dim": args.embed_dim,
                                "depth": args.depth, "num_heads": max(1, args.embed_dim // 32), "dynamic_img_size": True},
            "backbone_checkpoint": backbone_checkpoint,
            "methods": methods,
            "train_backbone": pretrain or args.unfreeze_backbone,
            "method_options": {"rein": {"token_length": 32, "rank": 8}, "vpt": {"num_tokens": 8},
                               "lora": {"rank": 4}, "adaptformer": {"bottleneck": 16}},
            "head": "linear" if pretrain else "fpn",
            "head_channels": 32,
            "num_classes": len(SYNTHETIC_CLASSES),
        },
        "data": {
            # the pre-training stand-in sees other scenes (seed 2) under strong photometric changes
            "train": [{"type": "synthetic", "domain": "source", "num_images": args.train_images, "size": size,
                       "seed": args.seed * 1000 + (2 if pretrain else 1)}],
            "val": [],
            "crop_size": [size, size], "scale": [size, size], "ratio_range": [0.75, 1.5], "cat_max_ratio": 0.75,
            "flip": 0.5, "photometric": pretrain, "num_workers": 0,
        },
        "optim": {"lr": args.lr, "weight_decay": 0.05, "backbone_lr_mult": 1.0 if pretrain else 0.1,
                  "warmup_iters": 0},
        "train": {"iterations": args.pretrain_steps if pretrain else args.steps, "batch_size": args.batch_size,
                  "seed": args.seed, "log_interval": 10, "checkpoint_interval": 0, "output_dir": str(output)},
        "eval": {"mode": "whole"},
    }


def demo_entries(output: Path) -> list[str]:
    """What an earlier demo wrote into ``output``: its summary files and the run folders
    (``pretrained_backbone``, one per method) that hold a run. Other files are not the demo's."""
    from vfm_adapters.methods.base import available_methods
    from vfm_adapters.seg.run_dir import existing_entries

    folders = ["pretrained_backbone", "freeze", "full", *available_methods()]
    runs = [name for name in folders if (output / name).is_dir() and existing_entries(output / name)]
    return ["results.json", "results.md", "predictions.png", *runs]


def _method_options_for(name: str, options: dict) -> dict:
    """Keeps only the demo's option overrides that the registered method's config accepts."""
    from vfm_adapters.methods.base import get_method

    if name in ("freeze", "full"):
        return {}
    fields = set(getattr(get_method(name).config_class, "__dataclass_fields__", {}))
    return {k: v for k, v in options.get(name, {}).items() if k in fields}


def save_prediction_grid(path: Path, models: dict, domains: dict, count: int = 2) -> None:
    """A PNG: rows = domains x images, columns = input, ground truth, each method's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    from vfm_adapters.seg.inference import predict

    palette = np.array([[70, 130, 180], [128, 64, 128], [70, 70, 70], [107, 142, 35], [0, 0, 142],
                        [220, 20, 60], [153, 153, 153]]) / 255.0
    cmap = ListedColormap(palette)
    rows = [(name, i) for name in domains for i in range(min(count, len(domains[name])))]
    columns = 2 + len(models)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.6 * len(rows)), squeeze=False)
    for r, (domain, index) in enumerate(rows):
        sample = domains[domain][index]
        label = sample["label"].numpy().astype(float)
        label[label == 255] = np.nan
        panels = [("input", sample["image"].permute(1, 2, 0).numpy(), None), ("ground truth", label, cmap)]
        for method, model in models.items():
            prediction = predict(model, sample["image"], 7, mode="whole", mean=model.mean, std=model.std)
            panels.append((method, prediction.numpy(), cmap))
        for c, (title, data, colours) in enumerate(panels):
            axis = axes[r][c]
            axis.imshow(data, cmap=colours, vmin=0, vmax=6, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(title, fontsize=8)
            if c == 0:
                axis.set_ylabel(domain, fontsize=8)
    from matplotlib.patches import Patch

    from vfm_adapters.seg.synthetic import SYNTHETIC_CLASSES

    legend = [Patch(facecolor=palette[i], edgecolor="black", linewidth=0.3, label=name)
              for i, name in enumerate(SYNTHETIC_CLASSES[: len(palette)])]
    figure.tight_layout(rect=(0, 0.4 / figure.get_figheight(), 1, 1))  # 0.4 inch at the bottom for the legend
    figure.legend(handles=legend, loc="lower center", ncol=min(len(legend), 7), fontsize=7, frameon=False)
    from vfm_adapters._io import write_atomically

    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))  # never half-written
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    if args.tiny:
        _apply_tiny(args)
    with torch_threads(args.threads) as threads:
        return _run(args, threads)


def _run(args: argparse.Namespace, threads: int) -> int:
    from vfm_adapters.seg.run_dir import discard_replaced, prepare_run_dir
    from vfm_adapters.seg.synthetic import DOMAINS, SyntheticScenes

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not _methods_are_known(methods):
        return 2
    output = Path(args.output)
    # the same guard as train/adapt: an earlier demo's runs are never silently replaced
    replaced = prepare_run_dir(output, demo_entries(output), overwrite=args.overwrite, resumable=False)
    started = time.perf_counter()
    progress = not args.no_progress

    _print_setup(args, threads)
    checkpoint = _pretrain_backbone(args, output, progress)
    eval_sets = {domain: SyntheticScenes(domain, args.eval_images, args.image_size, seed=args.seed * 1000 + 7)
                 for domain in DOMAINS}
    results, models, notes = {}, {}, {}
    for index, method in enumerate(methods, start=2):
        models[method], notes[method] = _train_method(args, index, method, output, checkpoint, progress)
        results[method] = _evaluate_in_every_domain(models[method], eval_sets)
    _report(args, output, methods, results, models, notes, eval_sets, started)
    discard_replaced(replaced)
    return 0


def _methods_are_known(methods: list[str]) -> bool:
    """False (after saying which are available) if any requested method is neither registered nor freeze/full."""
    from vfm_adapters.methods.base import available_methods

    known = set(available_methods()) | {"freeze", "full"}
    unknown = [m for m in methods if m not in known]
    if unknown:
        print(f"unknown method(s) {unknown}; available here: {sorted(known)}")
        return False
    return True


def _print_setup(args: argparse.Namespace, threads: int) -> None:
    """The demo's opening lines: the scenes, the domains and the host."""
    import torch

    from vfm_adapters.seg.synthetic import DOMAINS, SYNTHETIC_CLASSES

    print(f"vfm-adapters demo: synthetic street scenes ({', '.join(SYNTHETIC_CLASSES)}), {args.image_size}x{args.image_size}")
    print(f"  source-domain training set: {args.train_images} scenes; evaluation: {args.eval_images} other scenes "
          f"shown in each domain ({', '.join(DOMAINS)})")
    print(f"  host: timm ViT, {args.depth} blocks, width {args.embed_dim}, patch {args.patch_size}, random init "
          f"(no pretrained weights are downloaded); {threads} CPU thread(s)" + (" + CUDA" if torch.cuda.is_available() else ""))


def _pretrain_backbone(args: argparse.Namespace, output: Path, progress: bool) -> str | None:
    """Step 1, the pre-training stand-in; returns the trained backbone's file (None with ``--pretrain-steps 0``)."""
    from vfm_adapters.seg.training import train

    if args.pretrain_steps <= 0:
        print("[1] no pre-training (--pretrain-steps 0): every method starts from a frozen *random* backbone")
        return None
    print(f"[1] backbone pre-training stand-in: {args.pretrain_steps} steps of full training on separately generated "
          "scenes with strong photometric augmentation (a real run would load DINOv2/EVA02 weights instead)")
    # The demo regenerates everything under its output directory on each run.
    pre = train(demo_config(args, ["full"], output / "pretrained_backbone", True, None), overwrite=True, progress=progress,
                log=lambda line: None, evaluate_at_end=False)
    checkpoint = str(Path(pre["output_dir"]) / "backbone.safetensors")
    (Path(pre["output_dir"]) / "checkpoint.pt").unlink(missing_ok=True)
    print(f"    done in {pre['seconds']:.0f}s (final loss {pre['loss']:.3f}); backbone frozen from here on")
    return checkpoint


def _train_method(args: argparse.Namespace, index: int, method: str, output: Path, checkpoint: str | None,
                  progress: bool) -> tuple[nn.Module, str]:
    """Step ``index``: trains one method on the source domain; returns the model (eval mode) and its note."""
    from vfm_adapters.report import trainable_parameters
    from vfm_adapters.seg.training import train

    config = demo_config(args, [method], output / method, False, checkpoint)
    config["model"]["method_options"] = {method: _method_options_for(method, config["model"]["method_options"])}
    what = {"freeze": "frozen backbone, train the head only", "full": "train backbone (lr x0.1) and head"}.get(
        method, f"inject {method}, train {method} + head" + (" + backbone (lr x0.1)" if args.unfreeze_backbone else ""))
    print(f"[{index}] {method}: {what}; {args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr:g}, poly schedule")
    outcome = train(config, overwrite=True, progress=progress, log=lambda line: None, evaluate_at_end=False)
    model = outcome["model"].eval()
    (output / method / "checkpoint.pt").unlink(missing_ok=True)  # the run finished: keep adapters + head only
    trainable = trainable_parameters(model)
    note = f"{trainable:,} trainable parameters (adapter + head), {outcome['seconds']:.0f}s"
    print(f"    {note}; final loss {outcome['loss']:.3f}; saved to {output / method}")
    return model, note


def _evaluate_in_every_domain(model: nn.Module, eval_sets: dict) -> dict:
    """The model's evaluation (mIoU and per-class IoU) on each domain's scenes."""
    from vfm_adapters.seg.inference import evaluate
    from vfm_adapters.seg.synthetic import SYNTHETIC_CLASSES

    return {domain: evaluate(model, data, len(SYNTHETIC_CLASSES), SYNTHETIC_CLASSES, mode="whole",
                             mean=model.mean, std=model.std) for domain, data in eval_sets.items()}


def _report(args: argparse.Namespace, output: Path, methods: list[str], results: dict, models: dict, notes: dict,
            eval_sets: dict, started: float) -> None:
    """Prints the mIoU table and writes ``predictions.png``, ``results.json`` and ``results.md``."""
    from vfm_adapters._io import write_atomically
    from vfm_adapters.seg.metrics import results_table
    from vfm_adapters.seg.synthetic import DOMAINS, SYNTHETIC_CLASSES

    targets = [d for d in DOMAINS if d != "source"]
    table = results_table(results, average=targets).replace("| avg |", "| avg (targets) |")
    chance = 100.0 / len(SYNTHETIC_CLASSES) / 2
    print()
    print(f"mIoU (%) on {args.eval_images} held-out scenes per domain; trained on 'source' only "
          f"(uniform random guessing gives about {chance:.0f}):")
    print(table)
    grid = output / "predictions.png"
    save_prediction_grid(grid, models, {d: eval_sets[d] for d in DOMAINS})
    summary = {"results": results, "methods": methods, "arguments": vars(args), "notes": notes,
               "seconds": time.perf_counter() - started}
    write_atomically(output / "results.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2, default=str) + "\n"))
    write_atomically(output / "results.md", lambda p: Path(p).write_text(table + "\n"))
    print(f"\npredictions: {grid}; adapters + heads: {output}/<method>/; table: {output / 'results.md'}")
    print(f"total time {time.perf_counter() - started:.0f}s")
