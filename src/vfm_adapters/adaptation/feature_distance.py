"""DAFormer's ImageNet feature distance ("DAFormer: Improving Network Architectures and
Training Strategies for Domain-Adaptive Semantic Segmentation"): the student's encoder
features are pulled towards those of the frozen initial (ImageNet) encoder on the
feature pixels of thing classes.

Example:
    >>> downscale_label_ratio(torch.tensor([[[6, 6], [6, 0]]]), 2, 0.75, 19).tolist()
    [[[6]]]
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seg.datasets import IGNORE_INDEX

__all__ = ["CITYSCAPES_THING_CLASSES", "downscale_label_ratio", "encoder_feature_distance", "feature_distance_loss"]


#: DAFormer's ``imnet_feature_dist_classes`` (Cityscapes train ids of traffic light, traffic
#: sign, person, rider, car, truck, bus, train, motorcycle, bicycle).
CITYSCAPES_THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def downscale_label_ratio(labels: Tensor, scale_factor: int, min_ratio: float, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> Tensor:
    """DAFormer's label downscaling: the majority class of each ``scale_factor`` block,
    ``ignore_index`` where it covers less than ``min_ratio`` of the block (or is ignored).

    Example:
        >>> lbl = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 255], [0, 0, 3, 3], [0, 3, 3, 3]]])
        >>> downscale_label_ratio(lbl, 2, 0.75, 4).tolist()
        [[[1, 2], [0, 3]]]
        >>> downscale_label_ratio(lbl, 2, 1.0, 4).tolist()
        [[[1, 255], [255, 3]]]
    """
    if scale_factor < 1:
        raise ValueError(f"scale_factor must be at least 1, got {scale_factor}")
    labels = labels.clone().long()
    labels[(labels == ignore_index) | (labels < 0) | (labels >= num_classes)] = num_classes
    onehot = F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(onehot, kernel_size=scale_factor).max(dim=1)
    out[out == num_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out


def feature_distance_loss(features: Tensor, imagenet_features: Tensor, labels: Tensor | None = None,
                          classes: Sequence[int] | None = CITYSCAPES_THING_CLASSES, min_ratio: float = 0.75,
                          num_classes: int = 19, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """DAFormer's ImageNet feature distance: mean L2 distance of the student's and the
    frozen initial encoder's features, over feature pixels of ``classes`` (thing classes).

    The labels are downscaled to the feature grid by :func:`downscale_label_ratio` (a
    pixel counts when one class covers >= ``min_ratio`` of its block). With no such pixel
    the loss is 0 (DAFormer's mean over nothing would be NaN).

    Example:
        >>> f, g = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2); f[0, 0, 0, 0] = 3.0; f[0, 1, 0, 0] = 4.0
        >>> feature_distance_loss(f, g, torch.full((1, 4, 4), 6)).item()      # all "light": mean of 5, 0, 0, 0
        1.25
        >>> feature_distance_loss(f, g, torch.zeros(1, 4, 4, dtype=torch.long)).item()   # no thing pixel
        0.0
    """
    distance = torch.norm(features.float() - imagenet_features.float().detach(), dim=1, p=2)  # (B, h, w)
    if classes is not None and labels is not None:
        scale = labels.shape[-1] // features.shape[-1]
        small = downscale_label_ratio(labels, max(scale, 1), min_ratio, num_classes, ignore_index)
        if tuple(small.shape[-2:]) != tuple(distance.shape[-2:]):
            small = F.interpolate(small[:, None].float(), size=distance.shape[-2:], mode="nearest")[:, 0].long()
        mask = torch.isin(small, torch.as_tensor(list(classes), device=small.device))
        if not bool(mask.any()):
            return distance.sum() * 0.0
        return distance[mask].mean()
    return distance.mean()


def _last_map(output: Any) -> Any:
    """An encoder's last feature map (its output itself when it is one map)."""
    return output[-1] if isinstance(output, (list, tuple)) else output


def encoder_feature_distance(features: Any, imagenet_encoder: nn.Module, images: Tensor, labels: Tensor | None,
                             classes: Sequence[int] | None = CITYSCAPES_THING_CLASSES, min_ratio: float = 0.75,
                             num_classes: int = 19, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """:func:`feature_distance_loss` between the student's encoder output ``features`` on ``images``
    and the frozen initial encoder's (run in eval mode, without gradients); the last map of each
    when they give a list.

    Example:
        >>> from torch import nn
        >>> encoder = nn.Conv2d(3, 2, 1)
        >>> images = torch.randn(1, 3, 4, 4)
        >>> encoder_feature_distance([encoder(images)], encoder, images, None).item()   # same weights: no distance
        0.0
    """
    with torch.no_grad():
        imagenet_encoder.eval()
        reference = _last_map(imagenet_encoder(images))
    return feature_distance_loss(_last_map(features), reference, labels, classes, min_ratio, num_classes, ignore_index)
