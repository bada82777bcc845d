"""The Mask2Former decode head: transformers' pixel decoder and masked-attention decoder.

:class:`Mask2FormerHead` puts together transformers' ``Mask2FormerPixelDecoder``, a
``Mask2FormerTransformerModule`` subclass whose queries may come from Rein
(``_QueryLinkedTransformerModule``), a class predictor and ``Mask2FormerLoss``, and
initialises them as Mask2Former does. The package docstring
(:mod:`vfm_adapters.seg.mask2former`) describes the head and Rein's query link.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerTransformerModule,
)

from .config import Mask2FormerHeadConfig, Mask2FormerOutput, semantic_inference, semantic_targets

__all__ = ["Mask2FormerHead"]


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
