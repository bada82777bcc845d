"""Tiny randomly initialised models, one per supported host family, for the test matrix.

``MODEL_FACTORIES`` maps a family id to a factory returning ``(model, image_size)``;
:func:`token_output` runs a model and returns its full last token/feature output so
tests can compare every token, not just a pooled vector.
"""

from __future__ import annotations

from typing import Callable

import timm
import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    # Some transformers versions initialise tiny configs with near-zero weights (SAM's
    # neck ends up ~1e-21), which would hide any effect of an adapter. Re-draw them.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def _hf(name: str, config) -> nn.Module:
    return _randomise(getattr(transformers, name)(config))


def _hf_config(cls, **extra):
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=28, patch_size=14, **extra)


MODEL_FACTORIES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "timm_dinov2": lambda: (_randomise(timm.create_model(
        "vit_small_patch14_dinov2", depth=2, embed_dim=64, num_heads=2, img_size=56)), 56),
    "timm_dinov2_reg": lambda: (_randomise(timm.create_model(
        "vit_small_patch14_reg4_dinov2", depth=2, embed_dim=64, num_heads=2, img_size=56)), 56),
    "timm_clip": lambda: (_randomise(timm.create_model(
        "vit_base_patch16_clip_224", depth=2, embed_dim=64, num_heads=2, img_size=32)), 32),
    "timm_deit_distilled": lambda: (_randomise(timm.create_model(
        "deit_tiny_distilled_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=32)), 32),
    "timm_eva02": lambda: (_randomise(timm.create_model(
        "eva02_large_patch14_224", depth=2, embed_dim=64, num_heads=2, img_size=28)), 28),
    "timm_eva02_fused_qkv": lambda: (_randomise(timm.create_model(
        "eva02_tiny_patch14_224", depth=2, embed_dim=64, num_heads=2, img_size=28, qkv_fused=True)), 28),
    "timm_sam": lambda: (_randomise(timm.create_model(
        "samvit_base_patch16", depth=2, embed_dim=64, num_heads=2, img_size=64,
        global_attn_indexes=(1,), window_size=2)), 64),
    "hf_dinov2": lambda: (_hf("Dinov2Model", _hf_config(transformers.Dinov2Config)), 28),
    "hf_dinov2_reg": lambda: (_hf("Dinov2WithRegistersModel",
                                  _hf_config(transformers.Dinov2WithRegistersConfig, num_register_tokens=4)), 28),
    "hf_vit": lambda: (_hf("ViTModel", _hf_config(transformers.ViTConfig)), 28),
    "hf_clip": lambda: (_hf("CLIPVisionModel", _hf_config(transformers.CLIPVisionConfig)), 28),
    "hf_sam": lambda: (_hf("SamVisionModel", transformers.SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
        window_size=2, global_attn_indexes=[1], output_channels=16, mlp_dim=64)), 64),
}

FAMILY_IDS = sorted(MODEL_FACTORIES)


def _tiny_resnet() -> nn.Module:
    # Bottleneck blocks and the deep 3x3 stem of resnet50c (mmseg's ResNetV1c), tiny widths.
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(block=Bottleneck, layers=(1, 2, 1, 1), channels=(8, 16, 32, 64), stem_width=8,
                  stem_type="deep", num_classes=0)


#: Hierarchical (stage-wise) hosts: widths change between stages, strides 4/8/16/32.
STAGE_FACTORIES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "timm_resnet": lambda: (_randomise(_tiny_resnet()), 64),
    "timm_convnext": lambda: (_randomise(timm.create_model(
        "convnext_large_mlp", depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), num_classes=0)), 64),
    "timm_swin": lambda: (_randomise(timm.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1), window_size=2,
        img_size=64, num_classes=0)), 64),
    "timm_hiera": lambda: (_randomise(timm.create_model(
        "sam2_hiera_tiny", embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), window_spec=(2, 2, 2, 2),
        global_att_blocks=(4,), global_pos_size=(2, 2), num_classes=0)), 64),
    "hf_convnext": lambda: (_hf("ConvNextModel", transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=64)), 64),
}
STAGE_FAMILY_IDS = sorted(STAGE_FACTORIES)


def make_model(family_id: str) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    return {**MODEL_FACTORIES, **STAGE_FACTORIES}[family_id]()


def token_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's last full feature output: every token (or the SAM neck's map)."""
    if isinstance(model, transformers.PreTrainedModel):
        return model(pixel_values=images).last_hidden_state
    return model.forward_features(images)


def sample_images(image_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
