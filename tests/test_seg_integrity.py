"""No silently wrong results: sliding windows, label ranges, divergence, run directories, resume."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vfm_adapters as va
from vfm_adapters.seg.heads import Segmentor
from vfm_adapters.seg.inference import evaluate, slide_inference, whole_inference, window_starts
from vfm_adapters.seg.training import ConfigError, load_config


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------ sliding windows (item 11)
@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 300), crop=st.integers(1, 120), stride=st.integers(1, 120))
def test_windows_cover_every_pixel_and_end_flush(length, crop, stride):
    if stride > crop:
        with pytest.raises(ValueError, match="larger than the crop"):
            window_starts(length, crop, stride)
        return
    starts = window_starts(length, crop, stride)
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        assert 0 <= start and (start + crop <= length or start == 0)
        covered[start : start + crop] = True
    assert covered.all()
    assert min(starts[-1] + crop, length) == length  # the last window is flush with the border


@pytest.mark.parametrize("crop, stride", [(0, 5), (8, 0), (-4, 2), (8, -3), (4, 9)])
def test_non_positive_or_gapped_windows_are_refused(crop, stride):
    model = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match="positive|larger than the crop"):
        slide_inference(model, torch.randn(1, 3, 20, 20), 2, crop=crop, stride=stride)
    with pytest.raises(ValueError, match="positive|larger than the crop"):
        evaluate(model, [], 2, mode="slide", crop=crop, stride=stride)
    with pytest.raises(ConfigError, match="eval"):
        load_config({"eval": {"crop": crop, "stride": stride}})


def test_a_crop_larger_than_the_image_is_one_unpadded_window():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=32,
                            patch_size=8, dynamic_img_size=True)
    model = Segmentor(va.inject_rein(vit, token_length=4, rank=2, link_queries=False), 4, head_channels=8).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    small = torch.randn(1, 3, 24, 32)
    slid = slide_inference(model, small, 4, crop=48, stride=21)
    assert seen == [(1, 3, 24, 32)]  # one window, the image itself: no zero padding seen by the model
    assert torch.equal(slid, whole_inference(model, small))
    # larger along one axis only: windows are crop x image-height, none padded
    seen.clear()
    wide = slide_inference(model, torch.randn(1, 3, 32, 64), 4, crop=48, stride=16)
    assert seen == [(2, 3, 32, 48)] and torch.isfinite(wide).all()
