"""Optimiser parameter groups and learning-rate schedules of segmentation training.

The groups split the trainable parameters by decay / no decay and by host / the rest
(adapters, neck, head): the host's own weights train at ``lr * backbone_lr_mult``. The
schedules are ``torch.optim.lr_scheduler.LambdaLR`` over the factor functions here and
in :mod:`vfm_adapters.optim` (the authors' warm-up + restarting poly of the ACDC recipe).

Why ``LambdaLR`` and not ``PolynomialLR`` / ``LinearLR`` + ``SequentialLR``: the closed
form gives the learning rate of step ``t`` exactly (``PolynomialLR.step`` updates the rate
multiplicatively from the previous one, so its rounding drifts over 40k steps), the
``poly`` schedule multiplies warm-up and poly factors (``SequentialLR`` chains them
instead), and a resumed run restores the schedule from the step count alone.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..methods.base import adapter_parameters
from .config import ConfigError

__all__ = ["build_scheduler", "no_weight_decay", "parameter_groups", "poly_factor"]

NO_DECAY_RULES = ("authors", "small_tensors")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """True for tokens, scales, embeddings, prompts, norm weights and biases (any 0/1-d tensor).

    Matches name components, so ``tokens_a``, ``cls_token``, ``pos_embed``, ``scale``,
    ``prompts`` and anything under a ``norm`` module are exempt, but Rein's
    ``token_to_feature.weight`` (a Linear layer) is decayed.

    Example:
        >>> no_weight_decay("features.model.vfm_adapters.rein.tokens_a", torch.zeros(2, 3, 4))
        True
        >>> no_weight_decay("features.model.vfm_adapters.rein.token_to_feature.weight", torch.zeros(4, 4))
        False
    """
    if param.ndim <= 1:
        return True
    parts = name.lower().split(".")
    last = parts[-1]
    if last.startswith("token") or last.endswith(("_token", "_tokens")) or "scale" in last or last == "gamma":
        return True
    # Mask2Former's query tables and level embeddings are embeddings too (no decay in mmseg's recipe).
    return any("pos_embed" in part or "position_embedding" in part or "prompt" in part or "norm" in part
               or part.startswith("queries_") or part == "level_embed"
               or part in ("embeddings_position", "register_tokens") for part in parts)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1,
                     no_decay: str = "authors", host: nn.Module | None = None) -> list[dict]:
    """AdamW groups: decay / no decay, and the host's own weights at ``lr * backbone_lr_mult``.

    ``no_decay="authors"`` (default, ``optim.no_decay``) exempts exactly what the Rein
    authors' configs exempt (:func:`vfm_adapters.optim.no_decay_names`: norms, query
    and level embeddings, Rein's tokens and scale; biases decay); ``"small_tensors"``
    is the rule of :func:`no_weight_decay` (also biases, positions, prompts). ``host``
    (default ``model.backbone``) is the module whose non-adapter parameters are the host's.
    Each group also lists its parameter ``names``; drop them before giving the groups to
    an optimiser.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> [(g["names"], g["weight_decay"]) for g in parameter_groups(net, 1e-3, 0.05, host=nn.Identity())]
        [(['1.weight', '1.bias'], 0.0), (['0.weight', '0.bias'], 0.05)]
    """
    from ..optim import no_decay_names

    if no_decay not in NO_DECAY_RULES:
        raise ConfigError(f"optim.no_decay must be one of {list(NO_DECAY_RULES)}, got {no_decay!r}")
    host = model.backbone if host is None else host
    exempt = no_decay_names(model) if no_decay == "authors" else None
    adapter_ids = {id(p) for p in adapter_parameters(host)}
    host_ids = {id(p) for p in host.parameters()} - adapter_ids
    groups: dict[tuple[bool, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_host = id(param) in host_ids
        decay = not (exempt[name] if exempt is not None else no_weight_decay(name, param))
        group = groups.setdefault((in_host, decay), {
            "params": [], "names": [], "lr": lr * (backbone_lr_mult if in_host else 1.0),
            "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ConfigError("nothing to train: no adapter, head or backbone parameter requires gradients")
    return [groups[key] for key in sorted(groups)]


def poly_factor(step: int, total: int, power: float = 0.9, warmup_iters: int = 0, warmup_ratio: float = 1e-6,
                min_ratio: float = 0.0) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then ``(1 - step/total) ** power``.

    Example:
        >>> poly_factor(0, 100), round(poly_factor(50, 100, power=1.0), 3), poly_factor(100, 100)
        (1.0, 0.5, 0.0)
    """
    factor = (1.0 - min(step, total) / total) ** power * (1 - min_ratio) + min_ratio
    if warmup_iters > 0 and step < warmup_iters:
        factor *= warmup_ratio + (1 - warmup_ratio) * step / warmup_iters
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, optim_config: Mapping[str, Any],
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``optim.schedule`` of a training config over ``total`` iterations.

    ``poly``: warm-up times one poly curve; ``warmup_poly_restart``: the authors' ACDC
    schedule (LinearLR, then a PolyLR restarting after the warm-up).

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = build_scheduler(opt, {"lr": 1.0, "min_lr": 0.0, "schedule": "poly", "poly_power": 1.0,
        ...                               "warmup_iters": 0, "warmup_ratio": 1e-6}, total=4)
        >>> [round(sched.lr_lambdas[0](step), 2) for step in (0, 1, 2, 4)]
        [1.0, 0.75, 0.5, 0.0]
    """
    oc = optim_config
    min_ratio = oc["min_lr"] / oc["lr"] if oc["lr"] > 0 else 0.0
    if oc["schedule"] == "warmup_poly_restart":
        from ..optim import warmup_poly_restart_factor

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_poly_restart_factor(
            step, total, int(oc["warmup_iters"]), oc["warmup_ratio"], oc["poly_power"], min_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_factor(
        step, total, oc["poly_power"], oc["warmup_iters"], oc["warmup_ratio"], min_ratio))
