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


# ----------------------------------------------------------------------------- mmdet's forward, restated in float64
def sine_position(batch, height, width, features, dtype=torch.float64):
    """mmdet's SinePositionalEncoding(num_feats=features, normalize=True) on an unpadded map."""
    ones = torch.ones(batch, height, width, dtype=dtype)
    y, x = ones.cumsum(1), ones.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * torch.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * torch.pi
    dim_t = 10000 ** (2 * (torch.arange(features, dtype=dtype) // 2) / features)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def deformable_attention(sd, name, query, value, position, reference, shapes, heads, points):
    """mmcv's MultiScaleDeformableAttention (its PyTorch path), with the residual."""
    w = lambda part: (sd[f"{name}.{part}.weight"], sd[f"{name}.{part}.bias"])  # noqa: E731
    batch, count, width = query.shape
    levels = len(shapes)
    q = query + position
    v = torch.nn.functional.linear(value, *w("value_proj")).view(batch, count, heads, width // heads)
    offsets = torch.nn.functional.linear(q, *w("sampling_offsets")).view(batch, count, heads, levels, points, 2)
    weights = torch.nn.functional.linear(q, *w("attention_weights")).view(batch, count, heads, levels * points)
    weights = weights.softmax(-1).view(batch, count, heads, levels, points)
    normaliser = torch.tensor([[wd, ht] for ht, wd in shapes], dtype=query.dtype)
    locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    grids = 2 * locations - 1
    sampled, start = [], 0
    for level, (ht, wd) in enumerate(shapes):
        v_l = v[:, start:start + ht * wd].flatten(2).transpose(1, 2).reshape(batch * heads, width // heads, ht, wd)
        start += ht * wd
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(torch.nn.functional.grid_sample(v_l, grid, mode="bilinear", padding_mode="zeros",
                                                       align_corners=False))
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, count, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, width, count).transpose(1, 2)
    return query + torch.nn.functional.linear(out, *w("output_proj"))


def mmcv_ffn(sd, name, x):
    hidden = torch.relu(torch.nn.functional.linear(x, sd[f"{name}.layers.0.0.weight"], sd[f"{name}.layers.0.0.bias"]))
    return x + torch.nn.functional.linear(hidden, sd[f"{name}.layers.1.weight"], sd[f"{name}.layers.1.bias"])


def layer_norm(sd, name, x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def group_norm(sd, name, x):
    return torch.nn.functional.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"])


def mmcv_attention(sd, name, query, key, value, query_pos, key_pos, mask, heads):
    """mmcv's MultiheadAttention: torch's attention on (query + pos, key + pos, value), plus the residual."""
    out, _ = torch.nn.functional.multi_head_attention_forward(
        (query + query_pos).transpose(0, 1), (key + key_pos).transpose(0, 1), value.transpose(0, 1),
        query.shape[-1], heads, sd[f"{name}.attn.in_proj_weight"], sd[f"{name}.attn.in_proj_bias"], None, None, False,
        0.0, sd[f"{name}.attn.out_proj.weight"], sd[f"{name}.attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask)
    return query + out.transpose(0, 1)


def mmdet_rein_head_forward(sd, feats, queries, heads=HEADS, points=POINTS, levels=LEVELS):
    """ReinMask2FormerHead.forward (mmdet Mask2FormerHead + MSDeformAttnPixelDecoder), float64."""
    sd = {k[len("decode_head."):]: v.double() for k, v in sd.items()}
    pd = "pixel_decoder"
    batch, width = feats[0].shape[0], sd[f"{pd}.mask_feature.bias"].shape[0]
    strides = [4, 8, 16, 32]
    inputs, positions, shapes, references = [], [], [], []
    for i in range(levels):  # input_convs[i] takes level 3 - i (lowest resolution first)
        level = len(feats) - 1 - i
        feat = feats[level]
        projected = torch.nn.functional.conv2d(feat, sd[f"{pd}.input_convs.{i}.conv.weight"],
                                               sd[f"{pd}.input_convs.{i}.conv.bias"])
        projected = group_norm(sd, f"{pd}.input_convs.{i}.gn", projected)
        ht, wd = feat.shape[-2:]
        position = sine_position(batch, ht, wd, width // 2) + sd[f"{pd}.level_encoding.weight"][i].view(1, -1, 1, 1)
        ys, xs = torch.meshgrid((torch.arange(ht, dtype=torch.float64) + 0.5) * strides[level],
                                (torch.arange(wd, dtype=torch.float64) + 0.5) * strides[level], indexing="ij")
        reference = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1) / torch.tensor(
            [wd * strides[level], ht * strides[level]], dtype=torch.float64)
        inputs.append(projected.flatten(2).transpose(1, 2))
        positions.append(position.flatten(2).transpose(1, 2))
        shapes.append((ht, wd))
        references.append(reference)
    query, position = torch.cat(inputs, 1), torch.cat(positions, 1)
    reference = torch.cat(references, 0)[None, :, None].repeat(batch, 1, levels, 1)
    for i in range(ENC_LAYERS):
        layer = f"{pd}.encoder.layers.{i}"
        query = deformable_attention(sd, f"{layer}.self_attn", query, query, position, reference, shapes, heads, points)
        query = layer_norm(sd, f"{layer}.norms.0", query)
        query = layer_norm(sd, f"{layer}.norms.1", mmcv_ffn(sd, f"{layer}.ffn", query))
    memory = query.transpose(1, 2)
    outs, start = [], 0
    for ht, wd in shapes:
        outs.append(memory[..., start:start + ht * wd].reshape(batch, width, ht, wd))
        start += ht * wd
    lateral = group_norm(sd, f"{pd}.lateral_convs.0.gn",
                         torch.nn.functional.conv2d(feats[0], sd[f"{pd}.lateral_convs.0.conv.weight"]))
    fused = lateral + torch.nn.functional.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear",
                                                      align_corners=False)
    fused = torch.nn.functional.conv2d(fused, sd[f"{pd}.output_convs.0.conv.weight"], padding=1)
    outs.append(torch.relu(group_norm(sd, f"{pd}.output_convs.0.gn", fused)))
    memories = outs[:levels]
    mask_features = torch.nn.functional.conv2d(outs[-1], sd[f"{pd}.mask_feature.weight"], sd[f"{pd}.mask_feature.bias"])

    decoder_inputs = [m.flatten(2).transpose(1, 2) + sd["level_embed.weight"][i].view(1, 1, -1) for i, m in enumerate(memories)]
    decoder_positions = [sine_position(batch, *m.shape[-2:], width // 2).flatten(2).transpose(1, 2) for m in memories]
    query_embed = queries.double()[None].expand(batch, -1, -1)
    query_feat = torch.nn.functional.linear(query_embed, sd["querys2feat.weight"], sd["querys2feat.bias"])

    def predict(decoder_out, size):
        decoder_out = layer_norm(sd, "transformer_decoder.post_norm", decoder_out)
        cls_pred = torch.nn.functional.linear(decoder_out, sd["cls_embed.weight"], sd["cls_embed.bias"])
        embed = decoder_out
        for index in (0, 2, 4):
            embed = torch.nn.functional.linear(embed, sd[f"mask_embed.{index}.weight"], sd[f"mask_embed.{index}.bias"])
            embed = torch.relu(embed) if index < 4 else embed
        mask_pred = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
        attn = torch.nn.functional.interpolate(mask_pred, size, mode="bilinear", align_corners=False)
        attn = attn.flatten(2).unsqueeze(1).repeat((1, heads, 1, 1)).flatten(0, 1).sigmoid() < 0.5
        return cls_pred, mask_pred, attn

    predictions = []
    cls_pred, mask_pred, attn_mask = predict(query_feat, memories[0].shape[-2:])
    predictions.append((cls_pred, mask_pred))
    for i in range(DEC_LAYERS):
        level = i % levels
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        layer = f"transformer_decoder.layers.{i}"
        query_feat = mmcv_attention(sd, f"{layer}.cross_attn", query_feat, decoder_inputs[level], decoder_inputs[level],
                                    query_embed, decoder_positions[level], attn_mask, heads)
        query_feat = layer_norm(sd, f"{layer}.norms.0", query_feat)
        query_feat = mmcv_attention(sd, f"{layer}.self_attn", query_feat, query_feat, query_feat, query_embed, query_embed,
                                    None, heads)
        query_feat = layer_norm(sd, f"{layer}.norms.1", query_feat)
        query_feat = layer_norm(sd, f"{layer}.norms.2", mmcv_ffn(sd, f"{layer}.ffn", query_feat))
        cls_pred, mask_pred, attn_mask = predict(query_feat, memories[(i + 1) % levels].shape[-2:])
        predictions.append((cls_pred, mask_pred))
    return predictions


def test_the_loaded_head_computes_what_mmdets_head_computes_in_float64():
    generator = torch.Generator().manual_seed(21)
    theirs = {name: torch.randn(shape, generator=generator, dtype=torch.float64) * (0.3 if len(shape) > 1 else 0.1)
              for name, shape in mmdet_shapes(True).items()}
    for name in [k for k in theirs if k.endswith(("gn.weight", "norms.0.weight", "norms.1.weight", "norms.2.weight",
                                                   "post_norm.weight"))]:
        theirs[name] = 1 + theirs[name]
    head = load_official_head(Mask2FormerHead(CLASSES, [IN] * 4, link_rein_queries=True, **TINY).double().eval(), theirs)
    size = 64
    feats = [torch.randn(2, IN, size // s, size // s, generator=generator, dtype=torch.float64) for s in (4, 8, 16, 32)]
    queries = torch.randn(QUERIES, C, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        ours = head(feats, queries=queries)
    expected = mmdet_rein_head_forward(theirs, feats, queries)
    got = [*ours.auxiliary, (ours.class_logits, ours.mask_logits)]
    assert len(got) == len(expected) == DEC_LAYERS + 1
    for (our_cls, our_mask), (their_cls, their_mask) in zip(got, expected):
        torch.testing.assert_close(our_cls, their_cls, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(our_mask, their_mask, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rein_queries", [True, False])
def test_export_gives_mmdets_names_and_shapes_and_round_trips_bit_identically(rein_queries):
    from vfm_adapters.seg.mask2former import export_official_head

    theirs = mmdet_state(rein_queries)
    head = load_official_head(Mask2FormerHead(CLASSES, [IN] * 4, link_rein_queries=rein_queries, **TINY), theirs)
    exported = export_official_head(head)
    assert set(exported) == set(theirs)
    assert all(torch.equal(exported[k], theirs[k]) for k in theirs)
