"""Describing a ViT that no family is registered for, from its structure alone.

A model qualifies when it holds a stack (``nn.ModuleList`` or ``nn.Sequential``) of at
least two blocks of one class, each with a ``LayerNorm`` and a ``Linear``, and a square
patch embedding (a ``Conv2d`` whose stride equals its kernel). Anything else is refused
with the list of supported families, and so is a hierarchical model: blocks that change
width, or blocks of the stack's class outside it (the other stages of a Swin-like
backbone), would be described wrongly as one plain ViT.
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
    modules = list(block.modules())
    return any(isinstance(m, nn.LayerNorm) for m in modules) and any(isinstance(m, nn.Linear) for m in modules)


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


def _prefix_tokens_of(module: nn.Module) -> int:
    total = 0
    for attribute in _PREFIX_ATTRIBUTES:
        tensor = getattr(module, attribute, None)
        if tensor is not None and hasattr(tensor, "shape") and tensor.ndim >= 2:
            total += int(tensor.shape[-2])
    return total


def _num_prefix_tokens(model: nn.Module) -> int:
    value = getattr(model, "num_prefix_tokens", None)
    if isinstance(value, int):
        return value
    # The tokens may live in a sub-module (transformers keeps them in ``embeddings``).
    for module in model.modules():
        count = _prefix_tokens_of(module)
        if count:
            return count
    return 0


def _block_width(block: nn.Module) -> int:
    norms = [m for m in block.modules() if isinstance(m, nn.LayerNorm)]
    return int(norms[-1].normalized_shape[-1])


def _hierarchy_problem(model: nn.Module, stack: nn.Module) -> str | None:
    """Why ``stack`` is not the whole of a plain ViT, or ``None`` if it is."""
    widths = [_block_width(block) for block in stack]
    if len(set(widths)) > 1:
        return f"its blocks change width ({', '.join(map(str, widths))})"
    block_class = type(stack[0])
    inside = {id(m) for m in stack.modules()}
    outside = [name for name, m in model.named_modules() if type(m) is block_class and id(m) not in inside]
    if outside:
        return (
            f"{len(outside)} more {block_class.__name__} block(s) sit outside its longest block stack "
            f"(e.g. {outside[0]!r}): it is a multi-stage (hierarchical) backbone"
        )
    nested = [name for name, m in stack.named_modules() if m is not stack and isinstance(m, (nn.ModuleList, nn.Sequential))
              and len(m) > 1 and len({type(c) for c in m}) == 1 and _is_transformer_block(m[0])]
    if nested:
        return f"its block stack holds stacks of blocks ({nested[0]!r}): it is a multi-stage (hierarchical) backbone"
    return None


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
    if stack is not None:
        problem = _hierarchy_problem(model, stack)
        if problem is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a supported ViT: {problem}. A plain ViT is described by one width; "
                f"hierarchical backbones need a registered stage-wise family. Supported families: {', '.join(supported)}"
            )
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
