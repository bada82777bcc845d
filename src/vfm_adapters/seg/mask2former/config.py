"""The Mask2Former head's options and outputs, and the semantic <-> mask conversions.

:class:`Mask2FormerHeadConfig` (the Rein paper's head by default, convertible to a
``transformers.Mask2FormerConfig``), :class:`Mask2FormerOutput` (per-query class and mask
logits), :func:`semantic_inference` (query predictions -> per-class scores) and
:func:`semantic_targets` (semantic label maps -> per-image mask and class targets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Mask2FormerConfig

from ..label_maps import IGNORE_INDEX

__all__ = ["Mask2FormerHeadConfig", "Mask2FormerOutput", "semantic_inference", "semantic_targets"]


@dataclass
class Mask2FormerHeadConfig:
    """Options of :class:`Mask2FormerHead`; the defaults are the Rein paper's head.

    Attributes:
        num_classes: Classes without the no-object class (19 for Cityscapes).
        in_channels: Channels of the 4 input maps (strides 4, 8, 16, 32).
        num_queries: Object queries (100). With the Rein link the queries come from Rein.
        num_decoder_layers: Masked-attention decoder layers (9; one more prediction is
            made from the initial queries, so deep supervision sees 10 predictions).
        num_heads: Attention heads of the decoder and of the deformable pixel decoder.
        ffn_dim: Feed-forward width of the decoder layers (2048).
        hidden_dim: Channels of the pixel decoder, the mask features and the queries (256).
        pixel_decoder_layers: Deformable-attention encoder layers of the pixel decoder (6).
        pixel_decoder_ffn_dim: Their feed-forward width (1024).
        class_weight: Weight of the classification loss and matching cost (2.0).
        no_object_weight: Weight of the no-object class in the classification loss (0.1).
        mask_weight: Weight of the point-sampled mask BCE loss and cost (5.0).
        dice_weight: Weight of the dice loss and cost (5.0).
        num_points: Points sampled per mask for the loss and the matching (12544).
        oversample_ratio: Point oversampling before uncertainty selection (3.0).
        importance_sample_ratio: Share of points chosen by uncertainty (0.75).
        deep_supervision: Add the losses of every intermediate prediction.
        link_rein_queries: Take the queries from Rein (no own query embeddings).
        query_dim: Width of the given queries when linked (Rein's ``query_dim``); ``None``
            means ``hidden_dim``. The queries are also the decoder's position embeddings,
            so it must equal ``hidden_dim``.
        ignore_index: Label of ignored pixels (255).
        dropout: Dropout of the transformer layers (0.0, as in Mask2Former; transformers'
            decoder also uses it as layer-drop probability, so keep it 0).
    """

    num_classes: int = 19
    in_channels: Sequence[int] = (1024, 1024, 1024, 1024)
    num_queries: int = 100
    num_decoder_layers: int = 9
    num_heads: int = 8
    ffn_dim: int = 2048
    hidden_dim: int = 256
    pixel_decoder_layers: int = 6
    pixel_decoder_ffn_dim: int = 1024
    class_weight: float = 2.0
    no_object_weight: float = 0.1
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    link_rein_queries: bool = False
    query_dim: int | None = None
    ignore_index: int = IGNORE_INDEX
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.in_channels = tuple(int(c) for c in self.in_channels)
        if self.query_dim is None:
            self.query_dim = self.hidden_dim
        if len(self.in_channels) != 4:
            raise ValueError(f"the Mask2Former head takes 4 maps (strides 4/8/16/32), got in_channels={list(self.in_channels)}")
        for name in ("num_classes", "num_queries", "num_decoder_layers", "num_heads", "ffn_dim", "hidden_dim",
                     "pixel_decoder_layers", "pixel_decoder_ffn_dim", "num_points", "query_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Mask2FormerHeadConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_dim % 32:
            raise ValueError(f"hidden_dim must be a multiple of 32 (the pixel decoder's GroupNorm), got {self.hidden_dim}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.link_rein_queries and self.query_dim != self.hidden_dim:
            raise ValueError(f"linked queries must have the head's width: query_dim {self.query_dim} != hidden_dim {self.hidden_dim}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Mask2FormerHeadConfig":
        """Builds a config from a mapping, refusing unknown keys.

        Example:
            >>> Mask2FormerHeadConfig.from_dict({"num_classes": 5}).num_queries
            100
        """
        accepted = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise ValueError(f"unknown Mask2Former head option(s) {unknown}; accepted: {sorted(accepted)}")
        return cls(**values)

    def to_transformers(self) -> Mask2FormerConfig:
        """The equivalent ``transformers.Mask2FormerConfig`` (backbone fields unused).

        transformers counts the prediction from the initial queries as a decoder layer,
        so its ``decoder_layers`` is ``num_decoder_layers + 1``.

        Example:
            >>> Mask2FormerHeadConfig().to_transformers().decoder_layers
            10
        """
        return Mask2FormerConfig(
            feature_size=self.hidden_dim,
            mask_feature_size=self.hidden_dim,
            hidden_dim=self.hidden_dim,
            encoder_feedforward_dim=self.pixel_decoder_ffn_dim,
            encoder_layers=self.pixel_decoder_layers,
            decoder_layers=self.num_decoder_layers + 1,
            num_attention_heads=self.num_heads,
            dim_feedforward=self.ffn_dim,
            dropout=self.dropout,
            num_queries=self.num_queries,
            no_object_weight=self.no_object_weight,
            class_weight=self.class_weight,
            mask_weight=self.mask_weight,
            dice_weight=self.dice_weight,
            train_num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
            use_auxiliary_loss=self.deep_supervision,
            ignore_value=self.ignore_index,
            num_labels=self.num_classes,
            feature_strides=[4, 8, 16, 32],
            common_stride=4,
        )


@dataclass
class Mask2FormerOutput:
    """Predictions of :class:`Mask2FormerHead`.

    Attributes:
        class_logits: ``(B, Q, K + 1)`` of the last decoder layer; the last class is no-object.
        mask_logits: ``(B, Q, H/4, W/4)`` of the last decoder layer.
        auxiliary: ``(class_logits, mask_logits)`` of the earlier predictions (the
            initial queries, then decoder layers 1..L-1), for deep supervision.
    """

    class_logits: Tensor
    mask_logits: Tensor
    auxiliary: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)


def semantic_inference(class_logits: Tensor, mask_logits: Tensor, size: Sequence[int] | None = None) -> Tensor:
    """Per-class scores ``(B, K, H, W)`` from query class and mask logits.

    ``softmax`` over the classes with the no-object class dropped afterwards, ``sigmoid``
    of the masks (bilinearly resized to ``size`` first when given), then
    ``einsum("bqc,bqhw->bchw")``.

    Example:
        >>> scores = semantic_inference(torch.randn(2, 5, 4), torch.randn(2, 5, 8, 8), size=(16, 16))
        >>> scores.shape
        torch.Size([2, 3, 16, 16])
    """
    if size is not None and tuple(mask_logits.shape[-2:]) != tuple(size):
        mask_logits = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    class_probs = class_logits.float().softmax(-1)[..., :-1]
    mask_probs = mask_logits.float().sigmoid()
    return torch.einsum("bqc,bqhw->bchw", class_probs, mask_probs)


def semantic_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[list[Tensor], list[Tensor]]:
    """Per-image mask and class targets from semantic label maps ``(B, H, W)``.

    One binary mask per class present in an image (ignored pixels belong to no mask).

    Returns:
        ``(mask_labels, class_labels)``: lists of ``(n_i, H, W)`` float masks and
        ``(n_i,)`` int64 classes, classes in increasing order.

    Example:
        >>> masks, classes = semantic_targets(torch.tensor([[[0, 3], [255, 3]]]))
        >>> classes[0].tolist(), masks[0].tolist()
        ([0, 3], [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    mask_labels, class_labels = [], []
    for label in labels:
        classes = torch.unique(label[label != ignore_index]).to(torch.int64)
        mask_labels.append((label[None] == classes[:, None, None]).float())
        class_labels.append(classes)
    return mask_labels, class_labels
