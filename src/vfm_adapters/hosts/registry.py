"""The registry of host families, and the one entry point methods use: :func:`describe_host`."""

from __future__ import annotations

import dataclasses
import sys

from torch import nn

from .._registry import duplicate_name_error
from .base import HostFamily, HostSpec, UnsupportedModelError

_FAMILIES: list[HostFamily] = []


def register_host(family: HostFamily, *, replace: bool = False) -> HostFamily:
    """Adds a model family; families registered later are tried first.

    A family name that is already registered is refused (saved checkpoints record the
    family name); ``replace=True`` drops the old family and tries the new one first.

    Raises:
        DuplicateNameError: ``family.name`` is taken and ``replace`` is False.

    Example:
        >>> from vfm_adapters.hosts import HostFamily, register_host, supported_families
        >>> fam = HostFamily("toy", matches=lambda m: False, describe=lambda m: None)
        >>> _ = register_host(fam); "toy" in supported_families()
        True
        >>> register_host(fam)
        Traceback (most recent call last):
        ...
        vfm_adapters._registry.DuplicateNameError: host family 'toy' is already registered (HostFamily); pass replace=True to replace it
        >>> unregister_host("toy")
    """
    existing = next((item for item in _FAMILIES if item.name == family.name), None)
    if existing is not None:
        if not replace:
            raise duplicate_name_error("host family", family.name, existing)
        unregister_host(family.name)
    _FAMILIES.insert(0, family)
    return family


def unregister_host(name: str) -> None:
    _FAMILIES[:] = [family for family in _FAMILIES if family.name != name]


def supported_families() -> list[str]:
    return [family.name for family in _FAMILIES]


def describe_host(model: nn.Module) -> HostSpec:
    """Describes ``model``: a registered family if one matches, else a discovered ViT.

    Raises:
        UnsupportedModelError: the model is neither a registered family nor a stack of
            identical transformer blocks; the message lists what is supported.

    Example:
        >>> import timm
        >>> from vfm_adapters.hosts import describe_host
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> spec = describe_host(vit)
        >>> spec.family, spec.depth, spec.embed_dim, spec.num_prefix_tokens
        ('timm.VisionTransformer', 2, 64, 1)
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module, got {type(model).__name__}; supported: "
            + ", ".join(supported_families())
        )
    _refuse_wrappers(model)
    for family in _FAMILIES:
        if family.matches(model):
            return family.describe(model)
    inner = _task_model_body(model)
    if inner is not None:
        prefix, body = inner
        for family in _FAMILIES:
            if family.matches(body):
                return _prefixed(family.describe(body), prefix)
    from .discovery import discover_vit

    return discover_vit(model, supported_families())


def _task_model_body(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(attribute, base model)`` of a transformers task model such as ``Dinov2ForImageClassification``."""
    if "transformers" not in sys.modules:
        return None
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and body is not model:
        return prefix, body
    return None


def _prefixed(spec: HostSpec, prefix: str) -> HostSpec:
    """The spec of a sub-model ``prefix``, with block names qualified from the outer model."""
    rename = lambda names: [f"{prefix}.{name}" for name in names]  # noqa: E731
    stages = None
    if spec.stages is not None:
        stages = tuple(dataclasses.replace(s, block_names=tuple(rename(s.block_names))) for s in spec.stages)
    return dataclasses.replace(spec, block_names=rename(spec.block_names), stages=stages)


def _refuse_wrappers(model: nn.Module) -> None:
    """Wrappers around a backbone are refused with the object to pass instead."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, getattr(peft, "PeftModel", ())):
        raise UnsupportedModelError(
            "got a peft PeftModel; vfm_adapters attaches to the backbone itself: pass "
            "peft_model.get_base_model() (its PEFT layers stay trainable; see freeze_host/trainable), "
            "or merge it first with peft_model.merge_and_unload()"
        )
    features = sys.modules.get("timm.models._features")
    if features is not None:
        getter = getattr(features, "FeatureGetterNet", None)
        if getter is not None and isinstance(model, getter):
            raise UnsupportedModelError(
                "got a timm FeatureGetterNet (timm.create_model(..., features_only=True, feature_cls='getter')); "
                "pass the network it wraps, net.model, and take features with "
                "vfm_adapters.seg.features.BackboneFeatures"
            )
        wrappers = tuple(getattr(features, n) for n in ("FeatureListNet", "FeatureDictNet", "FeatureHookNet") if hasattr(features, n))
        if wrappers and isinstance(model, wrappers):
            raise UnsupportedModelError(
                f"got a timm {type(model).__name__} (timm.create_model(..., features_only=True)), which re-parents the "
                "network's layers; create the model without features_only and take features with "
                "vfm_adapters.seg.features.BackboneFeatures"
            )
