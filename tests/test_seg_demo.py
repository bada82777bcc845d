"""The demo's pipeline on a tiny configuration, and the synthetic domains it is built on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vfm_adapters.cli import main
from vfm_adapters.methods.base import available_methods
from vfm_adapters.seg.synthetic import DOMAINS, SYNTHETIC_CLASSES, SyntheticScenes, apply_domain, render_scene
from vfm_adapters.seg.checkpoints import load_segmentor


def test_scenes_are_deterministic_and_domains_share_layouts():
    a, b = SyntheticScenes("source", 3, 48, seed=5), SyntheticScenes("source", 3, 48, seed=5)
    assert torch.equal(a[1]["image"], b[1]["image"]) and torch.equal(a[1]["label"], b[1]["label"])
    assert not torch.equal(a[0]["label"], SyntheticScenes("source", 3, 48, seed=6)[0]["label"])
    for domain in DOMAINS[1:]:
        shifted = SyntheticScenes(domain, 3, 48, seed=5)[1]
        assert torch.equal(shifted["label"], a[1]["label"])
        assert not torch.equal(shifted["image"], a[1]["image"])
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        SyntheticScenes("sandstorm")


def test_scenes_hold_every_class_and_shifts_change_statistics():
    counts = np.zeros(len(SYNTHETIC_CLASSES))
    for seed in range(20):
        image, label = render_scene(np.random.default_rng(seed), 64)
        counts += np.bincount(label.ravel(), minlength=len(SYNTHETIC_CLASSES))
        assert image.min() >= 0 and image.max() <= 1
    assert (counts > 0).all()
    image, label = render_scene(np.random.default_rng(0), 64)
    rng = np.random.default_rng(1)
    assert apply_domain(image, label, "night", rng).mean() < 0.5 * image.mean()
    assert apply_domain(image, label, "fog", rng).std() < image.std()
    assert np.abs(apply_domain(image, label, "noise", rng) - image).mean() > 0.05


def test_tiny_demo_end_to_end(tmp_path, capsys):
    methods = ["freeze", "rein"] + [m for m in ("lora", "vpt") if m in available_methods()]
    code = main(["demo", "--tiny", "--output", str(tmp_path), "--no-progress", "--threads", "1",
                 "--methods", ",".join(methods)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| run | source | fog | night | noise | colour | avg (targets) |" in out
    assert "pre-training stand-in" in out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == set(methods)
    for per_domain in results.values():
        assert set(per_domain) == set(DOMAINS)
        assert all(0 <= r["mIoU"] <= 100 for r in per_domain.values())
    assert (tmp_path / "predictions.png").stat().st_size > 1000
    assert (tmp_path / "rein" / "adapters" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "rein" / "head.safetensors").is_file()
    assert not (tmp_path / "rein" / "checkpoint.pt").exists()
    # the saved adapters + head (+ the pre-trained stand-in backbone) reload to the same predictions
    model, info = load_segmentor(tmp_path / "rein")
    assert info["methods"] == ["rein"]
    sample = SyntheticScenes("source", 1, 32, seed=3)[0]
    x = (sample["image"][None].float() - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    assert model(x).shape == (1, len(SYNTHETIC_CLASSES), 32, 32)


def test_demo_rejects_unknown_methods(tmp_path, capsys):
    assert main(["demo", "--tiny", "--output", str(tmp_path), "--methods", "rein,nonsense"]) == 2
    assert "unknown method" in capsys.readouterr().out
