"""Loading a host's pretrained weights into a model that already carries adapters.

Most methods leave the host's parameter names alone, but LoRA wraps projections with
PEFT's layers (``attn.qkv.weight`` becomes ``attn.qkv.base_layer.weight``) and Domino
replaces normalisation layers, so ``model.load_state_dict(host_weights, strict=False)``
would skip those weights without a word. :func:`load_host_state_dict` maps every host
name to the tensor that holds it now, found by removing the adapters from a copy of
the model on the meta device (which allocates nothing).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from .methods.base import AdapterError, injection_state, remove_adapters

__all__ = ["HostLoadResult", "host_state_tensors", "load_host_state_dict"]


class HostLoadResult(NamedTuple):
    """What :func:`load_host_state_dict` did not match (as ``nn.Module.load_state_dict`` reports)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def host_state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The host's state-dict names (as before any injection) and the live tensors behind them.

    Returns:
        ``(tensors, replaced)``: ``tensors`` maps each host name to the tensor the model
        uses now; ``replaced`` lists host names whose tensors the model does not use
        while adapters are injected (Domino keeps the normalisation layers it replaced
        aside, to put them back on removal).

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = va.inject_lora(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                      embed_dim=64, num_heads=2, img_size=56))
        >>> tensors, replaced = host_state_tensors(vit)
        >>> tensors["blocks.0.attn.qkv.weight"] is vit.blocks[0].attn.qkv.base_layer.weight, replaced
        (True, [])
    """
    if injection_state(model) is None:
        return dict(model.state_dict(keep_vars=True)), []
    memo: dict[int, Any] = {}
    live: dict[int, torch.Tensor] = {}  # id of a meta stand-in -> the model's tensor
    for param in model.parameters():
        stand_in = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        memo[id(param)], live[id(stand_in)] = stand_in, param
    for buffer in model.buffers():
        stand_in = torch.empty_like(buffer, device="meta")
        memo[id(buffer)], live[id(stand_in)] = stand_in, buffer
    twin = remove_adapters(copy.deepcopy(model, memo))
    tensors: dict[str, torch.Tensor] = {}
    replaced: list[str] = []
    for name, value in twin.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor) and id(value) in live:
            tensors[name] = live[id(value)]
        else:
            replaced.append(name)
    return tensors, replaced


def load_host_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> HostLoadResult:
    """Loads the host's own weights (names as in the plain host) into ``model``, adapters or not.

    Names are mapped around the adapters (LoRA's ``qkv`` -> ``qkv.base_layer``), so
    host weights load the same before or after injection. All-or-nothing: names,
    shapes and types are checked before anything is copied.

    Args:
        model: A host, with or without injected adapters.
        state_dict: The host's weights, e.g. ``pretrained.state_dict()``.
        strict: Refuse missing or unexpected names (else report them, as
            ``nn.Module.load_state_dict(strict=False)`` does).

    Returns:
        The missing and unexpected names.

    Raises:
        AdapterError: Unmatched names with ``strict=True``, a wrong shape, a weight of a
            layer an adapter replaced (Domino: load those before injecting), or LoRA
            merged into the weights (unmerge first).

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> make = lambda: timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...                                  embed_dim=64, num_heads=2, img_size=56)
        >>> pretrained = make().state_dict()
        >>> vit = va.inject_lora(make())
        >>> va.load_host_state_dict(vit, pretrained)
        HostLoadResult(missing_keys=[], unexpected_keys=[])
        >>> torch.equal(vit.blocks[0].attn.qkv.base_layer.weight, pretrained["blocks.0.attn.qkv.weight"])
        True
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    state = injection_state(model)
    if state is not None and "lora" in state.attachments:
        if any(item.layer.merged for item in state.attachments["lora"].extra["wrapped"]):
            raise AdapterError("LoRA is merged into the host weights; call vfm_adapters.unmerge_lora(model) first")
    tensors, replaced = host_state_tensors(model)
    given = set(state_dict)
    covered = [name for name in replaced if name in given]
    if covered:
        raise AdapterError(
            f"host weights {covered[:8]} belong to layers an adapter replaced (Domino replaces normalisation "
            "layers and keeps the originals aside): load the host's weights before injecting"
        )
    missing = sorted(set(tensors) - given)
    unexpected = sorted(given - set(tensors) - set(replaced))
    if strict and (missing or unexpected):
        raise AdapterError(
            f"host weights do not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} (strict=False reports them instead)"
        )
    problems = []
    for name in sorted(given & set(tensors)):
        value, target = state_dict[name], tensors[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is a {type(value).__name__}, not a tensor")
        elif value.shape != target.shape:
            problems.append(f"{name}: given {tuple(value.shape)}, model {tuple(target.shape)}")
        elif value.dtype.is_floating_point != target.dtype.is_floating_point:
            problems.append(f"{name}: given {value.dtype}, model {target.dtype}")
    if problems:
        raise AdapterError("host weights do not fit the model: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for name in given & set(tensors):
            tensors[name].copy_(state_dict[name])
    return HostLoadResult(missing, unexpected)
