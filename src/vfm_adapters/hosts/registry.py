"""The registry of host families, and the one entry point methods use: :func:`describe_host`."""

from __future__ import annotations

from torch import nn

from .base import HostFamily, HostSpec, UnsupportedModelError

_FAMILIES: list[HostFamily] = []


def register_host(family: HostFamily) -> HostFamily:
    """Adds a model family; families registered later are tried first.

    Example:
        >>> from vfm_adapters.hosts import HostFamily, register_host, supported_families
        >>> fam = HostFamily("toy", matches=lambda m: False, describe=lambda m: None)
        >>> _ = register_host(fam); "toy" in supported_families()
        True
        >>> unregister_host("toy")
    """
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
    for family in _FAMILIES:
        if family.matches(model):
            return family.describe(model)
    from .discovery import discover_vit

    return discover_vit(model, supported_families())
