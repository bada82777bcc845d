"""Checkpoints never lose data and never load something silently wrong (issue 13, items 1-5)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vfm_adapters as va
from vfm_adapters import checkpoint
from vfm_adapters.methods.base import injection_state
from vfm_adapters.checkpoint import CHECKSUM_FIELD, CONFIG_METADATA_KEY, CONFIG_NAME, WEIGHTS_NAME


def make_vit(width: int = 64, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=depth, embed_dim=width,
                             num_heads=2, img_size=56).eval()


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in va.adapter_parameters(model):
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def adapter_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in va.adapter_state_dict(model).items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def write_old_format(directory: Path, edit=None) -> None:
    """Rewrites a checkpoint as the library wrote it before issue 13: no embedded config, no checksum."""
    tensors = load_file(directory / WEIGHTS_NAME)
    config = json.loads((directory / CONFIG_NAME).read_text())
    config.pop(CHECKSUM_FIELD)
    config.pop("config_sha256")
    if edit is not None:
        tensors = edit(config, tensors) or tensors
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


@pytest.fixture
def saved_rein(tmp_path):
    model = perturbed(va.inject_rein(make_vit(), token_length=5, rank=2), seed=1)
    va.save_adapters(model, tmp_path)
    return tmp_path, adapter_values(model)


# ---- 1. the weights + config pair is replaced atomically -----------------------------------


def test_a_save_killed_at_any_step_leaves_a_checkpoint_that_loads_whole(saved_rein, tmp_path_factory, monkeypatch):
    """Snapshot the directory before and after every rename of a save, as a kill -9 would leave it."""
    directory, old_values = saved_rein
    new_model = perturbed(va.inject_rein(make_vit(), token_length=7, rank=2), seed=2)  # another config
    new_values = adapter_values(new_model)
    snapshots: list[Path] = []
    real_replace = os.replace

    def snapshot() -> None:
        copy = tmp_path_factory.mktemp("killed")
        for item in directory.iterdir():
            shutil.copy2(item, copy / item.name)
        snapshots.append(copy)

    def replace_and_snapshot(source, target):
        snapshot()
        real_replace(source, target)
        snapshot()

    monkeypatch.setattr(os, "replace", replace_and_snapshot)
    va.save_adapters(new_model, directory)
    monkeypatch.setattr(os, "replace", real_replace)

    assert len(snapshots) == 4  # two renames
    results = []
    for state in snapshots:
        loaded = va.load_adapters(make_vit(), state)
        values = adapter_values(loaded)
        is_new = values["rein.tokens_a"].shape == new_values["rein.tokens_a"].shape  # 7 tokens, not 5
        results.append("new" if is_new else "old")
        assert_same(values, new_values if results[-1] == "new" else old_values)
    assert results[0] == "old" and results[-1] == "new"
    assert results == sorted(results, key=["old", "new"].index)  # never back to the old one

    # A kill leaves temporaries behind (the first snapshot holds the unrenamed weights);
    # the next save removes them.
    stale = snapshots[0]
    assert any(p.name.endswith(".tmp") for p in stale.iterdir())
    va.save_adapters(new_model, stale)
    assert sorted(p.name for p in stale.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert_same(adapter_values(va.load_adapters(make_vit(), stale)), new_values)


def test_a_save_interrupted_between_the_two_files_keeps_a_loadable_pair(saved_rein, monkeypatch):
    directory, old_values = saved_rein
    new_model = perturbed(va.inject_rein(make_vit(), token_length=7, rank=2), seed=2)
    real_write = checkpoint.write_atomically

    def killed_before_the_config(path, write):
        if Path(path).name == CONFIG_NAME:
            raise KeyboardInterrupt("killed")
        real_write(path, write)

    monkeypatch.setattr(checkpoint, "write_atomically", killed_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        va.save_adapters(new_model, directory)
    monkeypatch.setattr(checkpoint, "write_atomically", real_write)
    assert va.read_adapter_config(directory)["methods"]["rein"]["token_length"] == 7
    assert_same(adapter_values(va.load_adapters(make_vit(), directory)), adapter_values(new_model))


def test_an_interrupted_save_of_the_same_tensors_with_another_config_loads_the_new_pair(tmp_path, monkeypatch):
    """Same tensors, another LoRA alpha: the leftover config is recognised as another save's."""
    model = perturbed(va.inject_lora(make_vit(), rank=2, alpha=2.0), seed=1)
    va.save_adapters(model, tmp_path)
    values = adapter_values(model)
    va.remove_adapters(model)
    va.inject_lora(model, rank=2, alpha=8.0)
    with torch.no_grad():
        for key, tensor in va.adapter_state_dict(model).items():
            tensor.copy_(values[key])
    real_write = checkpoint.write_atomically
    monkeypatch.setattr(checkpoint, "write_atomically",
                        lambda path, write: (_ for _ in ()).throw(KeyboardInterrupt()) if Path(path).name == CONFIG_NAME
                        else real_write(path, write))
    with pytest.raises(KeyboardInterrupt):
        va.save_adapters(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["methods"]["lora"]["alpha"] == 2.0  # the leftover
    loaded = va.load_adapters(make_vit(), tmp_path)
    assert injection_state(loaded).configs["lora"].alpha == 8.0
    assert_same(adapter_values(loaded), values)


# ---- 2. validate everything, then copy -------------------------------------------------------


def test_a_later_refusal_leaves_earlier_methods_untouched(tmp_path):
    # Methods load in name order: AdaptFormer's values would be copied before LoRA refuses.
    source = perturbed(va.inject_lora(va.inject_adaptformer(make_vit(), bottleneck=4), rank=2), seed=1)
    va.save_adapters(source, tmp_path)
    target = perturbed(va.inject_lora(va.inject_adaptformer(make_vit(), bottleneck=4), rank=2), seed=3)
    va.merge_lora(target)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(va.AdapterError, match="merged"):
        va.load_adapters(target, tmp_path)
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ---- 3. shapes and dtypes from the header, before anything is allocated -----------------------


def test_a_config_asking_for_a_huge_adapter_is_refused_before_allocating(saved_rein, monkeypatch):
    from vfm_adapters.methods import rein as rein_module

    directory, _ = saved_rein

    def ask_for_a_million_tokens(config, tensors):
        config["methods"]["rein"]["token_length"] = 10**6

    write_old_format(directory, ask_for_a_million_tokens)
    built_on: list[str] = []
    real_init = rein_module.Rein.__init__

    def spy(self, *args, device=None, **kwargs):
        built_on.append(str(device))
        real_init(self, *args, device=device, **kwargs)

    monkeypatch.setattr(rein_module.Rein, "__init__", spy)
    model = make_vit()
    with pytest.raises(va.AdapterError, match=r"wrong shapes: rein.tokens_a: saved \(4, 5, 2\), model \(4, 1000000, 2\)"):
        va.load_adapters(model, directory)
    assert built_on and all(device == "meta" for device in built_on)  # only the meta-device twin
    assert va.injected_methods(model) == []


# ---- 4. content checks -------------------------------------------------------------------------


def test_a_flipped_bit_in_the_weights_is_detected(saved_rein):
    directory, _ = saved_rein
    data = bytearray((directory / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes, not the header
    (directory / WEIGHTS_NAME).write_bytes(bytes(data))
    model = make_vit()
    with pytest.raises(va.AdapterError, match="corrupted: its tensors do not match the checksum"):
        va.load_adapters(model, directory)
    assert va.injected_methods(model) == []


def test_non_floating_tensors_are_refused(saved_rein):
    directory, _ = saved_rein

    def integer_scale(config, tensors):
        tensors["rein.scale"] = torch.zeros((), dtype=torch.int64)

    write_old_format(directory, integer_scale)
    with pytest.raises(va.AdapterError, match=r"wrong type: rein.scale is I64, expected floating point"):
        va.load_adapters(make_vit(), directory)


def test_non_finite_values_are_refused_unless_allowed(tmp_path):
    model = va.inject_rein(make_vit(), token_length=5, rank=2)
    with torch.no_grad():
        model.vfm_adapters.rein.tokens_a[0, 0, 0] = float("nan")
        model.vfm_adapters.rein.scale.fill_(float("inf"))
    va.save_adapters(model, tmp_path)
    fresh = make_vit()
    with pytest.raises(va.AdapterError, match=r"NaN or infinite values in \['rein.scale', 'rein.tokens_a'\].*allow_nonfinite=True"):
        va.load_adapters(fresh, tmp_path)
    assert va.injected_methods(fresh) == []
    va.load_adapters(fresh, tmp_path, allow_nonfinite=True)
    assert torch.isnan(fresh.vfm_adapters.rein.tokens_a[0, 0, 0]) and torch.isinf(fresh.vfm_adapters.rein.scale)


def test_adapters_of_another_host_family_are_refused_naming_both(tmp_path):
    import transformers

    timm_vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    va.save_adapters(va.inject_rein(timm_vit, token_length=4, rank=2), tmp_path)
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14))
    assert va.describe_host(hf).embed_dim == 32 and va.describe_host(hf).depth == 2  # only the family differs
    with pytest.raises(va.AdapterError, match=r"saved for a timm\.VisionTransformer host; this model is a transformers\.Dinov2Model"):
        va.load_adapters(hf, tmp_path)
    assert va.injected_methods(hf) == []



@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(format_version="1"), "format_version must be an integer"),
        (lambda c: c.update(format_version=True), "format_version must be an integer"),
        (lambda c: c.update(format_version=0), "format_version must be between 1 and"),
        (lambda c: c.update(format_version=99), "format_version 99; this vfm_adapters reads up to"),
        (lambda c: c.update(method_order="rein"), "method_order must list each of"),
        (lambda c: c.update(method_order=["rein", "rein"]), "method_order must list each of"),
        (lambda c: c.update(methods=[]), "'methods' must be a non-empty object"),
        (lambda c: c["methods"].update(rein=[1]), "methods.rein must be an object of options"),
        (lambda c: c["methods"]["rein"].update(link_queries="no"), "ReinConfig.link_queries must be bool, got 'no'"),
        (lambda c: c["methods"]["rein"].update(token_length=5.0), "ReinConfig.token_length must be int, got 5.0"),
        (lambda c: c["methods"]["rein"].update(layers=[0, "1"]), "ReinConfig.layers must be a list of int or str or null"),
        (lambda c: c["methods"]["rein"].update(rank={"a": 1}), "ReinConfig.rank must be int or null"),
        (lambda c: c["host"].update(depth="4"), "host.depth must be a positive integer"),
        (lambda c: c.update(host=[]), "host must be an object or null"),
        (lambda c: c.update(tensors_sha256=12), "tensors_sha256 must be a SHA-256 hex digest"),
    ],
)
def test_every_config_field_is_type_checked(saved_rein, edit, match):
    directory, _ = saved_rein
    config = json.loads((directory / CONFIG_NAME).read_text())
    edit(config)
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    model = make_vit()
    with pytest.raises(va.AdapterError, match=match):
        va.load_adapters(model, directory)
    assert va.injected_methods(model) == []


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": "vfm_adapters", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"format": "vfm_adapters", "format_version": NaN}', "holds NaN, which is not valid JSON"),
        ('{"format": "vfm_adapters", ', "is not valid JSON"),
    ],
    ids=["deep-nesting", "nan", "truncated"],
)
def test_malformed_config_json_gives_a_clear_error(saved_rein, text, match):
    directory, _ = saved_rein
    (directory / CONFIG_NAME).write_text(text)
    with pytest.raises(va.AdapterError, match=match):
        va.load_adapters(make_vit(), directory)


def test_a_config_edited_after_saving_is_refused(saved_rein):
    directory, _ = saved_rein
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["methods"]["rein"]["scale_init"] = 0.5  # a valid value, but not what was trained
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(va.AdapterError, match=r"was changed after saving: \['methods'\] differ"):
        va.load_adapters(make_vit(), directory)


def test_checkpoints_written_before_these_checks_still_load(saved_rein):
    directory, values = saved_rein
    write_old_format(directory)
    metadata_keys = set(__import__("safetensors").safe_open(str(directory / WEIGHTS_NAME), "pt").metadata())
    assert CONFIG_METADATA_KEY not in metadata_keys and CHECKSUM_FIELD not in json.loads((directory / CONFIG_NAME).read_text())
    assert_same(adapter_values(va.load_adapters(make_vit(), directory)), values)
    # The checks whose information is there still apply: the host family, finiteness.
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["host"]["family"] = "transformers.Dinov2Model"
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(va.AdapterError, match="saved for a transformers.Dinov2Model host"):
        va.load_adapters(make_vit(), directory)


def test_new_checkpoints_record_checksum_family_and_config_in_the_weights(saved_rein):
    from safetensors import safe_open

    directory, values = saved_rein
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["host"]["family"] == "timm.VisionTransformer"
    assert config[CHECKSUM_FIELD] == checkpoint.tensors_checksum(values)
    with safe_open(str(directory / WEIGHTS_NAME), "pt") as weights:
        metadata = weights.metadata()
    assert json.loads(metadata[CONFIG_METADATA_KEY]) == config and metadata[CHECKSUM_FIELD] == config[CHECKSUM_FIELD]


# ---- 5. host weights load around injected adapters ---------------------------------------------


def _pretrained_host_weights() -> dict[str, torch.Tensor]:
    pretrained = make_vit()
    with torch.no_grad():
        for param in pretrained.parameters():
            param.add_(0.05)
    return {k: v.clone() for k, v in pretrained.state_dict().items()}


@pytest.mark.parametrize("inject", [
    lambda m: va.inject_lora(m, rank=2),
    lambda m: va.inject_adaptformer(va.inject_lora(va.inject_rein(m, token_length=4, rank=2), rank=2), bottleneck=4),
], ids=["lora", "rein+lora+adaptformer"])
def test_host_weights_load_after_injection_around_peft_renames(inject):
    host_weights = _pretrained_host_weights()
    images = torch.randn(1, 3, 56, 56)
    model = perturbed(inject(make_vit()), seed=4)
    # What docs/api.md used to recommend skips LoRA's wrapped projections without a word:
    assert "blocks.0.attn.qkv.weight" in model.load_state_dict(host_weights, strict=False).unexpected_keys

    result = va.load_host_state_dict(model, host_weights)
    assert result == va.HostLoadResult([], [])
    reference = make_vit()
    reference.load_state_dict(host_weights)  # load first, then inject: the documented order
    reference = inject(reference)
    wanted = va.adapter_state_dict(model)
    with torch.no_grad():
        for key, value in va.adapter_state_dict(reference).items():
            value.copy_(wanted[key])
        assert torch.equal(model.forward_features(images), reference.forward_features(images))


def test_host_weight_loading_is_all_or_nothing():
    host_weights = _pretrained_host_weights()
    model = va.inject_lora(make_vit(), rank=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    incomplete = dict(host_weights)
    incomplete.pop("blocks.1.attn.proj.weight")
    with pytest.raises(va.AdapterError, match=r"missing \['blocks.1.attn.proj.weight'\]"):
        va.load_host_state_dict(model, incomplete)
    wrong = dict(host_weights, **{"blocks.3.mlp.fc2.bias": torch.zeros(3)})
    with pytest.raises(va.AdapterError, match=r"blocks.3.mlp.fc2.bias: given \(3,\), model \(64,\)"):
        va.load_host_state_dict(model, wrong)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    result = va.load_host_state_dict(model, dict(incomplete, extra=torch.zeros(1)), strict=False)
    assert result == va.HostLoadResult(["blocks.1.attn.proj.weight"], ["extra"])
    assert torch.equal(model.blocks[0].attn.qkv.base_layer.weight, host_weights["blocks.0.attn.qkv.weight"])


def test_weights_of_layers_domino_replaced_are_refused():
    head = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    weights = {k: v + 1 for k, v in head.state_dict().items()}
    va.inject_domino(head, embed_dim=3)
    with pytest.raises(va.AdapterError, match=r"\['1.weight', '1.bias', '1.running_mean'.*load the host's weights before injecting"):
        va.load_host_state_dict(head, weights)
    va.load_host_state_dict(head, {k: v for k, v in weights.items() if k.startswith("0.")}, strict=False)
    assert torch.equal(head[0].weight, weights["0.weight"])


def test_a_model_that_cannot_be_deep_copied_is_still_checked_before_copying(saved_rein, monkeypatch):
    directory, values = saved_rein

    def no_twin(model):
        raise TypeError("cannot deepcopy this model")

    monkeypatch.setattr(checkpoint, "_meta_twin", no_twin)
    assert_same(adapter_values(va.load_adapters(make_vit(), directory)), values)
    write_old_format(directory, lambda config, tensors: config["methods"]["rein"].update(token_length=6))
    model = make_vit()
    with pytest.raises(va.AdapterError, match="wrong shapes"):
        va.load_adapters(model, directory)
    assert va.injected_methods(model) == []


def test_a_checkpoint_written_by_version_0_1_0_still_loads(tmp_path):
    """tests/data/rein_checkpoint_v0.1.0 was written by save_adapters before issue 13."""
    source = Path(__file__).parent / "data" / "rein_checkpoint_v0.1.0"
    stored = load_file(source / WEIGHTS_NAME)
    model = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    va.load_adapters(model, source)
    assert_same(adapter_values(model), stored)
    # Saved again, it gains the checksum and the embedded config, and loads the same.
    va.save_adapters(model, tmp_path)
    again = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    assert_same(adapter_values(va.load_adapters(again, tmp_path)), stored)
