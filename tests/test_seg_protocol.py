"""The authors' training and evaluation protocol (Rein paper configs): neck, optimiser
groups, train resize, photometric hue range, patch conversion, schedules, Mapillary,
and the whole-segmentor report over every paper config."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vfm_adapters.seg.features import InterpolationNeck, MultiLevelNeck, MultiScaleNeck, build_neck
from vfm_adapters.seg.training import DEFAULTS, build_segmentor


TINY_M2F = dict(num_decoder_layers=1, num_heads=2, ffn_dim=32, hidden_dim=32, pixel_decoder_layers=1,
                pixel_decoder_ffn_dim=32, num_points=16)


def tiny_model_config(**overrides):
    config = {**DEFAULTS["model"], "backbone": "vit_small_patch14_dinov2", "backbone_kwargs": {"img_size": 64, "patch_size": 16, "depth": 4,
              "embed_dim": 32, "num_heads": 2}, "methods": ["rein"], "num_classes": 3, "head_channels": 16}
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- 1. neck
def test_interpolation_neck_is_parameter_free_bilinear():
    neck = InterpolationNeck(8)
    assert sum(p.numel() for p in neck.parameters()) == 0
    maps = [torch.randn(2, 8, 5, 7) for _ in range(4)]
    out = neck(maps)
    for feature, result, scale in zip(maps, out, (4, 2, 1, 0.5)):
        expected = feature if scale == 1 else F.interpolate(feature, scale_factor=scale, mode="bilinear",
                                                            align_corners=False)
        assert torch.equal(result, expected)
    assert [tuple(o.shape[-2:]) for o in out] == [(20, 28), (10, 14), (5, 7), (2, 3)]


def test_multilevel_neck_matches_mmseg_structure():
    channels = 8
    neck = MultiLevelNeck(channels)
    assert sum(p.numel() for p in neck.parameters()) == 4 * (channels * channels + channels) + 4 * (9 * channels * channels + channels)
    x = torch.randn(1, channels, 4, 4)
    out = neck([x] * 4)
    lateral, conv = neck.lateral_convs[0], neck.convs[0]
    expected = conv(F.interpolate(lateral(x), scale_factor=4.0, mode="bilinear", align_corners=False))
    assert torch.allclose(out[0], expected)
    assert all(float(c.bias.abs().sum()) == 0 for c in neck.convs)


def test_learnable_neck_kept_and_unknown_neck_rejected():
    assert isinstance(build_neck("learnable", 8), MultiScaleNeck)
    assert sum(p.numel() for p in MultiScaleNeck(1024).parameters()) == 12_588_032  # ~12.6M, not the paper's
    try:
        build_neck("fpn", 8)
    except ValueError as error:
        assert "interpolate" in str(error)
    else:
        raise AssertionError("an unknown neck must be refused")


def test_segmentors_take_the_neck_from_the_config():
    fpn = build_segmentor(tiny_model_config(neck="interpolate"))
    assert isinstance(fpn.neck, InterpolationNeck) and fpn.settings["neck"] == "interpolate"
    assert fpn(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    m2f = build_segmentor(tiny_model_config(neck="interpolate", head="mask2former", head_options=dict(TINY_M2F),
                                            method_options={"rein": {"token_length": 4, "query_dim": 32}}))
    assert isinstance(m2f.neck, InterpolationNeck) and sum(p.numel() for p in m2f.neck.parameters()) == 0
    assert m2f(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    old = build_segmentor(tiny_model_config())  # default stays the library's learnable neck
    assert isinstance(old.neck, MultiScaleNeck)
