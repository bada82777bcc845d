"""The authors' mmdet Mask2Former head (``decode_head.*``) loaded into the transformers-based head.

The state dict is written here from mmdet's names and shapes (``Mask2FormerHead``,
``MSDeformAttnPixelDecoder``, mmcv's ``MultiScaleDeformableAttention``,
``MultiheadAttention`` and ``FFN``, the Rein head's ``querys2feat``), independently of
the library's mapping, with every element a distinct number, so the test can check
that each of them lands in exactly one place of our head.
"""

from __future__ import annotations

import pytest
import torch

from vfm_adapters.official import OfficialCheckpointError
from vfm_adapters.seg.mask2former import Mask2FormerHead, load_official_head

C, IN, CLASSES, QUERIES, HEADS, FFN, ENC_FFN, ENC_LAYERS, DEC_LAYERS, LEVELS, POINTS = 32, 16, 3, 4, 2, 64, 48, 2, 3, 3, 4
TINY = dict(num_queries=QUERIES, num_decoder_layers=DEC_LAYERS, num_heads=HEADS, ffn_dim=FFN, hidden_dim=C,
            pixel_decoder_layers=ENC_LAYERS, pixel_decoder_ffn_dim=ENC_FFN, num_points=16)


def mmdet_shapes(rein_queries: bool, *, C=C, IN=IN, CLASSES=CLASSES, QUERIES=QUERIES, HEADS=HEADS, FFN=FFN,
                 ENC_FFN=ENC_FFN, ENC_LAYERS=ENC_LAYERS, DEC_LAYERS=DEC_LAYERS) -> dict[str, tuple[int, ...]]:
    """mmdet's names and shapes (defaults: the tiny head of these tests)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, out_features, in_features):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out_features, in_features), (out_features,)

    def norm(name):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (C,), (C,)

    pd = "decode_head.pixel_decoder"
    for level in range(LEVELS):  # ConvModule(conv + gn), strides 32, 16, 8
        shapes[f"{pd}.input_convs.{level}.conv.weight"] = (C, IN, 1, 1)
        shapes[f"{pd}.input_convs.{level}.conv.bias"] = (C,)
        norm(f"{pd}.input_convs.{level}.gn")
    for i in range(ENC_LAYERS):  # DeformableDetrTransformerEncoderLayer
        layer = f"{pd}.encoder.layers.{i}"
        linear(f"{layer}.self_attn.sampling_offsets", HEADS * LEVELS * POINTS * 2, C)
        linear(f"{layer}.self_attn.attention_weights", HEADS * LEVELS * POINTS, C)
        linear(f"{layer}.self_attn.value_proj", C, C)
        linear(f"{layer}.self_attn.output_proj", C, C)
        linear(f"{layer}.ffn.layers.0.0", ENC_FFN, C)
        linear(f"{layer}.ffn.layers.1", C, ENC_FFN)
        norm(f"{layer}.norms.0")
        norm(f"{layer}.norms.1")
    shapes[f"{pd}.level_encoding.weight"] = (LEVELS, C)
    shapes[f"{pd}.lateral_convs.0.conv.weight"] = (C, IN, 1, 1)  # bias=False with a norm
    norm(f"{pd}.lateral_convs.0.gn")
    shapes[f"{pd}.output_convs.0.conv.weight"] = (C, C, 3, 3)
    norm(f"{pd}.output_convs.0.gn")
    shapes[f"{pd}.mask_feature.weight"], shapes[f"{pd}.mask_feature.bias"] = (C, C, 1, 1), (C,)
    for i in range(DEC_LAYERS):  # Mask2FormerTransformerDecoderLayer
        layer = f"decode_head.transformer_decoder.layers.{i}"
        for attention in ("self_attn", "cross_attn"):
            shapes[f"{layer}.{attention}.attn.in_proj_weight"] = (3 * C, C)
            shapes[f"{layer}.{attention}.attn.in_proj_bias"] = (3 * C,)
            linear(f"{layer}.{attention}.attn.out_proj", C, C)
        linear(f"{layer}.ffn.layers.0.0", FFN, C)
        linear(f"{layer}.ffn.layers.1", C, FFN)
        for n in range(3):
            norm(f"{layer}.norms.{n}")
    norm("decode_head.transformer_decoder.post_norm")
    shapes["decode_head.level_embed.weight"] = (LEVELS, C)
    linear("decode_head.cls_embed", CLASSES + 1, C)
    for index in (0, 2, 4):
        linear(f"decode_head.mask_embed.{index}", C, C)
    if rein_queries:
        linear("decode_head.querys2feat", C, C)
    else:
        shapes["decode_head.query_embed.weight"] = (QUERIES, C)
        shapes["decode_head.query_feat.weight"] = (QUERIES, C)
    return shapes


def mmdet_state(rein_queries: bool, **sizes) -> dict[str, torch.Tensor]:
    """Every element a distinct integer (exact in float32)."""
    state, start = {}, 1
    for name, shape in mmdet_shapes(rein_queries, **sizes).items():
        count = int(torch.Size(shape).numel())
        state[name] = torch.arange(start, start + count, dtype=torch.float32).reshape(shape)
        start += count
    return state


def our_tensors(head: Mask2FormerHead) -> dict[str, torch.Tensor]:
    return {k: v for k, v in head.state_dict().items() if not k.startswith("criterion.")}


@pytest.mark.parametrize("rein_queries", [True, False])
def test_every_tensor_of_our_head_is_assigned_exactly_once(rein_queries):
    torch.manual_seed(0)
    head = Mask2FormerHead(CLASSES, [IN] * 4, link_rein_queries=rein_queries, **TINY)
    theirs = mmdet_state(rein_queries)
    load_official_head(head, {"state_dict": {**theirs, "backbone.reins.scale": torch.tensor(1.0)}, "meta": {}})
    ours = torch.cat([v.flatten() for v in our_tensors(head).values()]).sort().values
    all_theirs = torch.cat([v.flatten() for v in theirs.values()]).sort().values
    # distinct source values + equal multisets: a bijection between their elements and our slots
    assert torch.equal(ours, all_theirs)
    s = our_tensors(head)
    assert torch.equal(s["class_predictor.weight"], theirs["decode_head.cls_embed.weight"])
    packed = theirs["decode_head.transformer_decoder.layers.1.self_attn.attn.in_proj_weight"]
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):  # torch's packing order: q | k | v
        assert torch.equal(s[f"transformer.decoder.layers.1.self_attn.{name}.weight"], packed[index * C:(index + 1) * C])
    assert torch.equal(s["transformer.decoder.layers.2.cross_attn.in_proj_weight"],
                       theirs["decode_head.transformer_decoder.layers.2.cross_attn.attn.in_proj_weight"])
    assert torch.equal(s["transformer.decoder.layers.0.cross_attn_layer_norm.weight"],
                       theirs["decode_head.transformer_decoder.layers.0.norms.0.weight"])
    assert torch.equal(s["pixel_decoder.level_embed"], theirs["decode_head.pixel_decoder.level_encoding.weight"])
    assert torch.equal(s["pixel_decoder.input_projections.0.0.weight"],
                       theirs["decode_head.pixel_decoder.input_convs.0.conv.weight"])
    assert torch.equal(s["transformer.decoder.mask_predictor.mask_embedder.2.0.weight"],
                       theirs["decode_head.mask_embed.4.weight"])
    if rein_queries:
        assert torch.equal(s["transformer.query_link.weight"], theirs["decode_head.querys2feat.weight"])
    else:
        assert torch.equal(s["transformer.queries_features.weight"], theirs["decode_head.query_feat.weight"])
    out = head.eval()([torch.randn(1, IN, 64 // st, 64 // st) for st in (4, 8, 16, 32)],
               queries=torch.randn(QUERIES, C) * 1e-3 if rein_queries else None)
    assert out.class_logits.shape == (1, QUERIES, CLASSES + 1)


@pytest.mark.parametrize("change, match", [
    ("missing", "missing \\['decode_head.transformer_decoder.layers.2.norms.1.bias'\\]"),
    ("extra", "unexpected \\['decode_head.auxiliary.weight'\\]"),
    ("classes", "cls_embed"),
    ("plain into rein", "querys2feat"),
    ("no head", "no head parameters"),
])
def test_bad_head_checkpoints_are_refused_and_the_head_is_unchanged(change, match):
    head = Mask2FormerHead(CLASSES, [IN] * 4, link_rein_queries=True, **TINY)
    theirs = mmdet_state(True)
    if change == "missing":
        del theirs["decode_head.transformer_decoder.layers.2.norms.1.bias"]
    elif change == "extra":
        theirs["decode_head.auxiliary.weight"] = torch.zeros(2)
    elif change == "classes":
        theirs["decode_head.cls_embed.weight"] = torch.zeros(CLASSES + 3, C)
        theirs["decode_head.cls_embed.bias"] = torch.zeros(CLASSES + 3)
    elif change == "plain into rein":
        theirs = mmdet_state(False)
    elif change == "no head":
        theirs = {"backbone.reins.scale": torch.tensor(1.0)}
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official_head(head, theirs)
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())


def test_the_released_paper_head_fits_by_names_and_shapes():
    """The released DINOv2-L head (mmdet sizes of the authors' config) against our default head, on meta."""
    from vfm_adapters.seg.mask2former import official_head_mapping

    with torch.device("meta"):
        head = Mask2FormerHead(19, [1024] * 4, link_rein_queries=True)
    theirs = mmdet_shapes(True, C=256, IN=1024, CLASSES=19, QUERIES=100, HEADS=8, FFN=2048, ENC_FFN=1024,
                          ENC_LAYERS=6, DEC_LAYERS=9)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    mapping = official_head_mapping(head)
    assert {"decode_head." + name for name, _, _ in mapping} == set(theirs)
    assert {our for _, our, _ in mapping} == {k for k in ours if not k.startswith("criterion.")}
    for name, our, rows in mapping:
        shape = theirs["decode_head." + name]
        expected = shape if rows is None else (rows.stop - rows.start, *shape[1:])
        assert expected == ours[our], (name, our)
