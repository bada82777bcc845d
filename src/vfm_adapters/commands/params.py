"""``vfm-adapters params``: trainable parameters per method and backbone, beside the paper's.

Every number is computed: each backbone is built once on the meta device (no memory, no
weights), each method is injected with its defaults, counted, and removed again. "Full"
is every backbone parameter (all trainable), "Freeze" the backbone with nothing
trainable. The paper's values are the Rein paper's ("Stronger, Fewer, & Superior", Tables 2 and 5).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so that building the CLI stays light
    from torch import nn

NAME = "params"
HELP = "print the trainable-parameter table of every method on DINOv2-L, EVA02-L, CLIP-L, SAM-H, ResNet-50/101 and ConvNeXt-L"

BACKBONES = {
    "DINOv2-L": "vit_large_patch14_dinov2",
    "EVA02-L": "eva02_large_patch14_224",
    "CLIP-L": "vit_large_patch14_clip_224",
    "SAM-H": "samvit_huge_patch16",
    # The Rein paper's Table 6 CNNs (hierarchical hosts: one Rein per stage). The deep-stem
    # resnet50c/101c are the closest timm models to mmseg's ResNetV1c.
    "ResNet-50": "resnet50c",
    "ResNet-101": "resnet101c",
    "ConvNeXt-L": "convnext_large",
}
# CNNs have no position embedding or patch size: building them at 512 px changes nothing.
HIERARCHICAL = {"ResNet-50", "ResNet-101", "ConvNeXt-L"}
HIERARCHICAL_REASONS = {
    "LoRA": "convolutional blocks have no q/k/v projections",
    "AdaptFormer": "the blocks have no token MLP",
    "VPT": "hierarchical stages have no single token sequence",
}
METHODS = ["Full", "Full@512", "Freeze", "LoRA", "AdaptFormer", "VPT", "Rein"]
# "Full" counts the backbone as timm builds it by default (DINOv2-L at 518 px, EVA02-L and
# CLIP-L at 224 px, SAM-H at 1024 px with its neck); "Full@512" builds it at the paper's
# training resolution, 512 x 512, with a 16-pixel patch embedding (the Rein authors
# resampled DINOv2's patch embedding from 14 to 16), which changes the position embedding
# and patch-embedding sizes and so the count.
PAPER_SETTING = {"img_size": 512, "patch_size": 16}

# The Rein paper's "Trainable Params*" column (Tables 2 and 5), as printed there.
PAPER = {
    ("DINOv2-L", "Full"): "304.20M",
    ("DINOv2-L", "Freeze"): "0.00M",
    ("DINOv2-L", "LoRA"): "0.79M",
    ("DINOv2-L", "AdaptFormer"): "3.17M",
    ("DINOv2-L", "VPT"): "3.69M",
    ("DINOv2-L", "Rein"): "2.99M",
    ("EVA02-L", "Full"): "304.24M",
    ("EVA02-L", "Freeze"): "0.00M",
    ("EVA02-L", "LoRA"): "1.18M",
    ("EVA02-L", "AdaptFormer"): "3.17M",
    ("EVA02-L", "VPT"): "3.69M",
    ("EVA02-L", "Rein"): "2.99M",
    ("CLIP-L", "Full"): "304.15M",
    ("CLIP-L", "Freeze"): "0.00M",
    ("CLIP-L", "Rein"): "2.99M",
    ("SAM-H", "Full"): "632.18M",
    ("SAM-H", "Freeze"): "0.00M",
    ("SAM-H", "Rein"): "4.51M",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument(
        "--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES), help="backbones to count (default: all)"
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to count (default: all)")


def count_rows(backbones: list[str] | None = None, methods: list[str] | None = None) -> list[dict]:
    """Computes the table: one dict per (backbone, method).

    Each row has ``backbone``, ``timm_model``, ``method``, ``trainable`` (an int, or
    ``None`` where the method does not apply), ``formatted``, ``paper`` (or ``None``),
    ``matches_paper`` (or ``None``) and ``note``.

    Example:
        >>> rows = count_rows(["DINOv2-L"], ["LoRA", "Rein"])
        >>> [(r["method"], r["trainable"], r["paper"], r["matches_paper"]) for r in rows]
        [('LoRA', 786432, '0.79M', True), ('Rein', 2990081, '2.99M', True)]
    """
    import timm
    import torch

    rows = []
    for backbone in backbones or list(BACKBONES):
        name = BACKBONES[backbone]
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        for method in methods or METHODS:
            count, note = _count_method(model, name, backbone, method)
            rows.append(_row(backbone, name, method, count, note))
    return rows


def _count_method(model: nn.Module, name: str, backbone: str, method: str) -> tuple[int | None, str]:
    """One method's trainable parameters on ``model`` (left as it was found) and the row's note."""
    import timm
    import torch

    if method == "Full":
        return sum(p.numel() for p in model.parameters()), ""
    if method == "Full@512" and backbone in HIERARCHICAL:
        return sum(p.numel() for p in model.parameters()), "a CNN's count does not depend on the input size"
    if method == "Full@512":
        with torch.device("meta"):
            at_512 = timm.create_model(name, pretrained=False, num_classes=0, **PAPER_SETTING)
        return sum(p.numel() for p in at_512.parameters()), "timm model at 512x512, patch 16"
    if method == "Freeze":
        return _frozen_count(model), ""
    return _injected_count(model, backbone, method)


def _frozen_count(model: nn.Module) -> int:
    """The trainable parameters of the frozen backbone; each parameter's ``requires_grad`` is restored."""
    import vfm_adapters as va

    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    count = va.trainable_parameters(model)
    for param, flag in flags:
        param.requires_grad_(flag)
    return count


def _injected_count(model: nn.Module, backbone: str, method: str) -> tuple[int | None, str]:
    """An adapter method's count with its defaults (removed again), or None and why it does not apply."""
    import vfm_adapters as va
    from vfm_adapters.hosts import UnsupportedModelError

    injectors = {
        "LoRA": va.inject_lora,
        "AdaptFormer": va.inject_adaptformer,
        "VPT": va.inject_vpt,
        "Rein": va.inject_rein,
    }
    try:
        injectors[method](model)
    except UnsupportedModelError as error:
        host = va.describe_host(model)
        if host.hierarchical:
            return None, "not applicable: " + HIERARCHICAL_REASONS.get(method, str(error)[:100])
        layout = host.layout
        return None, f"not applicable: {layout} host has no token sequence" if layout != "BNC" else str(error)[:120]
    count = va.trainable_parameters(model)
    va.remove_adapters(model)
    note = "one Rein per stage; Table 6 prints no count" if method == "Rein" and backbone in HIERARCHICAL else ""
    return count, note


def _row(backbone: str, name: str, method: str, count: int | None, note: str) -> dict:
    """One table row: the count, formatted, beside the paper's value (Full@512 is compared with Full)."""
    import vfm_adapters as va

    paper = PAPER.get((backbone, "Full" if method == "Full@512" else method))
    formatted = va.format_count(count) if count is not None else "n/a"
    return {
        "backbone": backbone,
        "timm_model": name,
        "method": method,
        "trainable": count,
        "formatted": formatted,
        "paper": paper,
        "matches_paper": None if paper is None or count is None else formatted == paper,
        "note": note,
    }


def format_table(rows: list[dict]) -> str:
    """The rows as a text table."""
    lines = [f"{'backbone':<10} {'method':<12} {'trainable':>13} {'computed':>9} {'paper':>9}  match"]
    for row in rows:
        exact = f"{row['trainable']:,}" if row["trainable"] is not None else "-"
        match = {True: "yes", False: "DIFFERS", None: "-"}[row["matches_paper"]]
        line = f"{row['backbone']:<10} {row['method']:<12} {exact:>13} {row['formatted']:>9} {row['paper'] or '-':>9}  {match}"
        if row["note"]:
            line += f"  ({row['note']})"
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = count_rows(args.backbones, args.methods)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0
