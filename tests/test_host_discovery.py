"""Honest host discovery: hierarchical models refused by the ViT path, wrappers named,
transformers task models with their real prefix tokens, and what ``freeze_host`` keeps."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from torch import nn

import vfm_adapters as va
from vfm_adapters.hosts import UnsupportedModelError, describe_host, supported_families
from vfm_adapters.hosts.discovery import discover_vit

transformers.logging.set_verbosity_error()


def _tiny_swin() -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1, 2, 1),
                             num_heads=(1, 1, 1, 1), window_size=2, img_size=64, num_classes=0)


class _WideningViT(nn.Module):
    """A ViT-looking toy whose identical-class blocks change width: no single ``c`` describes it."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.ModuleList(
            timm.models.vision_transformer.Block(dim, num_heads=1) for dim in (8, 8, 16)
        )


def test_swin_is_refused_by_the_vit_path_with_the_family_and_supported_list() -> None:
    model = _tiny_swin()
    with pytest.raises(UnsupportedModelError, match=r"SwinTransformer is not a supported ViT: .*hierarchical") as error:
        discover_vit(model, supported_families())
    assert "Supported families: " in str(error.value) and "timm.VisionTransformer" in str(error.value)


def test_blocks_that_change_width_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"_WideningViT is not a supported ViT: its blocks change width \(8, 8, 16\)"):
        describe_host(_WideningViT())
    model = _WideningViT()
    with pytest.raises(UnsupportedModelError, match="change width"):
        va.inject_rein(model)
    assert not hasattr(model, "vfm_adapters") and not hasattr(model, "_vfm_adapters_state")


def _hf_config(cls, **extra):
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=28, patch_size=14, **extra)


@pytest.mark.parametrize(
    "name, config, prefix",
    [
        ("Dinov2ForImageClassification", _hf_config(transformers.Dinov2Config, num_labels=3), 1),
        ("Dinov2WithRegistersForImageClassification",
         _hf_config(transformers.Dinov2WithRegistersConfig, num_register_tokens=4, num_labels=3), 5),
        ("ViTForImageClassification", _hf_config(transformers.ViTConfig, num_labels=3), 1),
    ],
)
def test_transformers_task_models_get_their_real_prefix_tokens(name: str, config, prefix: int) -> None:
    model = getattr(transformers, name)(config).eval()
    spec = describe_host(model)
    assert spec.num_prefix_tokens == prefix
    assert spec.depth == 2 and spec.embed_dim == 32
    assert all(block.startswith(model.base_model_prefix + ".") for block in spec.block_names)
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = model(pixel_values=images).logits
        va.inject_rein(model, token_length=4, rank=2)
        model.vfm_adapters.rein.scale.fill_(1.0)
        after = model(pixel_values=images).logits
    assert after.shape == before.shape == (2, 3) and not torch.allclose(after, before)


def test_a_peft_model_is_refused_with_what_to_pass_instead() -> None:
    import peft

    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    wrapped = peft.get_peft_model(vit, peft.LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(UnsupportedModelError, match=r"PeftModel.*get_base_model\(\)"):
        va.inject_rein(wrapped)
    assert not hasattr(wrapped.get_base_model(), "vfm_adapters")


def test_timm_feature_wrappers_are_refused_with_what_to_pass_instead() -> None:
    getter = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28,
                               features_only=True, out_indices=(1,), feature_cls="getter")
    with pytest.raises(UnsupportedModelError, match=r"FeatureGetterNet.*net\.model"):
        describe_host(getter)
    listed = timm.create_model("resnet18", layers=(1, 1, 1, 1), features_only=True)
    with pytest.raises(UnsupportedModelError, match="FeatureListNet.*without features_only"):
        va.inject_rein(listed)
    assert not hasattr(listed, "vfm_adapters")


def test_freeze_host_keeps_the_requested_head_trainable_and_restores_it() -> None:
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28, num_classes=5)
    vit.blocks[0].norm1.requires_grad_(False)  # a user's own choice, restored on removal
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    va.inject_rein(vit, token_length=4, rank=2, trainable=["head"])
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert not any(n.startswith("blocks.") for n in trainable)
    va.inject_lora(vit, rank=2)  # a later injection keeps the patterns
    assert vit.head.weight.requires_grad
    va.remove_adapters(vit)
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags


def test_freeze_host_leaves_another_librarys_adapters_trainable() -> None:
    import peft

    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    base = peft.get_peft_model(vit, peft.LoraConfig(r=2, target_modules=["qkv"])).get_base_model()
    peft_names = {n for n, p in base.named_parameters() if p.requires_grad}
    assert peft_names and all("lora_" in n for n in peft_names)
    va.inject_rein(base, token_length=4, rank=2)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == peft_names | {f"vfm_adapters.rein.{n}" for n, _ in base.vfm_adapters.rein.named_parameters()}


@pytest.mark.parametrize("bad", [[""], [".head"], [3]])
def test_bad_trainable_patterns_are_refused_untouched(bad) -> None:
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    with pytest.raises(va.AdapterError, match="module-name prefixes"):
        va.inject_rein(vit, trainable=bad)
    assert not hasattr(vit, "vfm_adapters") and all(p.requires_grad for p in vit.parameters())
