"""Features with adapters active, neck/head, optimiser groups, exact resume, save/load, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import vfm_adapters as va
from model_zoo import FAMILY_IDS, make_model
from vfm_adapters.cli import main
from vfm_adapters.seg.features import BackboneFeatures, MultiScaleNeck, default_layers
from vfm_adapters.seg.heads import FPNHead, LinearHead, Segmentor, segmentation_loss
from vfm_adapters.seg.checkpoints import load_segmentor, trained_state
from vfm_adapters.seg.config import ConfigError, load_config
from vfm_adapters.seg.optim import no_weight_decay, parameter_groups, poly_factor
from vfm_adapters.seg.training import train


# ------------------------------------------------------------------ features
def test_default_layers():
    assert default_layers(24) == [7, 11, 15, 23]
    assert default_layers(12) == [3, 5, 7, 11]
    assert default_layers(4) == [0, 1, 2, 3]
    assert all(0 <= i < d for d in range(1, 40) for i in default_layers(d))


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_features_of_every_host_family(family):
    model, size = make_model(family)
    host = va.describe_host(model)
    features = BackboneFeatures(model, layers=[0, -1])
    maps = features(torch.randn(2, 3, size, size))
    grid = size // host.patch_size
    assert [tuple(m.shape) for m in maps] == [(2, host.embed_dim, grid, grid)] * 2
    assert not any(h for b in host.blocks(model) for h in b._forward_hooks.values() if "capture" in getattr(h, "__qualname__", ""))


def test_features_include_reins_effect_and_hooks_run_after_it():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=3, embed_dim=32, num_heads=2, img_size=28).eval()
    before_rein = {}
    # a hook registered BEFORE Rein sees the block's raw output
    vit.blocks[1].register_forward_hook(lambda m, a, out: before_rein.__setitem__("out", out.detach().clone()))
    features = BackboneFeatures(vit, layers=[1])  # built before the injection on purpose
    x = torch.randn(2, 3, 28, 28)
    plain = features(x)[0]
    va.inject_rein(vit, token_length=5, rank=2, link_queries=False)
    rein = vit.vfm_adapters["rein"]
    with torch.no_grad():
        rein.scale.fill_(0.5)
    refined = features(x)[0]
    raw = before_rein["out"]
    expected = rein(raw, layer=1, num_prefix_tokens=1)[:, 1:].transpose(1, 2).reshape(2, 32, 2, 2)
    assert torch.allclose(refined, expected, atol=1e-5)
    assert not torch.allclose(refined, plain, atol=1e-3)
    with torch.no_grad():
        rein.scale.fill_(2.0)
    assert not torch.allclose(features(x)[0], refined, atol=1e-3)  # features follow Rein's scale
    va.remove_adapters(vit)
    assert torch.allclose(features(x)[0], plain, atol=1e-6)


def test_neck_and_heads_shapes():
    neck = MultiScaleNeck(16)
    maps = neck([torch.randn(2, 16, 8, 8) for _ in range(4)])
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert FPNHead([16] * 4, 5, channels=8)(maps).shape == (2, 5, 32, 32)
    assert LinearHead([16] * 4, 5)(maps).shape == (2, 5, 32, 32)
    odd = MultiScaleNeck(8, scales=(1.5,))([torch.randn(1, 8, 4, 4)])
    assert odd[0].shape[-2:] == (6, 6)


def test_loss_ignores_255_and_handles_all_ignored():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 4, 4), 255)
    loss = segmentation_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
    labels[0, 0, 0] = 2
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([2]))
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ optimiser
def test_parameter_groups_put_no_decay_on_tokens_scale_norms_biases():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    model = Segmentor(va.inject_rein(vit, token_length=4, rank=2, link_queries=False), 3, head_channels=8)
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.05, no_decay="small_tensors")
    names = {name: group["weight_decay"] for group in groups for name in group["names"]}
    rein = "features.model.vfm_adapters.rein."
    for key in ("tokens_a", "tokens_b", "scale", "token_to_feature.bias"):
        assert names[rein + key] == 0.0
    assert names[rein + "token_to_feature.weight"] == 0.05
    assert names["head.classifier.weight"] == 0.05
    assert names["head.classifier.bias"] == 0.0
    assert all(v == 0.0 for k, v in names.items() if ".1.weight" in k and "refine" in k)  # GroupNorm weights
    assert not any(k.startswith("features.model.blocks") for k in names)  # the host is frozen
    assert no_weight_decay("features.model.pos_embed", torch.zeros(1, 5, 8))
    assert no_weight_decay("features.model.vfm_adapters.vpt.prompts", torch.zeros(2, 5, 8))


def test_poly_schedule_with_warmup():
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(100, 100) == 0.0
    assert poly_factor(50, 100, power=1.0) == pytest.approx(0.5)
    assert poly_factor(0, 100, warmup_iters=10, warmup_ratio=0.1) == pytest.approx(0.1)
    assert poly_factor(5, 100, power=1.0, warmup_iters=10, warmup_ratio=0.0) == pytest.approx(0.5 * 0.95)
    assert poly_factor(100, 100, min_ratio=0.1) == pytest.approx(0.1)


# ------------------------------------------------------------------ training and resume
def _config(output: Path, iterations: int = 6, **train_options) -> dict:
    return {
        "model": {"backbone": "vit_tiny_patch16_224",
                  "backbone_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
                                      "dynamic_img_size": True},
                  "methods": ["rein"], "method_options": {"rein": {"token_length": 4, "rank": 2}},
                  "num_classes": 7, "head_channels": 8},
        "data": {"train": [{"type": "synthetic", "num_images": 6, "size": 32, "seed": 1},
                           {"type": "synthetic", "domain": "fog", "num_images": 4, "size": 32, "seed": 2, "weight": 1}],
                 "val": [{"type": "synthetic", "domain": "night", "num_images": 2, "size": 32, "seed": 3, "name": "night"}],
                 "crop_size": [24, 24], "scale": [32, 32], "ratio_range": [0.75, 1.5], "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_iters": 2},
        "train": {"iterations": iterations, "batch_size": 2, "grad_accum": 2, "checkpoint_interval": 2,
                  "log_interval": 1, "output_dir": str(output), **train_options},
        "eval": {"mode": "slide", "crop": 24, "stride": 16},
    }


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, one_thread):
    full = train(_config(tmp_path / "full"), progress=False, log=lambda s: None)
    assert full["finished"] and full["step"] == 6

    first = train(_config(tmp_path / "split"), stop_after=3, progress=False, log=lambda s: None)
    assert not first["finished"] and first["step"] == 3
    assert not (tmp_path / "split" / "head.safetensors").exists()
    assert json.loads((tmp_path / "split" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3
    resumed = train(_config(tmp_path / "split"), resume=True, progress=False, log=lambda s: None)
    assert resumed["finished"] and resumed["step"] == 6

    a, b = trained_state(full["model"]), trained_state(resumed["model"])
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert full["results"]["night"]["mIoU"] == resumed["results"]["night"]["mIoU"]
    # the run changed what it trains, and only that
    fresh = train(_config(tmp_path / "short", iterations=1), progress=False, log=lambda s: None, evaluate_at_end=False)
    assert any(not torch.equal(a[n], trained_state(fresh["model"])[n]) for n in a)
    assert not list((tmp_path / "split").glob(".*.tmp"))  # atomic writes leave no temporary files


def test_saved_segmentor_round_trips(tmp_path, one_thread):
    outcome = train(_config(tmp_path / "run", iterations=2), progress=False, log=lambda s: None, evaluate_at_end=False)
    run = tmp_path / "run"
    assert (run / "adapters" / "adapter_config.json").is_file() and (run / "head.safetensors").is_file()
    assert not (run / "backbone.safetensors").exists()  # a frozen host is not saved
    loaded, info = load_segmentor(run)
    assert info["methods"] == ["rein"]
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), outcome["model"].eval()(x), atol=1e-6)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config({"train": {"iteration": 5}})
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config({"trainer": {}})
    with pytest.raises(ConfigError, match="positive integer"):
        load_config({"train": {"batch_size": 0}})
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iterations: 3\nmodel:\n  methods: rein,lora\n")
    config = load_config(path)
    assert config["train"]["iterations"] == 3 and config["model"]["methods"] == ["rein", "lora"]


def test_train_and_eval_commands(tmp_path, one_thread, capsys):
    import yaml

    config = _config(tmp_path / "cli", iterations=2)
    config["model"]["methods"] = ["freeze"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--no-progress"]) == 0
    assert (tmp_path / "cli" / "results.json").is_file()
    assert not (tmp_path / "cli" / "adapters").exists()  # "freeze" has no adapter to save
    assert main(["eval", str(tmp_path / "cli"), "--mode", "whole", "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "night: mIoU" in out and "| sky |" in out


def test_an_existing_run_is_never_silently_replaced(tmp_path, one_thread):
    first = train(_config(tmp_path / "run", iterations=2), progress=False, log=lambda s: None, evaluate_at_end=False)
    head = (tmp_path / "run" / "head.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_config(tmp_path / "run", iterations=2), progress=False, log=lambda s: None, evaluate_at_end=False)
    assert (tmp_path / "run" / "head.safetensors").read_bytes() == head
    again = train(_config(tmp_path / "run", iterations=2), overwrite=True, progress=False, log=lambda s: None,
                  evaluate_at_end=False)
    assert again["finished"] and first["finished"]
