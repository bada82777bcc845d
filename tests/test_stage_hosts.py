"""Hierarchical (stage-wise) hosts: ResNet, ConvNeXt, Swin and SAM 2's Hiera.

The description (stages, widths, strides, block layouts), Rein as the authors run it on
ResNet/ConvNeXt (one Rein per stage, after every block, on the flattened map), its exact
parameter counts, and every baseline method injected or refused untouched.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import vfm_adapters as va
from vfm_adapters.hosts import UnsupportedModelError, describe_host
from vfm_adapters.methods.base import AdapterError
from vfm_adapters.methods.rein import Rein
from vfm_adapters.methods.rein_stages import StageRein, stage_rein_parameter_count

from model_zoo import STAGE_FAMILY_IDS, make_model, sample_images, token_output
from test_baselines import _assert_same, _snapshot

FAMILIES = {
    "timm_resnet": ("timm.ResNet", "NCHW"),
    "timm_convnext": ("timm.ConvNeXt", "NCHW"),
    "timm_swin": ("timm.SwinTransformer", "BHWC"),
    "timm_hiera": ("timm.HieraDet", "BHWC"),
    "hf_convnext": ("transformers.ConvNextModel", "NCHW"),
}
# Which baselines apply where; the rest must be refused with a message naming why.
APPLICABLE = {
    "timm_resnet": set(),
    "timm_convnext": {"adaptformer"},
    "timm_swin": {"lora", "adaptformer"},
    "timm_hiera": {"lora", "adaptformer"},
    "hf_convnext": set(),
}
REFUSAL = {
    "lora": "no q/k/v projection .*convolutions without attention",
    "adaptformer": "exposes no 'mlp' part .*convolutions with no token MLP",
    "vpt": "is hierarchical: its stages change width",
}
INJECT = {
    "rein": lambda m: va.inject_rein(m, token_length=6, rank=3),
    "lora": lambda m: va.inject_lora(m, rank=2),
    "adaptformer": lambda m: va.inject_adaptformer(m, bottleneck=4),
    "vpt": lambda m: va.inject_vpt(m, num_tokens=3),
}


def _block_outputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    spec = describe_host(model)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o))
        for name in spec.block_names
    ]
    try:
        with torch.no_grad():
            token_output(model, images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("family", STAGE_FAMILY_IDS)
def test_stages_widths_strides_and_block_layouts(family: str) -> None:
    model, size = make_model(family)
    spec = describe_host(model)
    name, layout = FAMILIES[family]
    assert spec.family == name and spec.layout == layout and spec.hierarchical and spec.num_prefix_tokens == 0
    assert [s.stride for s in spec.stages] == [4, 8, 16, 32]
    assert len({s.width for s in spec.stages}) == 4 and spec.embed_dim == spec.stages[-1].width
    assert spec.block_names == [n for s in spec.stages for n in s.block_names]
    outputs = _block_outputs(model, sample_images(size))
    for stage in spec.stages:
        for block in stage.block_names:
            out = outputs[block]
            channels, height = (out.shape[1], out.shape[2]) if layout == "NCHW" else (out.shape[-1], out.shape[1])
            assert channels == stage.width and height * stage.stride == size, (block, tuple(out.shape))


# --------------------------------------------------------------------------- Rein


def _rein_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.vfm_adapters.rein.named_parameters())


@pytest.mark.parametrize("family", STAGE_FAMILY_IDS)
def test_rein_per_stage_trains_alone_and_every_parameter_gets_a_gradient(family: str) -> None:
    model, size = make_model(family)
    spec = describe_host(model)
    va.inject_rein(model, token_length=6, rank=3)
    rein = model.vfm_adapters.rein
    assert isinstance(rein, StageRein)
    assert [(r.num_layers, r.embed_dim) for r in rein.stages] == [(s.depth, s.width) for s in spec.stages]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"vfm_adapters.rein.{n}" for n in _rein_params(model)}
    expected = stage_rein_parameter_count([(s.depth, s.width) for s in spec.stages], token_length=6, rank=3)
    assert va.trainable_parameters(model) == expected

    with torch.no_grad():
        for stage in rein.stages:
            stage.scale.fill_(0.5)
    loss = token_output(model, sample_images(size)).square().mean() + va.rein_queries(model).square().mean()
    loss.backward()
    for name, param in _rein_params(model).items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("vfm_adapters."))


@pytest.mark.parametrize("family", STAGE_FAMILY_IDS)
def test_rein_changes_every_stage_and_removal_restores_the_model(family: str) -> None:
    model, size = make_model(family)
    images = sample_images(size)
    before_snapshot = _snapshot(model)
    before = _block_outputs(model, images)
    va.inject_rein(model, token_length=6, rank=3)
    with torch.no_grad():
        for stage in model.vfm_adapters.rein.stages:
            stage.scale.fill_(1.0)
    after = _block_outputs(model, images)
    for stage in describe_host(model).stages:
        last = stage.block_names[-1]
        assert after[last].shape == before[last].shape
        assert not torch.allclose(after[last], before[last]), f"Rein did not change {last}"
    va.remove_adapters(model)
    _assert_same(before_snapshot, _snapshot(model))
    restored = _block_outputs(model, images)
    assert all(torch.equal(restored[n], before[n]) for n in before)


def test_rein_on_a_resnet_block_is_the_update_on_the_flattened_map() -> None:
    model, size = make_model("timm_resnet")
    va.inject_rein(model, token_length=6, rank=3)
    rein: Rein = model.vfm_adapters.rein.stages[1]
    with torch.no_grad():
        rein.scale.fill_(0.7)
    block = model.layer2[1]
    features = torch.randn(2, rein.embed_dim, 4, 4)
    handles = list(block._forward_hooks)
    with torch.no_grad():
        hooked = block(features)
        plain = block.forward(features)  # Module.forward skips the hooks
        flat = plain.flatten(2).transpose(1, 2)  # (B, H*W, C), no prefix tokens
        expected = rein.refine(flat, layer=1).transpose(1, 2).reshape(plain.shape)
    assert len(handles) == 1
    torch.testing.assert_close(hooked, expected)
    assert not torch.allclose(hooked, plain)


def test_queries_are_the_sum_of_the_stages_queries() -> None:
    model, _ = make_model("timm_convnext")
    va.inject_rein(model, token_length=6, rank=3)
    stages = model.vfm_adapters.rein.stages
    with torch.no_grad():
        torch.testing.assert_close(va.rein_queries(model), sum(stage.queries() for stage in stages))
    assert va.rein_queries(model).shape == (6, 256)


@pytest.mark.parametrize(
    "name, expected",
    [("resnet50c", 13_187_588), ("resnet101c", 13_493_316), ("convnext_large", 8_289_156),
     ("convnext_large_mlp", 8_289_156)],
)
def test_paper_backbone_counts_match_the_formula(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    spec = describe_host(model)
    assert stage_rein_parameter_count([(s.depth, s.width) for s in spec.stages]) == expected
    assert va.trainable_parameters(va.inject_rein(model)) == expected


@pytest.mark.parametrize("family", STAGE_FAMILY_IDS)
def test_rein_save_load_round_trip_is_bit_exact(family: str, tmp_path) -> None:
    model, size = make_model(family)
    va.inject_rein(model, token_length=6, rank=3)
    with torch.no_grad():
        for param in _rein_params(model).values():
            param.add_(torch.randn_like(param) * 0.1)
    va.save_adapters(model, tmp_path)
    fresh, _ = make_model(family)
    va.load_adapters(fresh, tmp_path)
    images = sample_images(size)
    with torch.no_grad():
        assert torch.equal(token_output(fresh, images), token_output(model, images))


def test_rein_saved_for_other_stages_is_refused(tmp_path) -> None:
    model, _ = make_model("timm_resnet")
    va.save_adapters(va.inject_rein(model, token_length=6, rank=3), tmp_path)
    other, _ = make_model("timm_convnext")
    with pytest.raises(AdapterError, match="saved for a timm.ResNet host; this model is a timm.ConvNeXt"):
        va.load_adapters(other, tmp_path)
    assert not hasattr(other, "vfm_adapters")
    from timm.models.resnet import Bottleneck, ResNet

    deeper = ResNet(block=Bottleneck, layers=(1, 3, 1, 1), channels=(8, 16, 32, 64), stem_width=8,
                    stem_type="deep", num_classes=0)  # same family, another stage layout
    with pytest.raises(AdapterError, match="saved for a host with"):
        va.load_adapters(deeper, tmp_path)
    assert not hasattr(deeper, "vfm_adapters")


@pytest.mark.parametrize("options, message", [({"layers": [0, 1]}, "one Rein per stage"), ({"layers": "global"}, "one Rein per stage")])
def test_rein_layer_choices_are_refused_on_stage_hosts(options: dict, message: str) -> None:
    model, _ = make_model("timm_swin")
    before = _snapshot(model)
    with pytest.raises(AdapterError, match=message):
        va.inject_rein(model, **options)
    _assert_same(before, _snapshot(model))


def test_domain_rein_refuses_stage_wise_rein() -> None:
    model, _ = make_model("timm_resnet")
    va.inject_rein(model, token_length=6, rank=3)
    with pytest.raises(AdapterError, match="stage-wise"):
        va.inject_domain_rein(model, embed_dim=8)
    assert va.injected_methods(model) == ["rein"]


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("method", ["lora", "adaptformer", "vpt"])
@pytest.mark.parametrize("family", STAGE_FAMILY_IDS)
def test_baselines_on_stage_hosts(family: str, method: str, tmp_path) -> None:
    model, size = make_model(family)
    images = sample_images(size)
    with torch.no_grad():
        reference = token_output(model, images)
    before = _snapshot(model)
    if method not in APPLICABLE[family]:
        with pytest.raises(UnsupportedModelError, match=REFUSAL[method]):
            INJECT[method](model)
        _assert_same(before, _snapshot(model))
        return

    INJECT[method](model)
    adapters = va.adapter_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapters}
    with torch.no_grad():
        assert torch.equal(token_output(model, images), reference)  # zero-initialised up/B
        generator = torch.Generator().manual_seed(1)
        for param in adapters:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    perturbed = token_output(model, images)
    assert (perturbed - reference).abs().max() > 1e-3
    perturbed.square().mean().backward()
    for param in adapters:
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if id(p) not in {id(a) for a in adapters})

    va.save_adapters(model, tmp_path)
    fresh, _ = make_model(family)
    va.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(token_output(fresh, images), perturbed.detach())
    va.remove_adapters(model)
    _assert_same(before, _snapshot(model))
    with torch.no_grad():
        assert torch.equal(token_output(model, images), reference)


def test_lora_on_swin_adapts_every_stage() -> None:
    model, _ = make_model("timm_swin")
    va.inject_lora(model, rank=2)
    spec = describe_host(model)
    qkv = [model.get_submodule(name).attn.qkv for name in spec.block_names]
    assert len(qkv) == spec.depth == 5
    assert va.trainable_parameters(model) == sum(2 * (q.in_features + q.out_features) for q in qkv)
    assert {q.in_features for q in qkv} == {16, 32, 64, 128}


# --------------------------------------------------------------------------- segmentation features


@pytest.mark.parametrize("family", STAGE_FAMILY_IDS)
def test_stage_features_for_the_segmentation_stack(family: str) -> None:
    from vfm_adapters.seg.features import BackboneFeatures
    from vfm_adapters.seg.heads import Segmentor

    model, size = make_model(family)
    va.inject_rein(model, token_length=4, rank=2)
    features = BackboneFeatures(model)
    spec = describe_host(model)
    assert features.strides == [4, 8, 16, 32] and features.channels == [s.width for s in spec.stages]
    images = sample_images(size)
    maps = features(images)
    assert [tuple(m.shape) for m in maps] == [(2, c, size // s, size // s) for c, s in zip(features.channels, features.strides)]
    # the maps carry Rein's effect: the last stage's map is the model's own final block output
    final = token_output(model, images)
    last = final if spec.layout == "NCHW" else final.permute(0, 3, 1, 2)
    if family != "timm_swin":  # Swin's forward_features ends with a norm after the last block
        torch.testing.assert_close(maps[-1], last)
    segmentor = Segmentor(model, num_classes=3, scales=(1, 1, 1, 1), head_channels=8)
    assert segmentor(images).shape == (2, 3, size, size)


def test_training_keeps_a_frozen_hosts_batch_norm_statistics() -> None:
    from vfm_adapters.seg.heads import Segmentor
    from vfm_adapters.seg.model import train_mode

    model, size = make_model("timm_resnet")
    va.inject_rein(model, token_length=4, rank=2)
    segmentor = Segmentor(model, num_classes=3, scales=(1, 1, 1, 1), head_channels=8)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    train_mode(segmentor)
    assert segmentor.training and model.vfm_adapters.training
    segmentor(sample_images(size)).square().mean().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model.requires_grad_(True)  # full fine-tuning: batch norms train
    train_mode(segmentor)
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_params_command_rows_for_the_table6_backbones() -> None:
    from vfm_adapters.commands.params import count_rows, format_table

    rows = count_rows(["ResNet-50", "ResNet-101", "ConvNeXt-L"], ["Rein", "LoRA", "VPT"])
    rein = {row["backbone"]: row["trainable"] for row in rows if row["method"] == "Rein"}
    stages = {"ResNet-50": [(3, 256), (4, 512), (6, 1024), (3, 2048)],
              "ResNet-101": [(3, 256), (4, 512), (23, 1024), (3, 2048)],
              "ConvNeXt-L": [(3, 192), (3, 384), (27, 768), (3, 1536)]}
    assert rein == {name: stage_rein_parameter_count(s) for name, s in stages.items()}
    assert rein == {"ResNet-50": 13_187_588, "ResNet-101": 13_493_316, "ConvNeXt-L": 8_289_156}
    refused = [row for row in rows if row["method"] in ("LoRA", "VPT")]
    assert all(row["trainable"] is None and row["note"].startswith("not applicable") for row in refused)
    assert "13,187,588" in format_table(rows)


def test_a_deep_copy_carries_its_own_stage_rein() -> None:
    import copy

    model, size = make_model("timm_swin")
    va.inject_rein(model, token_length=4, rank=2)
    images = sample_images(size)
    with torch.no_grad():
        before = token_output(model, images)
        twin = copy.deepcopy(model)
        for stage in twin.vfm_adapters.rein.stages:
            stage.scale.fill_(2.0)
        assert torch.equal(token_output(model, images), before)
        assert not torch.allclose(token_output(twin, images), before)


def test_vit_neck_scales_on_stage_maps_are_refused() -> None:
    from vfm_adapters.seg.heads import Segmentor

    model, _ = make_model("timm_convnext")
    with pytest.raises(ValueError, match=r"strides \[4, 8, 16, 32\] already.*Use scales \[1, 1, 1, 1\]"):
        Segmentor(model, num_classes=3, head_channels=8)  # the ViT default (4, 2, 1, 0.5)
