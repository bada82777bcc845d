"""Changing a ViT's patch size the way the Rein authors do (14 -> 16, bicubic).

The authors convert DINOv2 (and EVA02, CLIP) to patch 16 at 512 px with two plain
bicubic interpolations (``tools/convert_models/convert_dinov2_large_512x512.py`` in
their repository): the patch-embedding kernel is resized 14x14 -> 16x16 and the
position-embedding grid 37x37 -> 32x32, prefix (CLS) positions kept.

timm does something else when a model is created with another ``patch_size``: its
``resample_patch_embed`` solves a pseudo-inverse (FlexiViT) so that a resized patch
gives about the same response, and its position resampling uses anti-aliasing. The
two conversions differ: on a smooth (constant) patch the bicubic kernel responds
``(16/14)**2`` = 1.31 times as strongly as the original one, the pseudo-inverse one
about 1.0 times (for the DINOv2-L kernel about 1.29 vs 0.98 has been reported; not
re-measured here, the weights are not available offline). Which one a config uses is
``model.patch_resample``: ``bicubic`` (the paper configs) or ``timm``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Accepted values of ``model.patch_resample``.
PATCH_RESAMPLE_MODES = ("timm", "bicubic")


def bicubic_patch_embed(weight: Tensor, size: Sequence[int]) -> Tensor:
    """The patch-embedding kernel ``(C, 3, p, p)`` resized bicubically to ``size`` (float32).

    Example:
        >>> bicubic_patch_embed(torch.ones(2, 3, 14, 14), (16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """
    return F.interpolate(weight.float(), size=tuple(int(s) for s in size), mode="bicubic", align_corners=False)


def bicubic_pos_embed(pos_embed: Tensor, grid: Sequence[int], num_prefix: int) -> Tensor:
    """Position embeddings ``(1, prefix + h*w, C)`` with the square grid resized bicubically to ``grid``.

    Prefix positions (CLS) are kept as they are. A spatial ``(1, h, w, C)`` table (SAM)
    is resized as a whole.

    Example:
        >>> bicubic_pos_embed(torch.randn(1, 1 + 37 * 37, 8), (32, 32), num_prefix=1).shape
        torch.Size([1, 1025, 8])
    """
    new_h, new_w = int(grid[0]), int(grid[1])
    if pos_embed.ndim == 4:  # (1, h, w, C)
        resized = F.interpolate(pos_embed.float().permute(0, 3, 1, 2), size=(new_h, new_w), mode="bicubic",
                                align_corners=False)
        return resized.permute(0, 2, 3, 1)
    prefix, tokens = pos_embed[:, :num_prefix].float(), pos_embed[:, num_prefix:].float()
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"position embedding has {tokens.shape[1]} grid tokens after {num_prefix} prefix tokens, "
                         "which is not a square grid")
    channels = tokens.shape[-1]
    resized = F.interpolate(tokens.reshape(1, side, side, channels).permute(0, 3, 1, 2), size=(new_h, new_w),
                            mode="bicubic", align_corners=False)
    return torch.cat([prefix, resized.permute(0, 2, 3, 1).reshape(1, new_h * new_w, channels)], dim=1)


def convert_state_dict_bicubic(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A native-patch host state dict converted for ``model`` (another patch size / image size).

    Only ``patch_embed.proj.weight`` and ``pos_embed`` may differ in shape; they are
    converted with :func:`bicubic_patch_embed` and :func:`bicubic_pos_embed`. Any other
    shape mismatch is an error (the state dict is for another architecture).

    Example:
        >>> import timm
        >>> src = timm.create_model("vit_small_patch14_dinov2", depth=1, embed_dim=16, num_heads=2, img_size=28)
        >>> dst = timm.create_model("vit_small_patch14_dinov2", depth=1, embed_dim=16, num_heads=2, img_size=32,
        ...                         patch_size=16)
        >>> dst.load_state_dict(convert_state_dict_bicubic(src.state_dict(), dst))
        <All keys matched successfully>
    """
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        expected = target.get(name)
        if expected is None or tuple(expected.shape) == tuple(tensor.shape):
            out[name] = tensor
        elif name.endswith("patch_embed.proj.weight"):
            out[name] = bicubic_patch_embed(tensor, expected.shape[-2:]).to(expected.dtype)
        elif name.endswith("pos_embed"):
            if expected.ndim == 4:
                grid, prefix = tuple(expected.shape[1:3]), 0
            else:
                grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ())
                if len(grid) != 2:
                    side = math.isqrt(expected.shape[1])
                    grid = (side, side)
                prefix = expected.shape[1] - grid[0] * grid[1]
            out[name] = bicubic_pos_embed(tensor, grid, prefix).to(expected.dtype)
        else:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit the model's {tuple(expected.shape)}; "
                             "only the patch embedding and position embedding can be converted")
    return out


def create_host_bicubic(name: str, pretrained: bool, backbone_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A timm host with ``backbone_kwargs`` whose pretrained weights were converted bicubically.

    The weights are loaded by timm at the model's native patch and image size (from the
    hub, or the ``pretrained_cfg_overlay`` file) and converted with
    :func:`convert_state_dict_bicubic`; without ``pretrained`` the host is random.

    Example:
        >>> vit = create_host_bicubic("vit_small_patch14_dinov2", False, {"img_size": 32, "patch_size": 16,
        ...                           "depth": 1, "embed_dim": 16, "num_heads": 2})
        >>> vit.patch_embed.proj.weight.shape[-1]
        16
    """
    import timm

    kwargs = dict(backbone_kwargs or {})
    target = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if not pretrained:
        return target
    native = {k: v for k, v in kwargs.items() if k not in ("patch_size", "img_size")}
    source = timm.create_model(name, pretrained=True, num_classes=0, **native)
    target.load_state_dict(convert_state_dict_bicubic(source.state_dict(), target))
    return target
