"""The authors' (mmdet/mmseg) Mask2Former head <-> ours: tensor names, loading and export.

The Rein authors' checkpoints keep the head under ``decode_head.`` with mmdet's names;
:func:`official_head_mapping` pairs them with our head's tensors,
:func:`load_official_head` loads them (checked before anything is copied) and
:func:`export_official_head` writes ours back under their names.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .head import Mask2FormerHead
from .segmentor import Mask2FormerSegmentor

__all__ = ["OFFICIAL_HEAD_PREFIX", "export_official_head", "load_official_head", "official_head_mapping"]

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
    from ...official import OfficialCheckpointError, read_official_checkpoint

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
