"""Builds the host, its adapters and the segmentor of a validated config's ``model`` section.

The head name picks the segmentor class from :data:`SEGMENTORS` (light heads of
:data:`~vfm_adapters.seg.heads.HEADS` all use :class:`~vfm_adapters.seg.heads.Segmentor`),
so training, loading and the adaptation recipes never branch on a head's name. A class
registered here implements :class:`~vfm_adapters.seg.model.SegmentationModel` and has
``method_defaults``, ``from_config(backbone, model_config)``,
``from_settings(backbone, settings, **options)`` and
``build_head(name, in_channels, model_config)`` (for a features-only encoder).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._registry import Registry
from ..methods.base import adapter_parameters, get_method, inject
from .config import METHOD_DEFAULTS, PSEUDO_METHODS, ConfigError
from .heads import HEADS, Segmentor

__all__ = ["SEGMENTORS", "build_adapted_backbone", "build_backbone", "build_segmentor", "segmentor_class"]

#: Segmentor class per head name, or ``"module:Class"`` imported on first use (the
#: Mask2Former head needs transformers). Heads in ``HEADS`` without an entry use ``Segmentor``.
SEGMENTORS: Registry[type | str] = Registry(
    "segmentor head", {"mask2former": "vfm_adapters.seg.mask2former:Mask2FormerSegmentor"})


def segmentor_class(head: str) -> type:
    """The segmentor class that builds head ``head``.

    Example:
        >>> segmentor_class("fpn").__name__, segmentor_class("mask2former").__name__
        ('Segmentor', 'Mask2FormerSegmentor')
    """
    entry = SEGMENTORS.get(head)
    if entry is None:
        if head in HEADS:
            return Segmentor
        raise ConfigError(f"model.head: unknown head {head!r}; available: {sorted(set(HEADS) | set(SEGMENTORS))}")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


def build_backbone(model_config: Mapping[str, Any]) -> nn.Module:
    """Creates the timm host and loads ``backbone_checkpoint`` (safetensors or torch) if given.

    Example:
        >>> vit = build_backbone({"backbone": "vit_tiny_patch16_224", "pretrained": False,
        ...                       "backbone_kwargs": {"img_size": 32, "depth": 2}})
        >>> len(vit.blocks), vit.num_classes
        (2, 0)
    """
    import timm

    resample = model_config.get("patch_resample") or "timm"
    if resample == "bicubic":  # the Rein authors' 14 -> 16 conversion (see seg/patch_resample.py)
        from .patch_resample import create_host_bicubic

        backbone = create_host_bicubic(model_config["backbone"], bool(model_config["pretrained"]),
                                       model_config.get("backbone_kwargs") or {})
    elif resample == "timm":
        backbone = timm.create_model(model_config["backbone"], pretrained=bool(model_config["pretrained"]),
                                     num_classes=0, **dict(model_config.get("backbone_kwargs") or {}))
    else:
        raise ConfigError(f"model.patch_resample must be 'bicubic' (the Rein authors') or 'timm' (pseudo-inverse), "
                          f"got {resample!r}")
    if model_config.get("backbone_checkpoint"):
        _load_host_checkpoint(backbone, Path(model_config["backbone_checkpoint"]), model_config["backbone"])
    return backbone


def _load_host_checkpoint(backbone: nn.Module, path: Path, name: str) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ConfigError(f"backbone checkpoint {path} does not fit {name}: "
                          f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")


def build_adapted_backbone(
    model_config: Mapping[str, Any], method_defaults: Mapping[str, Mapping[str, Any]] = METHOD_DEFAULTS
) -> nn.Module:
    """The host with the config's methods injected and ``requires_grad`` set for training.

    ``methods`` may name several registered methods (via ``get_method``); ``"freeze"``
    (or an empty list) injects nothing, ``"full"`` or ``train_backbone`` keeps the host
    trainable. ``method_defaults`` are per-method options that ``method_options`` override.

    Example:
        >>> from vfm_adapters.methods.base import adapter_parameters
        >>> vit = build_adapted_backbone({"backbone": "vit_tiny_patch16_224", "pretrained": False,
        ...     "backbone_kwargs": {"img_size": 32, "depth": 2}, "methods": ["rein"],
        ...     "method_options": {"rein": {"token_length": 4}}})
        >>> trainable = {id(p) for p in vit.parameters() if p.requires_grad}
        >>> trainable == {id(p) for p in adapter_parameters(vit)}  # only the adapters train
        True
    """
    backbone = build_backbone(model_config)
    methods = list(model_config.get("methods") or [])
    for name in methods:
        if name in PSEUDO_METHODS:
            continue
        method = get_method(name)
        accepted = set(getattr(method.config_class, "__dataclass_fields__", {}))
        options = {k: v for k, v in method_defaults.get(name, {}).items() if k in accepted}
        options.update(dict((model_config.get("method_options") or {}).get(name, {})))
        inject(backbone, name, method.config_class(**options), freeze_host=True)
    train_backbone = bool(model_config.get("train_backbone")) or "full" in methods
    adapter_ids = {id(p) for p in adapter_parameters(backbone)}
    for param in backbone.parameters():
        param.requires_grad_(train_backbone or id(param) in adapter_ids)
    return backbone


def build_segmentor(model_config: Mapping[str, Any]) -> nn.Module:
    """Host + adapter methods (any registered, via ``get_method``) + neck + the configured head.

    ``methods`` may name several registered methods; ``"freeze"`` (or an empty list)
    means no adapter: the frozen host with a trained head. With ``train_backbone`` the
    host stays trainable (full fine-tuning). The head's segmentor class
    (:func:`segmentor_class`) supplies its method defaults (Mask2Former: Rein's query link).

    Example:
        >>> from vfm_adapters.seg.config import DEFAULTS
        >>> from vfm_adapters.methods.base import injected_methods
        >>> seg = build_segmentor({**DEFAULTS["model"], "backbone": "vit_tiny_patch16_224",
        ...     "backbone_kwargs": {"img_size": 32, "depth": 2}, "num_classes": 3, "head_channels": 16})
        >>> injected_methods(seg.backbone), seg.mean
        (['rein'], (123.675, 116.28, 103.53))
    """
    from .config import DEFAULTS

    config = {**DEFAULTS["model"], **dict(model_config)}
    cls = segmentor_class(config["head"])
    backbone = build_adapted_backbone(config, cls.method_defaults)
    return cls.from_config(backbone, config)
