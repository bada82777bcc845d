"""The adaptation recipes as the authors run them (DACS/DAFormer, CLOUDS): issue 15."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from vfm_adapters.adaptation import SamRefineConfig, SamRefiner
from vfm_adapters.adaptation.sam_refine import DEFAULT_SAM

transformers.logging.set_verbosity_error()


def tiny_sam(seed: int = 0) -> transformers.SamModel:
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(seed)
    config = transformers.SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8, window_size=2, global_attn_indexes=[0], mlp_dim=16,
                                      num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=32, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=16, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    return transformers.SamModel(config).eval()


# ----------------------------------------------------------------------------- 1. SAM refinement
def test_sam_falls_back_to_the_teacher_label_when_no_component_qualifies(monkeypatch):
    refiner = SamRefiner(tiny_sam(), SamRefineConfig(min_component_pixels=5000))
    label = torch.randint(0, 4, (16, 16))
    label[0] = 255
    monkeypatch.setattr(refiner, "prompt", lambda *a: pytest.fail("SAM must not be prompted without components"))
    refined = refiner.refine(torch.zeros(3, 16, 16), label)
    assert torch.equal(refined, label) and refined.dtype == torch.long
    assert refined.data_ptr() != label.data_ptr()  # a copy: refining never aliases the teacher's tensor


def test_sam_points_are_x_times_scale_on_a_known_grid(monkeypatch):
    sam = tiny_sam()
    refiner = SamRefiner(sam, SamRefineConfig(min_component_pixels=1))
    seen = {}
    forward = sam.forward

    def spy(*args, **kwargs):
        seen["points"] = kwargs["input_points"].clone()
        return forward(*args, **kwargs)

    monkeypatch.setattr(sam, "forward", spy)
    # a 24 x 48 image into SAM's 32 x 32 input: scale 32 / 48, resized to 16 x 32
    grid = np.array([[[0.0, 0.0], [3.0, 6.0], [47.0, 23.0]], [[12.0, 9.0], [24.0, 12.0], [6.0, 3.0]]])
    refiner.prompt(torch.zeros(3, 24, 48), grid)
    expected = torch.tensor(grid, dtype=torch.float32) * torch.tensor([32 / 48, 16 / 24])
    assert torch.allclose(seen["points"][0], expected)
    assert seen["points"][0, 0, 1].tolist() == [2.0, 4.0]  # (3, 6) -> (2, 4): no +0.5 before the encoder's own


def test_sam_default_is_a_small_sam_loaded_on_first_use():
    refiner = SamRefiner.from_pretrained(config={"min_component_pixels": 10})
    assert refiner.name == DEFAULT_SAM == "facebook/sam-vit-base" and refiner._sam is None  # nothing loaded yet
    from vfm_adapters.adaptation import build_trainer, load_adaptation_config

    cfg = load_adaptation_config({"recipe": "self_training", "sam": {"enabled": True},
                                  "model": {"kind": "features", "encoder": "convnext_atto", "num_classes": 3,
                                            "head": "linear"}})
    trainer = build_trainer(cfg)
    assert trainer.refiner.name == DEFAULT_SAM and trainer.refiner.config.min_component_pixels == 5000
    off = build_trainer(load_adaptation_config({**cfg, "sam": {"enabled": False, "model": "x"}}))
    assert off.refiner is None
