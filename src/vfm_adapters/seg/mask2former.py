"""A Mask2Former decode head made of transformers' Mask2Former parts, with Rein's query link.

The head is the one behind every number of the Rein paper ("Stronger, Fewer, & Superior", CVPR 2024):
a deformable multi-scale pixel decoder (6 layers) over the neck's 4 maps (strides
4/8/16/32), a masked-attention transformer decoder (9 layers, 8 heads, FFN 2048, 256
channels, 100 queries), class and mask predictions after every decoder layer (deep
supervision), Hungarian matching and the class (2.0, no-object 0.1), mask BCE (5.0)
and dice (5.0) losses on 12,544 uncertainty-sampled points.

Parts taken from :mod:`transformers.models.mask2former.modeling_mask2former` (not
copied): ``Mask2FormerPixelDecoder`` (its multi-scale deformable attention runs in pure
PyTorch through ``grid_sample``), ``Mask2FormerMaskedAttentionDecoder``,
``Mask2FormerSinePositionEmbedding``, ``Mask2FormerHungarianMatcher`` and
``Mask2FormerLoss``, all configured through one ``Mask2FormerConfig``.
``Mask2FormerTransformerModule`` (input projections, level embeddings, then the
decoder) creates its query embeddings itself, so it is subclassed: the subclass only
replaces ``forward`` to take the queries from outside, and drops the two query
embedding tables when the queries come from Rein.

Rein's query link: given Rein's queries ``Q`` (m, 256) (:func:`vfm_adapters.rein_queries`),
``Q`` is the positional query embedding of every decoder layer and ``Linear(256, 256)(Q)``
the initial query features. The queries are recomputed from Rein's tokens at every
call, so the head's loss trains the tokens through the link.

Semantic inference multiplies class and mask probabilities:
``einsum("bqc,bqhw->bchw", softmax(class)[..., :-1], sigmoid(mask))``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerTransformerModule,
)

from .datasets import IGNORE_INDEX
from .features import BackboneFeatures, build_neck, check_stage_scales
from .model import PixelWeightsUnsupported, check_normalisation
from .optim import parameter_groups
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "Mask2FormerHead",
    "Mask2FormerHeadConfig",
    "Mask2FormerOutput",
    "Mask2FormerSegmentor",
    "build_mask2former_segmentor",
    "export_official_head",
    "load_official_head",
    "official_head_mapping",
    "semantic_inference",
    "semantic_targets",
]


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


class _QueryLinkedTransformerModule(Mask2FormerTransformerModule):
    """transformers' transformer module whose queries may come from outside (Rein).

    The parent creates its query embeddings itself and reads them in ``forward``; this
    subclass keeps the parent's layers (input projections, level embeddings, sine
    position embedding, masked-attention decoder) and replaces only ``forward`` so the
    queries can be passed in. With ``link_queries`` the parent's two query tables are
    removed and ``query_link`` (Linear(query_dim, hidden_dim)) makes the initial query
    features from the given queries.
    """

    def __init__(self, in_features: int, config: Mask2FormerConfig, link_queries: bool, query_dim: int) -> None:
        super().__init__(in_features, config)
        self.link_queries = link_queries
        if link_queries:
            del self.queries_embedder, self.queries_features
            self.query_link = nn.Linear(query_dim, config.hidden_dim)

    def _queries(self, batch_size: int, queries: Tensor | None) -> tuple[Tensor, Tensor]:
        """(position embeddings, initial features), both (Q, B, C) as the decoder wants."""
        if not self.link_queries:
            if queries is not None:
                raise ValueError("this head has its own query embeddings; build it with link_rein_queries=True to use Rein's queries")
            position = self.queries_embedder.weight
            features = self.queries_features.weight
            return position[:, None].repeat(1, batch_size, 1), features[:, None].repeat(1, batch_size, 1)
        if queries is None:
            raise ValueError("this head was built with link_rein_queries=True: pass queries=vfm_adapters.rein_queries(backbone)")
        if queries.ndim == 2:
            queries = queries[None].expand(batch_size, -1, -1)
        if queries.ndim != 3 or queries.shape[0] != batch_size or queries.shape[-1] != self.query_link.in_features:
            raise ValueError(f"queries must be (m, {self.query_link.in_features}) or (B, m, {self.query_link.in_features}), "
                             f"got shape {tuple(queries.shape)} for a batch of {batch_size}")
        position = queries.transpose(0, 1).contiguous()
        return position, self.query_link(position)

    def forward(self, multi_scale_features: Sequence[Tensor], mask_features: Tensor,  # type: ignore[override]
                queries: Tensor | None = None):
        stage_features, stage_positions, sizes = [], [], []
        for level in range(self.num_feature_levels):
            feature = multi_scale_features[level]
            sizes.append(feature.shape[-2:])
            position = self.position_embedder(feature.shape, feature.device, feature.dtype, None).flatten(2)
            projected = self.input_projections[level](feature).flatten(2) + self.level_embed.weight[level][None, :, None]
            stage_positions.append(position.permute(2, 0, 1))  # (HW, B, C)
            stage_features.append(projected.permute(2, 0, 1))
        position_queries, feature_queries = self._queries(mask_features.shape[0], queries)
        return self.decoder(
            inputs_embeds=feature_queries,
            multi_stage_positional_embeddings=stage_positions,
            pixel_embeddings=mask_features,
            encoder_hidden_states=stage_features,
            query_position_embeddings=position_queries,
            feature_size_list=sizes,
            output_hidden_states=False,
            output_attentions=False,
            return_dict=True,
        )


@torch.no_grad()
def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # detectron2's init for the pixel decoder's convolutions, as in Mask2Former.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


@torch.no_grad()
def _init_deformable_attention(module: Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention) -> None:
    # Deformable DETR's init: zero offsets weights, biases pointing each head in its own direction.
    nn.init.zeros_(module.sampling_offsets.weight)
    thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
    grid = grid.repeat(1, module.n_levels, module.n_points, 1)
    grid = grid * torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    module.sampling_offsets.bias.copy_(grid.reshape(-1).to(module.sampling_offsets.bias.device))
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    for linear in (module.value_proj, module.output_proj):
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)


class Mask2FormerHead(nn.Module):
    """Mask2Former decode head over 4 maps (strides 4/8/16/32), optionally linked to Rein.

    Args:
        num_classes: Classes without no-object.
        in_channels: Channels of the 4 input maps.
        **options: Any other field of :class:`Mask2FormerHeadConfig` (defaults: the paper's).

    Example:
        >>> head = Mask2FormerHead(3, [16] * 4, num_queries=4, num_decoder_layers=2, num_heads=2,
        ...                        ffn_dim=32, hidden_dim=32, pixel_decoder_layers=1,
        ...                        pixel_decoder_ffn_dim=32, num_points=16)
        >>> maps = [torch.randn(2, 16, 32 // s, 32 // s) for s in (4, 8, 16, 32)]
        >>> out = head(maps)
        >>> out.class_logits.shape, out.mask_logits.shape, len(out.auxiliary)
        (torch.Size([2, 4, 4]), torch.Size([2, 4, 8, 8]), 2)
        >>> head.predict(out, size=(32, 32)).shape
        torch.Size([2, 3, 32, 32])
        >>> bool(head.loss(out, torch.randint(0, 3, (2, 32, 32))).isfinite())
        True
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], **options: Any) -> None:
        super().__init__()
        self.config = Mask2FormerHeadConfig.from_dict({"num_classes": num_classes, "in_channels": in_channels, **options})
        cfg = self.config
        hf = cfg.to_transformers()
        self.pixel_decoder = Mask2FormerPixelDecoder(hf, feature_channels=list(cfg.in_channels))
        self.transformer = _QueryLinkedTransformerModule(cfg.hidden_dim, hf, cfg.link_rein_queries, cfg.query_dim)
        self.class_predictor = nn.Linear(cfg.hidden_dim, cfg.num_classes + 1)
        self.weight_dict = {"loss_cross_entropy": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
        self.criterion = Mask2FormerLoss(hf, weight_dict=self.weight_dict)
        self._init_weights()

    @property
    def link_rein_queries(self) -> bool:
        return self.config.link_rein_queries

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _init_weights(self) -> None:
        """Mask2Former's init (transformers leaves it to ``PreTrainedModel``, unused here)."""
        with torch.no_grad():
            nn.init.normal_(self.pixel_decoder.level_embed)  # allocated with torch.Tensor: must be set
            for module in self.pixel_decoder.modules():
                if isinstance(module, nn.Conv2d):
                    _c2_xavier_fill(module)
                elif isinstance(module, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
                    _init_deformable_attention(module)
            for projection in self.transformer.input_projections:
                if isinstance(projection, nn.Conv2d):
                    _c2_xavier_fill(projection)
            for layer in self.transformer.decoder.layers:
                if isinstance(layer, Mask2FormerMaskedAttentionDecoderLayer):
                    for param in layer.parameters():
                        if param.dim() > 1:
                            nn.init.xavier_uniform_(param)
                    nn.init.zeros_(layer.cross_attn.in_proj_bias)

    def forward(self, features: Sequence[Tensor], queries: Tensor | None = None) -> Mask2FormerOutput:
        """Runs the head.

        Args:
            features: 4 maps ``(B, C_i, H_i, W_i)`` at strides 4, 8, 16, 32 (finest first).
            queries: Rein's queries ``(m, hidden_dim)`` (or per image ``(B, m, hidden_dim)``);
                required when built with ``link_rein_queries=True``, refused otherwise.

        Returns:
            A :class:`Mask2FormerOutput`; masks are at the resolution of the finest map.
        """
        if len(features) != 4:
            raise ValueError(f"the Mask2Former head takes 4 maps (strides 4/8/16/32), got {len(features)}")
        pixels = self.pixel_decoder(list(features), return_dict=True)
        decoded = self.transformer(pixels.multi_scale_features, pixels.mask_features, queries)
        class_logits = [self.class_predictor(hidden.transpose(0, 1)) for hidden in decoded.intermediate_hidden_states]
        mask_logits = list(decoded.masks_queries_logits)
        return Mask2FormerOutput(class_logits[-1], mask_logits[-1], list(zip(class_logits[:-1], mask_logits[:-1])))

    def predict(self, outputs: Mask2FormerOutput, size: Sequence[int] | None = None) -> Tensor:
        """Semantic scores ``(B, K, H, W)`` (see :func:`semantic_inference`)."""
        return semantic_inference(outputs.class_logits, outputs.mask_logits, size)

    def match(self, outputs: Mask2FormerOutput, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Hungarian matching of the last prediction to the classes of ``labels`` (B, H, W).

        Returns, per image, ``(query indices, target indices)``; target ``j`` is the
        ``j``-th class present in the image in increasing class order.
        """
        masks, classes = semantic_targets(labels.to(outputs.mask_logits.device), self.config.ignore_index)
        with torch.autocast(outputs.mask_logits.device.type, enabled=False):
            return self.criterion.matcher(outputs.mask_logits.float(), outputs.class_logits.float(), masks, classes)

    def loss_terms(self, outputs: Mask2FormerOutput, labels: Tensor) -> dict[str, Tensor]:
        """Weighted loss terms: ``loss_cross_entropy``, ``loss_mask``, ``loss_dice`` and,
        with deep supervision, the same with a ``_<i>`` suffix for each earlier prediction.

        Args:
            outputs: The head's output.
            labels: Semantic label maps ``(B, H, W)`` (any resolution; the loss samples
                points in normalised coordinates), ``ignore_index`` ignored.
        """
        masks, classes = semantic_targets(labels.to(outputs.mask_logits.device), self.config.ignore_index)
        auxiliary = None
        if self.config.deep_supervision and outputs.auxiliary:
            auxiliary = [{"class_queries_logits": c.float(), "masks_queries_logits": m.float()} for c, m in outputs.auxiliary]
        with torch.autocast(outputs.mask_logits.device.type, enabled=False):
            terms = self.criterion(
                masks_queries_logits=outputs.mask_logits.float(),
                class_queries_logits=outputs.class_logits.float(),
                mask_labels=masks,
                class_labels=classes,
                auxiliary_predictions=auxiliary,
            )
        weighted = {}
        for name, value in terms.items():
            base = next(key for key in self.weight_dict if name == key or name.startswith(key + "_"))
            weighted[name] = value * self.weight_dict[base]
        return weighted

    def loss(self, outputs: Mask2FormerOutput, labels: Tensor) -> Tensor:
        """The total training loss: the sum of :meth:`loss_terms`."""
        return sum(self.loss_terms(outputs, labels).values())


def _linked_rein(backbone: nn.Module):
    container = getattr(backbone, "vfm_adapters", None)
    if container is None or "rein" not in container:
        return None
    rein = container["rein"]
    return rein if getattr(rein.config, "link_queries", False) else None


class Mask2FormerSegmentor(nn.Module):
    """Host ViT (with adapters) -> block features -> neck -> Mask2Former head.

    The same layout as :class:`~vfm_adapters.seg.heads.Segmentor` (``features``,
    ``neck``, ``head``, ``backbone``, ``decode_modules()``, ``settings``), so training
    and inference code can take either. ``forward`` returns semantic scores ``(B, K, H, W)``
    at the image size (for sliding-window inference and evaluation); training uses
    :meth:`loss`.

    Args:
        backbone: The host model, adapters injected.
        num_classes: Output classes.
        layers: Feature blocks; default :func:`~vfm_adapters.seg.features.default_layers`.
        scales: Neck resampling factors (x4, x2, x1, x0.5 give strides 4/8/16/32 at patch 16).
        link_rein_queries: Use Rein's queries; ``None`` links when the backbone carries a
            Rein with ``link_queries`` (then ``num_queries`` is Rein's token count).
        neck: ``"learnable"`` (default), ``"interpolate"`` (the paper's, parameter-free)
            or ``"multilevel"``; see :func:`~vfm_adapters.seg.features.build_neck`.
        mean: Per-channel mean (0-255 RGB) of the images this model expects.
        std: Per-channel standard deviation, as ``mean``.
        **head_options: Fields of :class:`Mask2FormerHeadConfig`.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32,
        ...                      num_heads=2, img_size=56), token_length=4, query_dim=32)
        >>> seg = Mask2FormerSegmentor(vit, num_classes=3, num_decoder_layers=1, num_heads=2, ffn_dim=32,
        ...                            hidden_dim=32, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32,
        ...                            num_points=16)
        >>> seg.head.link_rein_queries, seg(torch.randn(1, 3, 56, 56)).shape
        (True, torch.Size([1, 3, 56, 56]))
    """

    #: Method options used with this head unless a config says otherwise: Rein links its
    #: tokens to the object queries, as in the paper.
    method_defaults: Mapping[str, Mapping[str, Any]] = {"rein": {"link_queries": True}}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        layers: Sequence[int] | None = None,
        scales: Sequence[float] = (4, 2, 1, 0.5),
        link_rein_queries: bool | None = None,
        neck: str = "learnable",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **head_options: Any,
    ) -> None:
        super().__init__()
        self.mean, self.std = check_normalisation(mean, std)
        self.features = BackboneFeatures(backbone, layers)
        if len(scales) != 4 or len(self.features.layers) != 4:
            raise ValueError(f"the Mask2Former head needs 4 feature layers and 4 neck scales, got layers "
                             f"{self.features.layers} and scales {list(scales)}")
        check_stage_scales(self.features, scales)
        channels = self.features.channels  # one width per map (stages of a hierarchical host differ)
        self.neck = build_neck(neck, channels, scales)
        rein = _linked_rein(backbone)
        if link_rein_queries is None:
            link_rein_queries = rein is not None
        if link_rein_queries:
            if rein is None:
                raise ValueError("link_rein_queries=True needs a backbone with Rein injected (link_queries=True)")
            tokens = rein.config.token_length
            if head_options.setdefault("num_queries", tokens) != tokens:
                raise ValueError(f"num_queries {head_options['num_queries']} differs from Rein's token_length {tokens}")
            head_options.setdefault("query_dim", rein.config.query_dim)
        self.head = Mask2FormerHead(num_classes, self.neck.out_channels, link_rein_queries=bool(link_rein_queries),
                                    **head_options)
        self.num_classes = num_classes
        self.settings = {"num_classes": num_classes, "layers": list(self.features.layers), "head": "mask2former",
                         "scales": [float(s) for s in scales], "link_rein_queries": bool(link_rein_queries), "neck": neck,
                         **{k: v for k, v in head_options.items()}}

    @property
    def backbone(self) -> nn.Module:
        """The host model (registered once, under ``features.model``)."""
        return self.features.model

    def decode_modules(self) -> nn.ModuleDict:
        """The neck and head: the trained parts saved next to the adapters."""
        return nn.ModuleDict({"neck": self.neck, "head": self.head})

    def queries(self) -> Tensor | None:
        """Rein's queries when linked (recomputed from the tokens), else ``None``."""
        if not self.head.link_rein_queries:
            return None
        return _linked_rein(self.backbone).queries()

    def forward_train(self, images: Tensor) -> Mask2FormerOutput:
        """The head's raw output for a batch of normalised images."""
        return self.head(self.neck(self.features(images)), queries=self.queries())

    def loss(self, images: Tensor, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Training loss of a batch (matching + class, mask and dice losses): images
        ``(B, 3, H, W)``, labels ``(B, H, W)``. Set prediction has no per-pixel loss to
        weight, so ``pixel_weights`` (DACS) is refused."""
        if pixel_weights is not None:
            raise PixelWeightsUnsupported(
                "Mask2Former is trained by set prediction (Hungarian matching, mask and dice losses); it has no "
                "per-pixel loss to weight, so DACS' confidence-weighted pseudo labels cannot train it. Use a "
                "per-pixel head (fpn, linear, daformer) for DACS")
        return self.head.loss(self.forward_train(images), labels)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Semantic scores ``(B, K, H, W)`` at the image size or, given ``labels``, the loss.

        Taking the labels in ``forward`` lets a training loop compute the loss through a
        ``DistributedDataParallel`` wrapper (``model(images, labels)``).
        """
        if labels is not None:
            return self.loss(images, labels)
        return self.head.predict(self.forward_train(images), size=images.shape[-2:])

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1,
                         no_decay: str = "authors") -> list[dict]:
        """AdamW groups (:func:`vfm_adapters.seg.optim.parameter_groups`)."""
        return parameter_groups(self, lr, weight_decay, backbone_lr_mult, no_decay)

    @classmethod
    def from_config(cls, backbone: nn.Module, model_config: Mapping[str, Any]) -> "Mask2FormerSegmentor":
        """The segmentor of a training config's ``model`` section (``head_options`` are head fields)."""
        return cls(backbone, int(model_config["num_classes"]), layers=model_config.get("layers"),
                   scales=model_config["scales"], neck=model_config.get("neck") or "learnable",
                   mean=model_config["mean"], std=model_config["std"],
                   **dict(model_config.get("head_options") or {}))

    @staticmethod
    def build_head(name: str, in_channels: Sequence[int], model_config: Mapping[str, Any]) -> "Mask2FormerHead":
        """A Mask2Former head over a features-only encoder's maps; ``head_options.classifier``
        swaps in CLOUDS' CLIP text classifier (:func:`~vfm_adapters.seg.clip_classifier.build_clip_classifier`)."""
        from .clip_classifier import build_clip_classifier

        num_classes = int(model_config["num_classes"])
        options = dict(model_config.get("head_options") or {})
        classifier = options.pop("classifier", None)
        head = Mask2FormerHead(num_classes, in_channels, **options)
        if classifier:
            head.class_predictor = build_clip_classifier(classifier, head.config.hidden_dim, num_classes,
                                                         encode=not model_config.get("decoder_checkpoint"))
        return head

    @classmethod
    def from_settings(cls, backbone: nn.Module, settings: Mapping[str, Any], **options: Any) -> "Mask2FormerSegmentor":
        """Rebuilds a segmentor from its ``settings`` (as saved in ``segmentor.json``); ``options``
        (``mean``, ``std``) are passed on.

        Example:
            >>> import timm, vfm_adapters as va
            >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32,
            ...                         num_heads=2, img_size=56)
            >>> tiny = dict(num_decoder_layers=1, num_heads=2, ffn_dim=32, hidden_dim=32,
            ...             pixel_decoder_layers=1, pixel_decoder_ffn_dim=32, num_points=16, num_queries=4)
            >>> seg = Mask2FormerSegmentor(vit, 3, **tiny)
            >>> again = Mask2FormerSegmentor.from_settings(vit, seg.settings)
            >>> again.load_state_dict(seg.state_dict())
            <All keys matched successfully>
        """
        saved = dict(settings)
        if saved.pop("head", "mask2former") != "mask2former":
            raise ValueError("these settings are not those of a Mask2Former segmentor")
        return cls(backbone, int(saved.pop("num_classes")), **saved, **options)


#: Method options used with this head unless a config says otherwise (kept for existing imports).
MASK2FORMER_METHOD_DEFAULTS = Mask2FormerSegmentor.method_defaults


def build_mask2former_segmentor(model_config: Mapping[str, Any], **head_options: Any) -> Mask2FormerSegmentor:
    """Builds host + adapters + neck + Mask2Former head from a training config's ``model`` section.

    The same as :func:`vfm_adapters.seg.build.build_segmentor` with ``head: mask2former``
    and ``head_options`` given as keyword arguments (tiny sizes in tests; the defaults are
    the paper's head). Rein keeps its query link by default.

    Example:
        >>> seg = build_mask2former_segmentor(
        ...     {"backbone": "vit_small_patch14_dinov2", "backbone_kwargs": {"img_size": 56, "depth": 4,
        ...      "embed_dim": 32, "num_heads": 2}, "methods": ["rein"],
        ...      "method_options": {"rein": {"token_length": 4, "query_dim": 32}}, "num_classes": 3},
        ...     num_decoder_layers=1, num_heads=2, ffn_dim=32, hidden_dim=32, pixel_decoder_layers=1,
        ...     pixel_decoder_ffn_dim=32, num_points=16)
        >>> seg.head.link_rein_queries, seg.head.config.num_queries
        (True, 4)
    """
    from .build import build_segmentor
    from .config import DEFAULTS

    config = {**DEFAULTS["model"], "head": "mask2former", **dict(model_config)}
    if config["head"] != "mask2former":
        raise ValueError(f"build_mask2former_segmentor builds head 'mask2former', the config says {config['head']!r}")
    config["head_options"] = {**dict(config.get("head_options") or {}), **head_options}
    return build_segmentor(config)


# ----------------------------------------------------------------------------- the authors' (mmdet) head
#: Where the authors' mmseg checkpoints keep the Mask2Former head.
OFFICIAL_HEAD_PREFIX = "decode_head."


def official_head_mapping(head: Mask2FormerHead) -> list[tuple[str, str, slice | None]]:
    """``(mmdet name, our name, rows)`` for every tensor of ``head`` (``rows``: a slice of mmdet's tensor).

    mmdet's ``Mask2FormerHead`` (with ``MSDeformAttnPixelDecoder`` and mmcv's
    ``MultiScaleDeformableAttention``, ``MultiheadAttention`` and ``FFN``) names its
    parts differently from transformers' modules; the one non-trivial entry is the
    decoder's self-attention, whose packed ``in_proj`` (3c x c, rows q | k | v) feeds
    transformers' separate ``q_proj``, ``k_proj`` and ``v_proj``. Level order is the
    same in both (lowest resolution first). The Rein head (``ReinMask2FormerHead``)
    has ``querys2feat`` instead of the query tables ``query_embed``/``query_feat``.
    Names are without the ``decode_head.`` prefix; ``criterion`` buffers are derived
    from the config and have no counterpart.

    Example:
        >>> head = Mask2FormerHead(3, [16] * 4, num_queries=4, num_decoder_layers=1, num_heads=2, ffn_dim=32,
        ...                        hidden_dim=32, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32, num_points=16)
        >>> [m for m in official_head_mapping(head) if "self_attn.attn.in_proj_weight" in m[0]][0]
        ('transformer_decoder.layers.0.self_attn.attn.in_proj_weight', 'transformer.decoder.layers.0.self_attn.q_proj.weight', slice(0, 32, None))
    """
    cfg = head.config
    c = cfg.hidden_dim
    pairs: list[tuple[str, str, slice | None]] = []

    def linear(theirs: str, ours: str) -> None:
        pairs.extend([(f"{theirs}.weight", f"{ours}.weight", None), (f"{theirs}.bias", f"{ours}.bias", None)])

    pd = "pixel_decoder"
    for level in range(len(head.pixel_decoder.input_projections)):
        linear(f"{pd}.input_convs.{level}.conv", f"{pd}.input_projections.{level}.0")
        linear(f"{pd}.input_convs.{level}.gn", f"{pd}.input_projections.{level}.1")
    pairs.append((f"{pd}.level_encoding.weight", f"{pd}.level_embed", None))
    for i in range(cfg.pixel_decoder_layers):
        theirs, ours = f"{pd}.encoder.layers.{i}", f"{pd}.encoder.layers.{i}"
        for part in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            linear(f"{theirs}.self_attn.{part}", f"{ours}.self_attn.{part}")
        linear(f"{theirs}.ffn.layers.0.0", f"{ours}.fc1")
        linear(f"{theirs}.ffn.layers.1", f"{ours}.fc2")
        linear(f"{theirs}.norms.0", f"{ours}.self_attn_layer_norm")
        linear(f"{theirs}.norms.1", f"{ours}.final_layer_norm")
    for i in range(head.pixel_decoder.num_fpn_levels):
        # mmdet indexes lateral_convs[i] / output_convs[i] by input level i; transformers names them adapter_/layer_{i+1}.
        pairs.append((f"{pd}.lateral_convs.{i}.conv.weight", f"{pd}.adapter_{i + 1}.0.weight", None))
        linear(f"{pd}.lateral_convs.{i}.gn", f"{pd}.adapter_{i + 1}.1")
        pairs.append((f"{pd}.output_convs.{i}.conv.weight", f"{pd}.layer_{i + 1}.0.weight", None))
        linear(f"{pd}.output_convs.{i}.gn", f"{pd}.layer_{i + 1}.1")
    linear(f"{pd}.mask_feature", f"{pd}.mask_projection")

    for level, projection in enumerate(head.transformer.input_projections):
        if isinstance(projection, nn.Conv2d):  # only when the pixel decoder's width differs from the decoder's
            linear(f"decoder_input_projs.{level}", f"transformer.input_projections.{level}")
    for i in range(cfg.num_decoder_layers):
        theirs, ours = f"transformer_decoder.layers.{i}", f"transformer.decoder.layers.{i}"
        pairs.append((f"{theirs}.cross_attn.attn.in_proj_weight", f"{ours}.cross_attn.in_proj_weight", None))
        pairs.append((f"{theirs}.cross_attn.attn.in_proj_bias", f"{ours}.cross_attn.in_proj_bias", None))
        linear(f"{theirs}.cross_attn.attn.out_proj", f"{ours}.cross_attn.out_proj")
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(index * c, (index + 1) * c)
            pairs.append((f"{theirs}.self_attn.attn.in_proj_weight", f"{ours}.self_attn.{name}.weight", rows))
            pairs.append((f"{theirs}.self_attn.attn.in_proj_bias", f"{ours}.self_attn.{name}.bias", rows))
        linear(f"{theirs}.self_attn.attn.out_proj", f"{ours}.self_attn.out_proj")
        linear(f"{theirs}.norms.0", f"{ours}.cross_attn_layer_norm")
        linear(f"{theirs}.norms.1", f"{ours}.self_attn_layer_norm")
        linear(f"{theirs}.norms.2", f"{ours}.final_layer_norm")
        linear(f"{theirs}.ffn.layers.0.0", f"{ours}.fc1")
        linear(f"{theirs}.ffn.layers.1", f"{ours}.fc2")
    linear("transformer_decoder.post_norm", "transformer.decoder.layernorm")
    pairs.append(("level_embed.weight", "transformer.level_embed.weight", None))
    for index, theirs in enumerate(("mask_embed.0", "mask_embed.2", "mask_embed.4")):
        linear(theirs, f"transformer.decoder.mask_predictor.mask_embedder.{index}.0")
    linear("cls_embed", "class_predictor")
    if cfg.link_rein_queries:
        linear("querys2feat", "transformer.query_link")
    else:
        pairs.append(("query_embed.weight", "transformer.queries_embedder.weight", None))
        pairs.append(("query_feat.weight", "transformer.queries_features.weight", None))
    return pairs


def load_official_head(segmentor: nn.Module, state_dict: Mapping[str, Tensor] | str, *,
                       prefix: str = OFFICIAL_HEAD_PREFIX) -> nn.Module:
    """Loads the authors' mmdet/mmseg Mask2Former head (``decode_head.*``) into our head.

    Every name and shape is checked before anything is copied: a missing or unexpected
    ``decode_head.`` key, or a tensor of another shape (another class count, width or
    number of layers), raises with the offending names and the model is unchanged.
    The mapping is :func:`official_head_mapping`.

    Args:
        segmentor: A :class:`Mask2FormerSegmentor` (its ``head``) or a :class:`Mask2FormerHead`.
        state_dict: The authors' checkpoint (a path, a mmengine checkpoint dict or a
            state dict); keys outside ``prefix`` are ignored.
        prefix: Where the head's tensors are (``decode_head.``).

    Returns:
        ``segmentor``.

    Example:
        >>> head = Mask2FormerHead(3, [16] * 4, num_queries=4, num_decoder_layers=1, num_heads=2, ffn_dim=32,
        ...                        hidden_dim=32, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32, num_points=16)
        >>> ours = head.state_dict()
        >>> theirs = {}
        >>> for their_name, our_name, rows in official_head_mapping(head):
        ...     value = ours[our_name] + 1
        ...     if rows is None:
        ...         theirs["decode_head." + their_name] = value
        ...     else:
        ...         packed = theirs.setdefault("decode_head." + their_name, torch.zeros(3 * 32, *value.shape[1:]))
        ...         packed[rows] = value
        >>> torch.equal(load_official_head(head, theirs).class_predictor.bias, ours["class_predictor.bias"])
        True
    """
    from ..official import OfficialCheckpointError, read_official_checkpoint

    head = segmentor.head if isinstance(segmentor, Mask2FormerSegmentor) else segmentor
    if not isinstance(head, Mask2FormerHead):
        raise TypeError(f"expected a Mask2FormerSegmentor or Mask2FormerHead, got {type(segmentor).__name__}")
    state = read_official_checkpoint(state_dict)
    theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not theirs:
        raise OfficialCheckpointError(f"no head parameters: no key starts with {prefix!r}")
    mapping = official_head_mapping(head)
    ours = dict(head.state_dict(keep_vars=True))
    needed = {name for name, _, _ in mapping}
    missing, unexpected = sorted(needed - set(theirs)), sorted(set(theirs) - needed)
    if missing or unexpected:
        hint = ""
        if any(k.startswith("querys2feat") for k in unexpected) or any(k.startswith("querys2feat") for k in missing):
            hint = (" (querys2feat is the Rein head's query link: build the head with Rein's queries linked, "
                    "link_rein_queries=True, for a ReinMask2FormerHead checkpoint, and without for a plain Mask2FormerHead)")
        raise OfficialCheckpointError(
            f"the checkpoint's head does not match this head: missing {[prefix + k for k in missing[:8]]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {[prefix + k for k in unexpected[:8]]}"
            f"{'...' if len(unexpected) > 8 else ''}{hint}. Check num_decoder_layers, pixel_decoder_layers and "
            "link_rein_queries"
        )
    wrong = []
    for their_name, our_name, rows in mapping:
        value = theirs[their_name] if rows is None else theirs[their_name][rows]
        if rows is not None and theirs[their_name].shape[0] != 3 * head.config.hidden_dim:
            wrong.append(f"{prefix}{their_name} {tuple(theirs[their_name].shape)} is not a packed q|k|v projection "
                         f"of width {head.config.hidden_dim}")
        elif tuple(value.shape) != tuple(ours[our_name].shape):
            wrong.append(f"{prefix}{their_name} {tuple(value.shape)} -> {our_name} {tuple(ours[our_name].shape)}")
    if wrong:
        raise OfficialCheckpointError(
            "the checkpoint's head has other shapes than this head (class count, width, FFN sizes?): " + "; ".join(wrong[:6])
        )
    with torch.no_grad():
        for their_name, our_name, rows in mapping:
            value = theirs[their_name] if rows is None else theirs[their_name][rows]
            ours[our_name].copy_(value)
    return segmentor


def export_official_head(segmentor: nn.Module, *, prefix: str = OFFICIAL_HEAD_PREFIX) -> dict[str, Tensor]:
    """Our head's tensors under mmdet's names (``decode_head.*``), the inverse of :func:`load_official_head`.

    The decoder's separate ``q_proj``/``k_proj``/``v_proj`` are packed back into
    mmdet's ``in_proj`` (rows q | k | v), so ``load_official_head(export_official_head(h))``
    gives back bit-identical tensors.

    Example:
        >>> head = Mask2FormerHead(3, [16] * 4, num_queries=4, num_decoder_layers=1, num_heads=2, ffn_dim=32,
        ...                        hidden_dim=32, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32, num_points=16)
        >>> theirs = export_official_head(head)
        >>> tuple(theirs["decode_head.transformer_decoder.layers.0.self_attn.attn.in_proj_weight"].shape)
        (96, 32)
    """
    head = segmentor.head if isinstance(segmentor, Mask2FormerSegmentor) else segmentor
    if not isinstance(head, Mask2FormerHead):
        raise TypeError(f"expected a Mask2FormerSegmentor or Mask2FormerHead, got {type(segmentor).__name__}")
    ours = head.state_dict()
    packed: dict[str, list[tuple[slice, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    for their_name, our_name, rows in official_head_mapping(head):
        value = ours[our_name].detach().clone()
        if rows is None:
            out[prefix + their_name] = value
        else:
            packed.setdefault(their_name, []).append((rows, value))
    for their_name, parts in packed.items():
        parts.sort(key=lambda part: part[0].start)
        out[prefix + their_name] = torch.cat([value for _, value in parts], dim=0)
    return out
