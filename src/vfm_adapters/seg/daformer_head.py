"""DAFormer's decode head: per-level embeddings fused by a depthwise-separable ASPP.

The head of "DAFormer: Improving Network Architectures and Training Strategies for
Domain-Adaptive Semantic Segmentation" (its ``daformer_sepaspp`` configuration), which
"A Study on Unsupervised Domain Adaptation for Semantic Segmentation in the Era of
Vision-Language Models" keeps when it swaps the encoder for EVA02-CLIP:

1. every input level ``i`` is embedded to ``embed_dims`` (256) channels by a linear
   layer over its pixels (SegFormer's ``MLP``, here the equivalent 1x1 convolution with
   bias; no norm, no activation) and upsampled bilinearly to the finest level;
2. the concatenation (``levels x 256`` channels) is fused by an ASPP without image
   pooling: a 1x1 convolution (dilation 1) and depthwise-separable 3x3 convolutions with
   dilations 6, 12, 18 (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU), each to
   ``channels`` (256), concatenated and reduced by a 3x3 convolution + BN + ReLU;
3. dropout 0.1 and a 1x1 classifier.

Convolutions followed by a norm have no bias (mmcv's ``ConvModule``). Norm is
BatchNorm as in DAFormer (``norm="group"`` swaps in GroupNorm for tiny batches).
Registered in :data:`vfm_adapters.seg.heads.HEADS` as ``"daformer"``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import HEADS

__all__ = ["DAFormerHead", "daformer_head_parameters"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be 'batch' (DAFormer) or 'group', got {kind!r}")


def _conv_norm_relu(cin: int, cout: int, kernel: int, norm: str, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False),
                         _norm(norm, cout), nn.ReLU(inplace=True))


class DAFormerHead(nn.Module):
    """DAFormer's ASPP-fusion decode head (see the module docstring).

    Args:
        in_channels: Channels of each input level (finest first).
        num_classes: Output classes.
        channels: Width of the ASPP branches and the bottleneck (256).
        dropout: Dropout before the classifier (0.1).
        dilations: ASPP dilations; 1 is a 1x1 convolution, the others depthwise-separable 3x3.
        embed_dims: Width of each level's embedding (256).
        norm: ``"batch"`` (DAFormer) or ``"group"``.

    Example:
        >>> head = DAFormerHead([8, 16, 16, 16], num_classes=5, channels=16, embed_dims=8)
        >>> maps = [torch.randn(2, c, s, s) for c, s in zip([8, 16, 16, 16], (16, 8, 4, 2))]
        >>> head(maps).shape
        torch.Size([2, 5, 16, 16])
        >>> sum(p.numel() for p in head.parameters()) == daformer_head_parameters([8, 16, 16, 16], 5, 16, 8)
        True
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1,
                 dilations: Sequence[int] = (1, 6, 12, 18), embed_dims: int = 256, norm: str = "batch") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dims, 1) for c in in_channels)
        fused = embed_dims * len(in_channels)
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(_conv_norm_relu(fused, channels, 1, norm))
            else:
                branches.append(nn.Sequential(_conv_norm_relu(fused, fused, 3, norm, dilation=d, groups=fused),
                                              _conv_norm_relu(fused, channels, 1, norm)))
        self.aspp = nn.ModuleList(branches)
        self.bottleneck = _conv_norm_relu(len(dilations) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.dilations = tuple(int(d) for d in dilations)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        embedded = [layer(f) for layer, f in zip(self.embed, features)]
        embedded = [e if e.shape[-2:] == size else F.interpolate(e, size=size, mode="bilinear", align_corners=False)
                    for e in embedded]
        x = torch.cat(embedded, dim=1)
        x = self.bottleneck(torch.cat([branch(x) for branch in self.aspp], dim=1))
        return self.classifier(self.dropout(x))


def daformer_head_parameters(in_channels: Sequence[int], num_classes: int, channels: int = 256, embed_dims: int = 256,
                             dilations: Sequence[int] = (1, 6, 12, 18)) -> int:
    """Parameters of a :class:`DAFormerHead` (batch or group norm alike), counted by formula.

    Example:
        >>> daformer_head_parameters([1024] * 4, 19)   # EVA02-L levels, Cityscapes
        4498707
    """
    fused = embed_dims * len(in_channels)
    count = sum(c * embed_dims + embed_dims for c in in_channels)        # embeddings (weight + bias)
    for d in dilations:
        if d == 1:
            count += fused * channels + 2 * channels                      # 1x1 + norm
        else:
            count += fused * 9 + 2 * fused + fused * channels + 2 * channels  # depthwise + norm, pointwise + norm
    count += len(dilations) * channels * channels * 9 + 2 * channels      # bottleneck 3x3 + norm
    return count + channels * num_classes + num_classes                    # classifier


HEADS["daformer"] = DAFormerHead
