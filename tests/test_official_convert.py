"""``vfm-adapters convert official-rein``: an authors'-layout checkpoint to a run directory ``eval`` reads.

The checkpoint (Rein under ``backbone.reins.``, the mmdet head under ``decode_head.``)
and the converted DINOv2 file (facebookresearch names) are written here from the
authors' names and shapes, for a tiny model described by a tiny config.
"""

from __future__ import annotations

import json

import pytest
import test_official_backbone as official_backbone_tests
import torch
import yaml
from test_official_backbone import facebook_dinov2_state
from test_official_head import mmdet_shapes
from test_official_rein import authors_state

import vfm_adapters as va
from vfm_adapters.seg.official_run import convert_official_rein
from vfm_adapters.cli import main
from vfm_adapters.official import OFFICIAL_REIN_PREFIX
from vfm_adapters.seg.training import ConfigError, load_segmentor

C, DEPTH, TOKENS, RANK, CLASSES = 32, 2, 4, 2, 7
HEAD = dict(num_decoder_layers=1, num_heads=2, ffn_dim=16, hidden_dim=C, pixel_decoder_layers=1,
            pixel_decoder_ffn_dim=16, num_points=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(scales=(1, 1, 1, 1)) -> dict:
    # scales 1 everywhere: a neck without parameters on a 2 x 2 patch grid (the paper's neck is model.neck: interpolate)
    return {
        "model": {"backbone": "vit_small_patch14_dinov2",
                  "backbone_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": C, "depth": DEPTH, "num_heads": 2},
                  "methods": ["rein"], "method_options": {"rein": {"token_length": TOKENS, "rank": RANK, "query_dim": C}},
                  "layers": [0, 1, 1, 1], "scales": list(scales), "num_classes": CLASSES, "head": "mask2former",
                  "head_options": HEAD},
        "data": {"train": [], "val": []},
        "eval": {"mode": "whole"},
    }


def released_files(tmp_path):
    generator = torch.Generator().manual_seed(11)
    head = {name: torch.randn(shape, generator=generator) * 0.2 for name, shape in mmdet_shapes(
        True, C=C, IN=C, CLASSES=CLASSES, QUERIES=TOKENS, HEADS=2, FFN=16, ENC_FFN=16, ENC_LAYERS=1, DEC_LAYERS=1).items()}
    rein = authors_state(layers=DEPTH, tokens=TOKENS, rank=RANK, width=C, query=C, seed=12)
    checkpoint = tmp_path / "dinov2_rein_and_head.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": {**rein, **head, "auxiliary_head.conv.weight": torch.zeros(1)}},
               checkpoint)
    backbone = tmp_path / "dinov2_converted.pth"
    assert (official_backbone_tests.C, official_backbone_tests.DEPTH) == (C, DEPTH)  # its file fits this config
    torch.save(facebook_dinov2_state(seed=13), backbone)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    return checkpoint, backbone, config, rein, head


def test_convert_then_eval_uses_exactly_the_authors_weights(tmp_path, capsys):
    checkpoint, backbone, config, rein, head = released_files(tmp_path)
    out = tmp_path / "run"
    assert main(["convert", "official-rein", str(checkpoint), str(out), "--config", str(config),
                 "--backbone", str(backbone)]) == 0
    assert "auxiliary_head.conv.weight" in capsys.readouterr().out  # reported, not silently dropped
    assert {p.name for p in out.iterdir()} >= {"segmentor.json", "head.safetensors", "adapters", "backbone.safetensors",
                                               "config.json"}
    model, info = load_segmentor(out)
    assert info["ignored_keys"] == ["auxiliary_head.conv.weight"]
    exported = va.export_official_rein(model.backbone)
    assert set(exported) == set(rein) and all(torch.equal(exported[k], rein[k]) for k in rein)
    head_state = model.head.state_dict()
    assert torch.equal(head_state["class_predictor.weight"], head["decode_head.cls_embed.weight"])
    assert torch.equal(head_state["transformer.query_link.bias"], head["decode_head.querys2feat.bias"])
    host = facebook_dinov2_state(seed=13)
    assert torch.equal(model.backbone.pos_embed, host["pos_embed"])
    assert torch.equal(model.backbone.blocks[1].ls2.gamma, host["blocks.1.ls2.gamma"])
    capsys.readouterr()
    results = tmp_path / "results.json"
    assert main(["eval", str(out), "--data", "fog=synthetic:fog:32:2", "--device", "cpu",
                 "--output", str(results)]) == 0
    scores = json.loads(results.read_text())["fog"]
    assert scores["images"] == 2 and 0.0 <= scores["mIoU"] <= 100.0


def test_convert_refuses_a_neck_with_parameters_and_an_existing_run(tmp_path):
    checkpoint, backbone, config, _, _ = released_files(tmp_path)
    learnable = tmp_path / "learnable.yaml"
    learnable.write_text(yaml.safe_dump(tiny_config(scales=(4, 2, 1, 0.5))))
    with pytest.raises(ConfigError, match="neck has .* parameters"):
        convert_official_rein(checkpoint, tmp_path / "a", learnable, backbone=backbone)
    assert not (tmp_path / "a" / "segmentor.json").exists()
    out = convert_official_rein(checkpoint, tmp_path / "b", config, backbone=backbone)
    with pytest.raises(ConfigError, match="already holds a run"):
        convert_official_rein(checkpoint, out, config, backbone=backbone)
    convert_official_rein(checkpoint, out, config, backbone=backbone, overwrite=True)


def test_convert_refuses_a_config_of_another_rein(tmp_path):
    checkpoint, backbone, _, _, _ = released_files(tmp_path)
    other = tiny_config()
    other["model"]["method_options"]["rein"]["rank"] = RANK + 1
    with pytest.raises(va.AdapterError, match="rank"):
        convert_official_rein(checkpoint, tmp_path / "run", other, backbone=backbone)
    no_backbone = tiny_config()
    with pytest.raises(ConfigError, match="no backbone weights"):
        convert_official_rein(checkpoint, tmp_path / "run", no_backbone)
    assert OFFICIAL_REIN_PREFIX == "backbone.reins."


def test_convert_a_frozen_backbone_release_with_the_plain_head(tmp_path):
    """The authors' frozen-VFM baseline: no Rein, mmdet's own query tables (query_embed / query_feat)."""
    generator = torch.Generator().manual_seed(14)
    head = {name: torch.randn(shape, generator=generator) * 0.2 for name, shape in mmdet_shapes(
        False, C=C, IN=C, CLASSES=CLASSES, QUERIES=TOKENS, HEADS=2, FFN=16, ENC_FFN=16, ENC_LAYERS=1, DEC_LAYERS=1).items()}
    full = {**head, **{f"backbone.{k}": v for k, v in facebook_dinov2_state(seed=15).items()}}  # generate_full_weights
    checkpoint = tmp_path / "frozen_dinov2_mask2former.pth"
    torch.save({"state_dict": full}, checkpoint)
    config = tiny_config()
    config["model"].update(methods=["freeze"], method_options={})
    config["model"]["head_options"] = dict(HEAD, num_queries=TOKENS)
    out = convert_official_rein(checkpoint, tmp_path / "run", config)
    model, info = load_segmentor(out)
    assert va.injected_methods(model.backbone) == [] and not model.head.link_rein_queries
    assert torch.equal(model.head.transformer.queries_embedder.weight, head["decode_head.query_embed.weight"])
    assert torch.equal(model.backbone.blocks[0].attn.qkv.bias, full["backbone.blocks.0.attn.qkv.bias"])
    with pytest.raises(ConfigError, match="holds no Rein"):
        convert_official_rein(checkpoint, tmp_path / "other", tiny_config())
