"""Counting parameters, and a readable per-module report of what trains."""

from __future__ import annotations

from torch import nn

from .methods.base import get_method, injection_state


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (works on the meta device too).

    Example:
        >>> import torch.nn as nn
        >>> trainable_parameters(nn.Linear(4, 2))
        10
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def format_count(count: int) -> str:
    """Formats a parameter count the way the papers do.

    Example:
        >>> format_count(2_990_081), format_count(0)
        ('2.99M', '0.00M')
    """
    return f"{count / 1e6:.2f}M"


def parameter_report(model: nn.Module) -> str:
    """A table of parameters per injected method and for the host, trainable and total.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56))
        >>> print(va.parameter_report(vit).splitlines()[0])
        part                            trainable          total
    """
    state = injection_state(model)
    rows: list[tuple[str, int, int]] = []
    seen: set[int] = set()
    if state is not None:
        for name, attachment in state.attachments.items():
            params = get_method(name).parameters(model, attachment)
            seen.update(id(p) for p in params)
            rows.append(
                (f"{name} (adapter)", sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
            )
    host = [p for p in model.parameters() if id(p) not in seen]
    rows.append(
        (f"host {type(model).__name__}", sum(p.numel() for p in host if p.requires_grad), sum(p.numel() for p in host))
    )
    total = sum(r[2] for r in rows)
    trainable = sum(r[1] for r in rows)
    lines = [f"{'part':<28} {'trainable':>12} {'total':>14}"]
    lines += [f"{part:<28} {tr:>12,} {tot:>14,}" for part, tr, tot in rows]
    share = 100.0 * trainable / total if total else 0.0
    lines.append(f"{'all':<28} {trainable:>12,} {total:>14,}   ({share:.2f}% trainable, {format_count(trainable)})")
    return "\n".join(lines)


def segmentor_parameter_counts(segmentor: nn.Module) -> dict[str, int]:
    """Trainable parameters per component of a segmentor (``backbone``, ``neck``, ``head``).

    ``adapters`` are the injected methods' parameters, ``backbone`` the host's own
    trainable weights (non-zero only for full fine-tuning), ``total`` all of them; the
    paper's "trainable parameters" column is ``adapters + backbone`` (head excluded).

    Example:
        >>> import timm, vfm_adapters as va
        >>> from vfm_adapters.seg import Segmentor
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32,
        ...                      num_heads=2, img_size=28), link_queries=False)
        >>> counts = segmentor_parameter_counts(Segmentor(vit, 3, neck="interpolate", head_channels=8))
        >>> counts["adapters"] == va.trainable_parameters(vit), counts["neck"], counts["backbone"]
        (True, 0, 0)
    """
    from .methods.base import adapter_parameters

    def trainable(params) -> int:
        return sum(p.numel() for p in params if p.requires_grad)

    backbone = segmentor.backbone
    adapter_ids = {id(p) for p in adapter_parameters(backbone)}
    adapters = trainable(p for p in backbone.parameters() if id(p) in adapter_ids)
    host = trainable(p for p in backbone.parameters() if id(p) not in adapter_ids)
    neck, head = trainable(segmentor.neck.parameters()), trainable(segmentor.head.parameters())
    return {"adapters": adapters, "backbone": host, "neck": neck, "head": head,
            "total": trainable(segmentor.parameters())}
