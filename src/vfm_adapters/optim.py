"""Optimiser parameter groups and learning-rate schedules of the Rein authors' recipes.

Weight decay: the authors' mmengine configs exempt from decay exactly the parameters
whose (mmseg) name contains ``norm``, ``query_embed``, ``level_embed``,
``learnable_tokens`` or ``reins.scale``, plus every parameter of a normalisation
layer (``norm_decay_mult=0``). Everything else decays, biases included. This library
names some of those tensors differently, so :func:`authors_name` first translates a
name to theirs (Rein's ``tokens_a`` is their ``learnable_tokens_a``, the Mask2Former
pixel decoder's ``level_embed`` is their ``level_encoding``, which DOES decay, ...).

Schedules: :func:`warmup_poly_restart_factor` is their Cityscapes -> ACDC schedule
(``LinearLR`` over the warm-up, then ``PolyLR`` restarting from the base lr).
"""

from __future__ import annotations

from torch import nn

#: Substrings of the authors' parameter names that get no weight decay
#: (``configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py``, ``paramwise_cfg.custom_keys``).
AUTHORS_NO_DECAY_KEYS: tuple[str, ...] = ("norm", "query_embed", "level_embed", "learnable_tokens", "reins.scale")

#: (this library's name part, the authors' name part), applied in order by :func:`authors_name`.
AUTHOR_NAME_ALIASES: tuple[tuple[str, str], ...] = (
    ("vfm_adapters.rein.tokens_", "reins.learnable_tokens_"),
    ("vfm_adapters.rein.scale", "reins.scale"),
    ("vfm_adapters.rein.", "reins."),
    ("pixel_decoder.level_embed", "pixel_decoder.level_encoding"),  # mmdet's MSDeformAttnPixelDecoder
    ("transformer.level_embed", "level_embed"),  # Mask2FormerHead.level_embed
    ("transformer.queries_embedder", "query_embed"),  # Mask2FormerHead.query_embed (positional)
    ("transformer.queries_features", "query_feat"),  # Mask2FormerHead.query_feat (decays)
)

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def authors_name(name: str) -> str:
    """The Rein authors' name for this library's parameter ``name`` (for their decay rule).

    Example:
        >>> authors_name("features.model.vfm_adapters.rein.tokens_a")
        'features.model.reins.learnable_tokens_a'
        >>> authors_name("head.pixel_decoder.level_embed")
        'head.pixel_decoder.level_encoding'
    """
    for ours, theirs in AUTHOR_NAME_ALIASES:
        if ours in name:
            return name.replace(ours, theirs)
    return name


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    owners: dict[str, nn.Module] = {}
    for prefix, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners.setdefault(f"{prefix}.{param_name}" if prefix else param_name, module)
    return owners


def no_decay_names(model: nn.Module, trainable_only: bool = True) -> dict[str, bool]:
    """``{parameter name: True if it gets no weight decay}`` under the authors' rule.

    Example:
        >>> layer = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> no_decay_names(layer)
        {'0.weight': False, '0.bias': False, '1.weight': True, '1.bias': True}
    """
    owners = _owners(model)
    out: dict[str, bool] = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        theirs = authors_name(name)
        out[name] = isinstance(owners.get(name), _NORM_TYPES) or any(key in theirs for key in AUTHORS_NO_DECAY_KEYS)
    return out


def param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """AdamW parameter groups with the Rein authors' weight-decay rule, trainable parameters only.

    No decay for norms (layers and names containing ``norm``), the Mask2Former query
    and level embeddings and Rein's tokens and scale; everything else, biases included,
    decays by ``weight_decay``. Empty groups are left out.

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32,
        ...                      num_heads=2, img_size=28), token_length=4)
        >>> optimizer = torch.optim.AdamW(va.param_groups(vit, weight_decay=0.05), lr=1e-4)
        >>> [(g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
        [(0.05, 8), (0.0, 3)]
    """
    exempt = no_decay_names(model)
    params = dict(model.named_parameters())
    decay = [params[name] for name, skip in exempt.items() if not skip]
    no_decay = [params[name] for name, skip in exempt.items() if skip]
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def warmup_poly_restart_factor(step: int, total: int, warmup_iters: int, warmup_ratio: float = 1e-6,
                               power: float = 0.9, min_ratio: float = 0.0) -> float:
    """The authors' Cityscapes -> ACDC schedule as a factor of the base lr.

    mmengine's ``LinearLR(start_factor=warmup_ratio, end=warmup_iters)`` followed by
    ``PolyLR(begin=warmup_iters, end=total, power)``: a linear ramp from
    ``warmup_ratio`` to 1 over the warm-up, then poly decay that RESTARTS from the base
    lr over ``[warmup_iters, total]`` (unlike a warm-up multiplied into one poly curve).

    Example:
        >>> [round(warmup_poly_restart_factor(s, 40000, 10000), 4) for s in (0, 5000, 10000, 25000, 40000)]
        [0.0, 0.5, 1.0, 0.5359, 0.0]
    """
    if not 0 <= warmup_iters < total:
        raise ValueError(f"warm-up iterations must lie in [0, {total}), got {warmup_iters}")
    if step < warmup_iters:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    progress = min(step - warmup_iters, total - warmup_iters) / (total - warmup_iters)
    return (1.0 - progress) ** power * (1.0 - min_ratio) + min_ratio


def resolve_grad_accum(batch_size: int, grad_accum: int, total_batch_size: int | None, processes: int) -> int:
    """Accumulation steps so that ``batch_size x steps x processes == total_batch_size``.

    With ``total_batch_size`` unset, ``grad_accum`` is kept. The authors' ACDC row is
    batch 8 (2 per GPU x 4 GPUs): on one GPU that is 4 accumulation steps of 2.

    Example:
        >>> resolve_grad_accum(2, 1, 8, 1), resolve_grad_accum(2, 1, 8, 4), resolve_grad_accum(4, 2, None, 1)
        (4, 1, 2)
    """
    if total_batch_size is None:
        return int(grad_accum)
    per_step = int(batch_size) * int(processes)
    if int(total_batch_size) < 1 or int(total_batch_size) % per_step:
        raise ValueError(f"train.total_batch_size {total_batch_size} is not a positive multiple of batch_size "
                         f"{batch_size} x {processes} process(es); choose a batch_size that divides it")
    return int(total_batch_size) // per_step
