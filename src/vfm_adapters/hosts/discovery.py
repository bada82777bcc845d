"""Describing a ViT that no family is registered for, from its structure alone.

A model qualifies when it holds a stack (``nn.ModuleList`` or ``nn.Sequential``) of at
least two blocks of one class, each with a ``LayerNorm`` and a ``Linear``, and a square
patch embedding (a ``Conv2d`` whose stride equals its kernel). Anything else is refused
with the list of supported families.
"""

from __future__ import annotations

from torch import nn

from ._lookup import first_path
from .base import BlockParts, HostSpec, UnsupportedModelError, module_names

_MLP_NAMES = ("mlp", "ffn", "feed_forward", "mlp_block")
_MLP_INPUT_NAMES = ("norm2", "ln_2", "ln2", "layer_norm2", "layernorm_after", "post_attention_layernorm")
_ATTENTION_NAMES = ("attn", "attention", "self_attn", "attention.attention")
_PREFIX_ATTRIBUTES = ("cls_token", "reg_token", "register_tokens", "dist_token")


def _is_transformer_block(block: nn.Module) -> bool:
    kinds = {type(m) for m in block.modules()}
    return nn.LayerNorm in kinds and nn.Linear in kinds


def _block_stack(model: nn.Module) -> nn.Module | None:
    best: nn.Module | None = None
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1 or not _is_transformer_block(children[0]):
            continue
        if best is None or len(children) > len(best):
            best = module
    return best


def _patch_size(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == module.stride and module.kernel_size[0] > 1:
            return int(module.kernel_size[0])
    return None


def _embed_dim(model: nn.Module, block: nn.Module) -> int:
    for attribute in ("embed_dim", "hidden_size", "width"):
        value = getattr(model, attribute, None)
        if isinstance(value, int):
            return value
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "hidden_size", None), int):
        return int(config.hidden_size)
    norm = next(m for m in block.modules() if isinstance(m, nn.LayerNorm))
    return int(norm.normalized_shape[0])


def _num_prefix_tokens(model: nn.Module) -> int:
    value = getattr(model, "num_prefix_tokens", None)
    if isinstance(value, int):
        return value
    total = 0
    for attribute in _PREFIX_ATTRIBUTES:
        tensor = getattr(model, attribute, None)
        if tensor is not None and hasattr(tensor, "shape") and tensor.ndim >= 2:
            total += int(tensor.shape[-2])
    return total


def _part(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return first_path(block, names)


def _projection_parts(block: nn.Module, attention: str | None) -> dict[str, str | None]:
    if attention is None:
        return {}
    prefix = attention + "."
    fused = first_path(block, tuple(prefix + n for n in ("qkv", "in_proj")))
    if fused is not None and isinstance(block.get_submodule(fused), nn.Linear):
        return {"qkv": fused}
    names = {}
    for role, candidates in (("q", ("q_proj", "query", "q")), ("k", ("k_proj", "key", "k")), ("v", ("v_proj", "value", "v"))):
        names[role] = first_path(block, tuple(prefix + n for n in candidates))
    return names if all(names.values()) else {}


def discover_vit(model: nn.Module, supported: list[str]) -> HostSpec:
    """Infers a :class:`HostSpec` for an unregistered ViT-like model.

    Example:
        >>> import torch.nn as nn
        >>> from vfm_adapters.hosts import describe_host
        >>> describe_host(nn.Linear(3, 3))
        Traceback (most recent call last):
        ...
        vfm_adapters.hosts.base.UnsupportedModelError: Linear is not a supported ViT: ...
    """
    stack = _block_stack(model)
    patch = _patch_size(model)
    if stack is None or patch is None:
        missing = "a stack of identical transformer blocks" if stack is None else "a patch embedding (Conv2d)"
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a supported ViT: found no {missing}. "
            f"Supported families: {', '.join(supported)}; or any model with an nn.ModuleList of "
            "identical blocks (each with a LayerNorm and a Linear) and a Conv2d patch embedding."
        )
    block = stack[0]
    attention = _part(block, _ATTENTION_NAMES)
    return HostSpec(
        family=f"discovered.{type(model).__name__}",
        block_names=module_names(model, stack),
        embed_dim=_embed_dim(model, block),
        num_prefix_tokens=_num_prefix_tokens(model),
        patch_size=patch,
        layout="BNC",
        parts=BlockParts(
            mlp=_part(block, _MLP_NAMES),
            mlp_input=_part(block, _MLP_INPUT_NAMES),
            attention=attention,
            **_projection_parts(block, attention),
        ),
        discovered=True,
    )
