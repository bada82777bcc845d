"""The core contract: bad input leaves the model untouched, checkpoints, discovery, meta device."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

import vfm_adapters as va
from vfm_adapters.checkpoint import CONFIG_NAME, WEIGHTS_NAME


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modules": [n for n, _ in model.named_modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [nn.Linear(4, 4), nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())],
    ids=["linear", "convnet"],
)
def test_a_module_that_is_not_a_vit_is_refused_and_untouched(module):
    before = snapshot(module)
    with pytest.raises(va.UnsupportedModelError) as error:
        va.inject_rein(module)
    message = str(error.value)
    assert "timm.VisionTransformer" in message and "transformers.Dinov2Model" in message
    assert_unchanged(module, before)


def test_an_unsupported_cnn_is_refused_and_resnet_is_stage_wise():
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    with pytest.raises(va.UnsupportedModelError, match="not a supported ViT.*timm.ResNet"):
        va.inject_rein(model)
    assert not hasattr(model, "vfm_adapters")
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert va.describe_host(resnet).hierarchical  # ResNet: one Rein per stage (docs/hierarchical.md)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(token_length=0), "token_length must be a positive integer"),
        (dict(rank=-1), "rank must be a positive integer"),
        (dict(layers=[0, 0]), "repeated blocks"),
        (dict(layers=[9]), r"out of range: the host has 4 blocks"),
        (dict(layers="global"), "needs a windowed host"),
        (dict(layers="odd"), "'global' or a list"),
        (dict(kernel="cuda"), "is not one of 'auto', 'torch', 'triton'"),
        (dict(scale_init=float("nan")), "must be finite"),
    ],
)
def test_invalid_options_raise_clearly_and_leave_the_model_untouched(tiny_vit, options, match):
    before = snapshot(tiny_vit)
    with pytest.raises((ValueError, va.AdapterError), match=match):
        va.inject_rein(tiny_vit, **options)
    assert_unchanged(tiny_vit, before)


def test_injecting_rein_twice_is_an_error_and_changes_nothing(tiny_vit):
    va.inject_rein(tiny_vit, token_length=4, rank=2)
    before = snapshot(tiny_vit)
    with pytest.raises(va.AdapterError, match="already injected"):
        va.inject_rein(tiny_vit)
    assert_unchanged(tiny_vit, before)


def test_a_failing_attach_is_rolled_back(tiny_vit, monkeypatch):
    from vfm_adapters.methods import rein_method as rein_module

    before = snapshot(tiny_vit)
    calls = {"n": 0}
    original = rein_module._block_hook

    def hook_that_breaks_on_the_third_block(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure half-way through attaching")
        return original(*args)

    monkeypatch.setattr(rein_module, "_block_hook", hook_that_breaks_on_the_third_block)
    with pytest.raises(RuntimeError, match="simulated"):
        va.inject_rein(tiny_vit)
    assert_unchanged(tiny_vit, before)
    assert va.injected_methods(tiny_vit) == []


def test_removing_what_is_not_there_is_a_clear_error(tiny_vit):
    with pytest.raises(va.AdapterError, match="no adapters are injected"):
        va.remove_adapters(tiny_vit, "rein")
    assert va.remove_adapters(tiny_vit) is tiny_vit  # removing "everything" from a clean model is a no-op


# ---- checkpoints ---------------------------------------------------------------------------


def make_vit(width: int = 64, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=depth, embed_dim=width,
                             num_heads=2, img_size=56).eval()


@pytest.fixture
def saved_rein(tmp_path):
    model = va.inject_rein(make_vit(), token_length=5, rank=2)
    va.save_adapters(model, tmp_path)
    return tmp_path


def test_checkpoint_holds_adapter_tensors_only_and_a_readable_config(saved_rein):
    from safetensors.torch import load_file

    tensors = load_file(saved_rein / WEIGHTS_NAME)
    assert tensors and all(key.startswith("rein.") for key in tensors)
    config = json.loads((saved_rein / CONFIG_NAME).read_text())
    assert config["methods"]["rein"]["token_length"] == 5
    assert "kernel" not in config["methods"]["rein"]  # a runtime choice, not part of what was trained
    assert config["host"]["embed_dim"] == 64 and config["host"]["depth"] == 4


def test_adapters_saved_for_another_width_are_refused(saved_rein):
    other = make_vit(width=32)
    before = snapshot(other)
    with pytest.raises(va.AdapterError, match="embed_dim=64"):
        va.load_adapters(other, saved_rein)
    assert_unchanged(other, before)


def test_adapters_saved_with_another_config_are_refused_when_rein_is_already_there(saved_rein):
    model = va.inject_rein(make_vit(), token_length=7, rank=2)
    before = snapshot(model)
    with pytest.raises(va.AdapterError, match="saved with"):
        va.load_adapters(model, saved_rein)
    assert_unchanged(model, before)


def test_unknown_method_in_a_checkpoint_is_refused(saved_rein):
    config = json.loads((saved_rein / CONFIG_NAME).read_text())
    config["methods"] = {"prefix_tuning": {}}
    (saved_rein / CONFIG_NAME).write_text(json.dumps(config))
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(va.AdapterError, match="unknown adapter method 'prefix_tuning'"):
        va.load_adapters(model, saved_rein)
    assert_unchanged(model, before)


def test_truncated_weights_are_refused_and_nothing_is_injected(saved_rein):
    weights = saved_rein / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(va.AdapterError, match="truncated or corrupted"):
        va.load_adapters(model, saved_rein)
    assert_unchanged(model, before)


def test_missing_files_name_the_expected_layout(saved_rein, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="adapter_config.json and adapter_model.safetensors"):
        va.load_adapters(make_vit(), empty)
    (saved_rein / WEIGHTS_NAME).unlink()
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        va.load_adapters(model, saved_rein)
    assert_unchanged(model, before)


def test_weights_with_a_missing_key_are_refused_and_the_injection_undone(saved_rein):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved_rein / WEIGHTS_NAME)
    tensors.pop("rein.scale")
    save_file(tensors, saved_rein / WEIGHTS_NAME)
    model = make_vit()
    before = snapshot(model)
    with pytest.raises(va.AdapterError, match=r"missing \['rein.scale'\]"):
        va.load_adapters(model, saved_rein)
    assert_unchanged(model, before)


def test_a_failed_save_keeps_the_previous_checkpoint_whole(saved_rein, monkeypatch):
    from vfm_adapters import checkpoint

    old = {name: (saved_rein / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    model = va.inject_rein(make_vit(), token_length=5, rank=2)

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as stream:
            stream.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        va.save_adapters(model, saved_rein)
    assert {name: (saved_rein / name).read_bytes() for name in old} == old
    assert sorted(p.name for p in saved_rein.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left


def test_saving_without_adapters_is_a_clear_error(tmp_path):
    with pytest.raises(va.AdapterError, match="no adapters to save"):
        va.save_adapters(make_vit(), tmp_path)


# ---- host weights, meta device, discovery --------------------------------------------------


def test_pretrained_host_weights_load_after_injection():
    """Host parameter names do not change, so a host checkpoint loads with strict=False."""
    pretrained = make_vit()
    with torch.no_grad():
        for param in pretrained.parameters():
            param.add_(0.05)
    host_weights = copy.deepcopy(pretrained.state_dict())
    images = torch.randn(1, 3, 56, 56)

    loaded_first = va.inject_rein(make_vit(), token_length=4, rank=2)
    loaded_first.load_state_dict(host_weights, strict=False)  # after injection
    reference = make_vit()
    reference.load_state_dict(host_weights)  # before injection (the documented order)
    va.inject_rein(reference, token_length=4, rank=2)
    reference.vfm_adapters.load_state_dict(loaded_first.vfm_adapters.state_dict())

    result = loaded_first.load_state_dict(host_weights, strict=False)
    assert sorted(result.missing_keys) == sorted(f"vfm_adapters.rein.{k}" for k in loaded_first.vfm_adapters.rein.state_dict())
    assert result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(loaded_first.forward_features(images), reference.forward_features(images))


def test_injection_on_the_meta_device_is_instant_and_counts_correctly():
    with torch.device("meta"):
        model = timm.create_model("vit_giant_patch14_dinov2", pretrained=False)
    va.inject_rein(model)
    assert model.vfm_adapters.rein.tokens_a.is_meta
    width, layers = 1536, 40
    assert va.trainable_parameters(model) == (
        layers * 100 * 16 + layers * 16 * width + 2 * (width * width + width) + (width * 256 + 256) + (3 * 256 * 256 + 256) + 1
    )


class HandMadeViT(nn.Module):
    """A ViT no family is registered for: discovery must find its blocks and prefix."""

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        self.patchify = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 64, batch_first=True, norm_first=True, dropout=0.0) for _ in range(depth)
        )

    def forward(self, images):
        tokens = self.patchify(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens


def test_an_unregistered_vit_is_discovered():
    torch.manual_seed(0)
    model = HandMadeViT().eval()
    spec = va.describe_host(model)
    assert spec.discovered and spec.family == "discovered.HandMadeViT"
    assert (spec.depth, spec.embed_dim, spec.num_prefix_tokens, spec.patch_size) == (3, 32, 1, 8)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        va.inject_rein(model, token_length=4, rank=2)
        model.vfm_adapters.rein.scale.fill_(1.0)
        after = model(images)
    assert not torch.allclose(after[:, 1:], before[:, 1:])
    va.remove_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_parameter_report_lists_adapter_and_host(tiny_vit):
    va.inject_rein(tiny_vit)
    report = va.parameter_report(tiny_vit)
    rein_count = va.trainable_parameters(tiny_vit)
    assert f"{rein_count:,}" in report and "host VisionTransformer" in report
    assert "rein (adapter)" in report


def test_a_deep_copy_carries_its_own_independent_adapters(tiny_vit):
    """An EMA teacher made with deepcopy must not share (or call) the student's adapters."""
    va.inject_rein(tiny_vit, token_length=6, rank=3)
    teacher = copy.deepcopy(tiny_vit)
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        teacher_before = teacher.forward_features(images)
        tiny_vit.vfm_adapters.rein.scale.fill_(5.0)  # change the student only
        assert torch.equal(teacher.forward_features(images), teacher_before)
        assert not torch.equal(tiny_vit.forward_features(images), teacher_before)
    va.remove_adapters(teacher)
    assert va.injected_methods(tiny_vit) == ["rein"] and va.injected_methods(teacher) == []
    assert any(len(block._forward_hooks) for block in tiny_vit.blocks)
    assert not any(len(block._forward_hooks) for block in teacher.blocks)


def test_saved_files_get_ordinary_permissions(saved_rein):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (saved_rein / name).stat().st_mode & 0o777 == 0o666 & ~umask
