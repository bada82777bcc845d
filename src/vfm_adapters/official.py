"""The Rein authors' released checkpoints: their Rein tokens in, and back out.

The authors ("Stronger, Fewer, & Superior", CVPR 2024) release mmseg checkpoints whose
``state_dict`` holds the Rein parameters under ``backbone.reins.`` and the Mask2Former
head under ``decode_head.`` (the frozen DINOv2 backbone is a separate, converted file).
Their Rein differs from :class:`~vfm_adapters.methods.rein.Rein` only in names and in
one layout: ``merge`` takes the three per-token statistics over the layers
INTERLEAVED per channel (input column ``3*j + k`` holds statistic ``k`` of channel
``j``, ``k`` = max, mean, last), where ours takes them as blocks
``[max | mean | last]`` (column ``k*q + j``). Importing permutes those columns;
exporting permutes them back.

Their DINOv2 strips exactly one prefix token (CLS) before refining; here the host's
own prefix tokens (CLS, and registers where the host has them) pass through unchanged,
so the authors' single prefix token maps onto the host's prefix tokens.

=====================================  =================================
authors' name (``backbone.reins.``)    ours (``vfm_adapters.rein.``)
=====================================  =================================
``learnable_tokens_a`` (L, m, r)       ``tokens_a``
``learnable_tokens_b`` (L, r, c)       ``tokens_b``
``learnable_tokens`` (L, m, c)         ``tokens`` (full-rank variant)
``scale`` ()                           ``scale`` (absent: ``zero_init_delta``)
``mlp_token2feat.{weight,bias}``       ``token_to_feature.{weight,bias}``
``mlp_delta_f.{weight,bias}``          ``delta_feature.{weight,bias}``
``transform.{weight,bias}``            ``transform.{weight,bias}``
``merge.weight`` (q, 3q) interleaved   ``merge.weight`` (q, 3q) blocks
``merge.bias``                         ``merge.bias``
=====================================  =================================
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .hosts import describe_host
from .methods.base import AdapterError, inject, injection_state, remove_adapters
from .methods.rein import ReinConfig

__all__ = [
    "OFFICIAL_REIN_PREFIX",
    "OfficialCheckpointError",
    "export_official_rein",
    "import_official_rein",
    "load_official_dinov2",
    "official_dinov2_state_dict",
    "official_rein_config",
    "read_official_checkpoint",
]

#: Where the authors' checkpoints keep Rein's parameters.
OFFICIAL_REIN_PREFIX = "backbone.reins."

#: The authors' Rein names -> ours (the merge weight also needs its columns permuted).
_REIN_NAMES = {
    "learnable_tokens_a": "tokens_a",
    "learnable_tokens_b": "tokens_b",
    "learnable_tokens": "tokens",
    "scale": "scale",
    "mlp_token2feat.weight": "token_to_feature.weight",
    "mlp_token2feat.bias": "token_to_feature.bias",
    "mlp_delta_f.weight": "delta_feature.weight",
    "mlp_delta_f.bias": "delta_feature.bias",
    "transform.weight": "transform.weight",
    "transform.bias": "transform.bias",
    "merge.weight": "merge.weight",
    "merge.bias": "merge.bias",
}
_QUERY_LINK = ("transform.weight", "transform.bias", "merge.weight", "merge.bias")

#: The patch size of every released Rein setup (DINOv2/EVA02/CLIP converted 14 -> 16).
OFFICIAL_PATCH_SIZE = 16


class OfficialCheckpointError(AdapterError):
    """An authors' checkpoint that cannot be read, or does not fit the model."""


# ----------------------------------------------------------------------------- reading
def read_official_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """The flat state dict of an authors' checkpoint (a path or an already loaded dict).

    Files are read with ``torch.load(..., weights_only=True)`` (no code from the file
    runs); an mmengine checkpoint's ``state_dict`` is unwrapped, a plain state dict is
    taken as it is.

    Example:
        >>> sd = read_official_checkpoint({"state_dict": {"decode_head.x": torch.zeros(1)}, "meta": {}})
        >>> list(sd)
        ['decode_head.x']
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        loaded = _load_weights_only(path)
        where = str(path)
    elif isinstance(source, Mapping):
        loaded, where = source, "the given dict"
    else:
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) for k in loaded):
        raise OfficialCheckpointError(f"{where} is not a state dict (a mapping of names to tensors, or a dict with 'state_dict')")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, Tensor)}
    if not tensors:
        raise OfficialCheckpointError(f"{where} holds no tensors")
    return tensors


class _Placeholder:
    """Stands in for a non-tensor object of a checkpoint (mmengine's logging state, numpy
    scalars in ``meta``): built without running any code of the original class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)``; other objects beside the tensors become inert placeholders.

    mmengine checkpoints keep their training log (``message_hub``: ``HistoryBuffer``
    objects, numpy arrays) next to ``state_dict``. ``weights_only`` refuses those
    globals; here each one is replaced by :class:`_Placeholder`, so the weights load and
    no code from the file runs (modules torch blocks, such as ``os``, stay refused).
    """
    def unreadable(error: BaseException) -> OfficialCheckpointError:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")[:300]
        return OfficialCheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {reason}). "
            "Expected a .pth file saved by torch.save holding a state dict (or a dict with 'state_dict'), such as "
            "the Rein authors' released checkpoints; objects that would run code when loaded are refused"
        )

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = error
    except Exception as error:  # truncated or foreign files fail in many ways; all mean "not a checkpoint we read"
        raise unreadable(error) from error
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type("Placeholder", (_Placeholder,), {"original": name}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise unreadable(error) from first


def _rein_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    tensors = {k[len(OFFICIAL_REIN_PREFIX):]: v for k, v in state.items() if k.startswith(OFFICIAL_REIN_PREFIX)}
    if not tensors:
        prefixes = sorted({k.split(".", 1)[0] for k in state})
        raise OfficialCheckpointError(
            f"no Rein parameters: no key starts with {OFFICIAL_REIN_PREFIX!r} (the checkpoint's top-level names: "
            f"{prefixes[:10]}). Pass the authors' Rein checkpoint (e.g. dinov2_rein_and_head.pth), not the backbone file"
        )
    return tensors


def _shape(tensors: Mapping[str, Tensor], name: str, ndim: int) -> tuple[int, ...]:
    if name not in tensors:
        raise OfficialCheckpointError(f"the Rein checkpoint has no {OFFICIAL_REIN_PREFIX}{name}")
    shape = tuple(tensors[name].shape)
    if len(shape) != ndim:
        raise OfficialCheckpointError(f"{OFFICIAL_REIN_PREFIX}{name} has shape {shape}; expected {ndim} dimensions")
    return shape


def official_rein_config(source: str | os.PathLike | Mapping[str, Any], *, strict: bool = True) -> tuple[ReinConfig, int, int]:
    """The :class:`ReinConfig`, layer count and width an authors' checkpoint was trained with.

    ``token_length``, ``rank`` (``None`` for the full-rank ``learnable_tokens``), the
    number of layers, the width and ``query_dim`` come from the shapes; a missing
    ``scale`` means the variant with a fixed scale of 1 (``zero_init_delta``). The
    patch size is the authors' 16.

    Returns:
        ``(config, num_layers, width)``.

    Example:
        >>> L, m, r, c, q = 2, 5, 3, 8, 4
        >>> sd = {"backbone.reins.learnable_tokens_a": torch.zeros(L, m, r),
        ...       "backbone.reins.learnable_tokens_b": torch.zeros(L, r, c), "backbone.reins.scale": torch.tensor(1e-3),
        ...       "backbone.reins.transform.weight": torch.zeros(q, c), "backbone.reins.merge.weight": torch.zeros(q, 3 * q)}
        >>> config, layers, width = official_rein_config(sd, strict=False)
        >>> config.token_length, config.rank, config.query_dim, layers, width
        (5, 3, 4, 2, 8)
    """
    tensors = _rein_tensors(read_official_checkpoint(source))
    unknown = sorted(set(tensors) - set(_REIN_NAMES))
    if unknown and strict:
        raise OfficialCheckpointError(
            f"unknown Rein parameters {[OFFICIAL_REIN_PREFIX + k for k in unknown]}; the authors' Reins/LoRAReins "
            f"hold {sorted(_REIN_NAMES)} (pass strict=False to ignore the others)"
        )
    if "learnable_tokens" in tensors and ("learnable_tokens_a" in tensors or "learnable_tokens_b" in tensors):
        raise OfficialCheckpointError("the checkpoint holds both full-rank learnable_tokens and low-rank learnable_tokens_a/_b")
    if "learnable_tokens" in tensors:
        num_layers, tokens, width = _shape(tensors, "learnable_tokens", 3)
        rank = None
    else:
        num_layers, tokens, rank = _shape(tensors, "learnable_tokens_a", 3)
        layers_b, rank_b, width = _shape(tensors, "learnable_tokens_b", 3)
        if (layers_b, rank_b) != (num_layers, rank):
            raise OfficialCheckpointError(
                f"learnable_tokens_a {tuple(tensors['learnable_tokens_a'].shape)} and learnable_tokens_b "
                f"{tuple(tensors['learnable_tokens_b'].shape)} disagree on layers or rank"
            )
    link = [name for name in _QUERY_LINK if name in tensors]
    if link and len(link) != len(_QUERY_LINK) and strict:
        raise OfficialCheckpointError(f"the query link is incomplete: the checkpoint has {link} of {list(_QUERY_LINK)}")
    if not link and strict:
        raise OfficialCheckpointError(
            "the checkpoint has no transform/merge (the authors' Reins always creates them); pass strict=False to "
            "import without the query link"
        )
    query_dim = int(tensors["transform.weight"].shape[0]) if "transform.weight" in tensors else 256
    config = ReinConfig(
        token_length=int(tokens),
        rank=None if rank is None else int(rank),
        query_dim=query_dim,
        link_queries=bool(link),
        zero_init_delta="scale" not in tensors,
        patch_size=OFFICIAL_PATCH_SIZE,
    )
    return config, int(num_layers), int(width)


# ----------------------------------------------------------------------------- merge layout
def interleaved_to_blocks(weight: Tensor) -> Tensor:
    """The authors' ``merge.weight`` (q, 3q), columns ``3*j + k``, in our column order ``k*q + j``.

    Example:
        >>> interleaved_to_blocks(torch.arange(6.0).view(1, 6)).tolist()  # q = 2: j0k0 j0k1 j0k2 j1k0 ...
        [[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]]
    """
    rows, columns = weight.shape
    if columns % 3:
        raise OfficialCheckpointError(f"merge.weight has {columns} input columns; expected 3 x query_dim")
    return weight.reshape(rows, columns // 3, 3).transpose(1, 2).reshape(rows, columns)


def blocks_to_interleaved(weight: Tensor) -> Tensor:
    """Inverse of :func:`interleaved_to_blocks`: our ``merge.weight`` in the authors' column order.

    Example:
        >>> w = torch.randn(4, 12)
        >>> torch.equal(blocks_to_interleaved(interleaved_to_blocks(w)), w)
        True
    """
    rows, columns = weight.shape
    return weight.reshape(rows, 3, columns // 3).transpose(1, 2).reshape(rows, columns)


# ----------------------------------------------------------------------------- import / export
def _check_fits(num_layers: int, width: int, model: nn.Module) -> None:
    host = describe_host(model)
    if width != host.embed_dim:
        raise OfficialCheckpointError(
            f"the checkpoint's Rein has width {width} but this {host.family} has width {host.embed_dim}; load it into "
            f"the host it was trained on (e.g. a ViT-L, width 1024, for the released DINOv2 checkpoints)"
        )
    if num_layers != host.depth:
        raise OfficialCheckpointError(
            f"the checkpoint's Rein refines {num_layers} layers but this {host.family} has {host.depth} blocks; the "
            "authors apply Rein after every block, so the depths must be equal"
        )


def _check_injected(current: ReinConfig, wanted: ReinConfig, model: nn.Module) -> None:
    host = describe_host(model)
    blocks = current.block_indices(host)
    if blocks != list(range(host.depth)):
        raise OfficialCheckpointError(f"the injected Rein refines blocks {blocks}; the authors' checkpoint refines every block")
    if (current.rank is None) != (wanted.rank is None):
        kinds = {True: "full-rank (learnable_tokens)", False: "low-rank (learnable_tokens_a/_b)"}
        raise OfficialCheckpointError(
            f"the checkpoint's tokens are {kinds[wanted.rank is None]} but the injected Rein is "
            f"{kinds[current.rank is None]} (rank={current.rank}); inject with rank={wanted.rank} or import into a "
            "model without Rein"
        )
    for field in ("token_length", "rank", "query_dim", "link_queries", "zero_init_delta"):
        if getattr(current, field) != getattr(wanted, field):
            raise OfficialCheckpointError(
                f"the injected Rein has {field}={getattr(current, field)!r} but the checkpoint needs "
                f"{field}={getattr(wanted, field)!r}"
            )


def _ours(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    ours = {}
    for name, tensor in tensors.items():
        if name not in _REIN_NAMES:
            continue
        ours[_REIN_NAMES[name]] = interleaved_to_blocks(tensor) if name == "merge.weight" else tensor
    # Their fixed-scale variant stores no scale (a plain 1.0); ours keeps it as a buffer of ones.
    ours.setdefault("scale", torch.ones(()))
    return ours


def import_official_rein(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], *,
                         strict: bool = True) -> nn.Module:
    """Loads the Rein of an authors' checkpoint into ``model`` (injecting Rein if needed).

    ``token_length``, ``rank`` and the number of layers are read from the shapes; Rein
    is injected after every block with that configuration (patch size 16), or, if the
    model already carries Rein, that Rein must have the same configuration. The merge
    weight's input columns are permuted from the authors' interleaved layout to ours.
    Every check runs before the model is touched: after any error the model is exactly
    as it was (no Rein injected, no tensor changed).

    Args:
        model: The host the checkpoint was trained on (same width and depth), e.g. a
            timm DINOv2-L at patch 16; load the host's own weights separately.
        source: A ``.pth`` path (mmengine checkpoint or plain state dict), or a state dict.
        strict: Refuse unknown names under ``backbone.reins.`` and a missing query link.

    Returns:
        ``model``, carrying the authors' Rein (host frozen).

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64, num_heads=2, img_size=56)
        >>> theirs = {"backbone.reins." + k: v for k, v in {
        ...     "learnable_tokens_a": torch.randn(2, 5, 3), "learnable_tokens_b": torch.randn(2, 3, 64),
        ...     "scale": torch.tensor(0.1), "mlp_token2feat.weight": torch.randn(64, 64),
        ...     "mlp_token2feat.bias": torch.randn(64), "mlp_delta_f.weight": torch.randn(64, 64),
        ...     "mlp_delta_f.bias": torch.randn(64), "transform.weight": torch.randn(8, 64),
        ...     "transform.bias": torch.randn(8), "merge.weight": torch.randn(8, 24),
        ...     "merge.bias": torch.randn(8)}.items()}
        >>> vit = va.import_official_rein(vit, theirs)
        >>> va.rein_queries(vit).shape
        torch.Size([5, 8])
        >>> all(torch.equal(theirs[k], v) for k, v in va.export_official_rein(vit).items())
        True
    """
    state = read_official_checkpoint(source)
    tensors = _rein_tensors(state)
    wanted, num_layers, width = official_rein_config(state, strict=strict)
    _check_fits(num_layers, width, model)
    injected = injection_state(model)
    already = injected is not None and "rein" in injected.configs
    if already:
        _check_injected(injected.configs["rein"], wanted, model)
    ours = _ours(tensors)
    if not already:
        inject(model, "rein", wanted)
    try:
        rein = model.vfm_adapters["rein"]
        expected = rein.state_dict()
        missing = sorted(set(expected) - set(ours))
        if missing:
            raise OfficialCheckpointError(f"the checkpoint lacks Rein parameters for {missing}")
        wrong = [f"{name}: checkpoint {tuple(ours[name].shape)}, model {tuple(t.shape)}"
                 for name, t in expected.items() if tuple(ours[name].shape) != tuple(t.shape)]
        if wrong:
            raise OfficialCheckpointError("Rein parameters of the wrong shape: " + "; ".join(wrong))
        rein.load_state_dict({name: ours[name] for name in expected}, strict=True)
    except BaseException:
        if not already:
            remove_adapters(model, "rein")
        raise
    return model


def export_official_rein(model: nn.Module) -> dict[str, Tensor]:
    """The Rein of ``model`` under the authors' names and layout (prefix ``backbone.reins.``).

    The result loads into the authors' ``LoRAReins`` (or ``Reins`` for full-rank
    tokens) with ``strict=True``, and :func:`import_official_rein` of it gives back
    bit-identical tensors.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                                        num_heads=2, img_size=56), token_length=4)
        >>> sorted(va.export_official_rein(vit))[:3]
        ['backbone.reins.learnable_tokens_a', 'backbone.reins.learnable_tokens_b', 'backbone.reins.merge.bias']
    """
    container = getattr(model, "vfm_adapters", None)
    if container is None or "rein" not in container:
        raise AdapterError("this model has no Rein injected; nothing to export")
    rein = container["rein"]
    config = rein.config
    host = describe_host(model)
    if config.block_indices(host) != list(range(host.depth)):
        raise AdapterError("the authors' Rein refines every block; this Rein refines only some (layers=...), so it has no "
                           "equivalent in their layout")
    if not config.link_queries:
        raise AdapterError("the authors' Reins always has transform/merge; this Rein was injected with link_queries=False")
    theirs_by_ours = {v: k for k, v in _REIN_NAMES.items()}
    out = {}
    for name, tensor in rein.state_dict().items():
        if name == "scale" and config.zero_init_delta:
            continue  # their variant with a fixed scale of 1 stores none
        value = tensor.detach().clone()
        if name == "merge.weight":
            value = blocks_to_interleaved(value).contiguous()
        out[OFFICIAL_REIN_PREFIX + theirs_by_ours[name]] = value
    return out


# ----------------------------------------------------------------------------- DINOv2 backbone
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def official_dinov2_state_dict(source: str | os.PathLike | Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """The authors' converted DINOv2 (facebookresearch names) as a state dict for a timm ViT.

    Accepts the converted backbone file (``dinov2_converted.pth``: patch kernel 16x16,
    position grid 32x32 + 1 at 512 px) or a full checkpoint with the backbone under
    ``backbone.`` (their ``generate_full_weights.py``); Rein and head keys are left out.
    Names are those of timm's DINOv2 except ``mask_token`` (unused at inference,
    dropped) and chunked block names (``blocks.0.5.`` -> ``blocks.5.``). Nothing is
    resampled: a patch size or position grid that differs from the model's is an
    error, because timm's resampling is not the authors' bicubic conversion.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=1, embed_dim=32, num_heads=2,
        ...                         img_size=32, patch_size=16)
        >>> theirs = {k: v.clone() for k, v in vit.state_dict().items()}
        >>> theirs["mask_token"] = torch.zeros(1, 32)
        >>> sorted(set(official_dinov2_state_dict(theirs, vit)) ^ set(vit.state_dict()))
        []
    """
    state = read_official_checkpoint(source)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items()
                 if k.startswith("backbone.") and not k.startswith(OFFICIAL_REIN_PREFIX)}
    out = {}
    for name, tensor in state.items():
        if name == "mask_token":
            continue
        out[_CHUNKED_BLOCK.sub(r"blocks.\1.", name)] = tensor
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("vfm_adapters.")}
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise OfficialCheckpointError(
            f"the backbone file does not fit this model: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}. It should be the authors' converted "
            "DINOv2 (facebookresearch names) for the timm DINOv2 of the same size"
        )
    wrong = [f"{k}: file {tuple(out[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
             if tuple(out[k].shape) != tuple(v.shape)]
    if wrong:
        raise OfficialCheckpointError(
            "the backbone file has other shapes than this model: " + "; ".join(wrong[:4]) + ". The authors' converted "
            "DINOv2 has patch size 16 and a 32x32 position grid (512 px): build the host with img_size=512, "
            "patch_size=16 (nothing is resampled here)"
        )
    return out


def load_official_dinov2(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Loads the authors' converted DINOv2 into a timm ViT (all checks before any change).

    Example:
        >>> import timm
        >>> make = lambda: timm.create_model("vit_small_patch14_dinov2", depth=1, embed_dim=32, num_heads=2,
        ...                                  img_size=32, patch_size=16)
        >>> a, b = make(), make()
        >>> theirs = dict(a.state_dict(), mask_token=torch.zeros(1, 32))
        >>> torch.equal(load_official_dinov2(b, theirs).pos_embed, a.pos_embed)
        True
    """
    tensors = official_dinov2_state_dict(source, model)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("vfm_adapters.")}
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])
    return model
