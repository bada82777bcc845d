"""The Mask2Former head (transformers' parts), Rein's query link, and the paper configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import yaml

import vfm_adapters as va
from vfm_adapters.seg.mask2former import (
    Mask2FormerHead,
    Mask2FormerOutput,
    Mask2FormerSegmentor,
    build_mask2former_segmentor,
    semantic_inference,
    semantic_targets,
)
from vfm_adapters.seg.training import build_backbone, load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ROOT / "examples" / "configs" / "paper"
CONFIG_FILES = sorted(p for p in PAPER_CONFIGS.glob("*.yaml") if p.name != "expected_miou.yaml")

TINY = dict(num_queries=6, num_decoder_layers=2, num_heads=2, ffn_dim=64, hidden_dim=32,
            pixel_decoder_layers=1, pixel_decoder_ffn_dim=64, num_points=256)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_maps(batch: int = 2, channels: int = 16, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // s, size // s, generator=generator) for s in (4, 8, 16, 32)]


def block_labels(batch: int = 2, size: int = 32, classes: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, classes, (batch, 4, 4), generator=generator)
    cells[:, 0, 0] = 255
    return cells.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2)


# ----------------------------------------------------------------------------- head
def test_forward_shapes_deep_supervision_and_finite_loss():
    torch.manual_seed(0)
    head = Mask2FormerHead(4, [16] * 4, **TINY)
    out = head(tiny_maps())
    assert out.class_logits.shape == (2, 6, 5)
    assert out.mask_logits.shape == (2, 6, 8, 8)  # stride 4 of a 32 px image
    assert len(out.auxiliary) == TINY["num_decoder_layers"]  # initial queries + all but the last layer
    terms = head.loss_terms(out, block_labels())
    assert len(terms) == 3 * (TINY["num_decoder_layers"] + 1)
    assert {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_dice_0", "loss_mask_1"} <= set(terms)
    assert all(torch.isfinite(v) and v >= 0 for v in terms.values())
    torch.manual_seed(1)
    total = head.loss(out, block_labels())
    torch.manual_seed(1)
    assert torch.allclose(total, sum(head.loss_terms(out, block_labels()).values()))


def test_deep_supervision_off_gives_three_terms():
    head = Mask2FormerHead(4, [16] * 4, deep_supervision=False, **TINY)
    assert set(head.loss_terms(head(tiny_maps()), block_labels())) == {"loss_cross_entropy", "loss_mask", "loss_dice"}


def test_loss_weights_are_applied():
    torch.manual_seed(0)
    head = Mask2FormerHead(4, [16] * 4, deep_supervision=False, **TINY)
    out = head(tiny_maps())
    labels = block_labels()
    torch.manual_seed(1)
    weighted = head.loss_terms(out, labels)
    torch.manual_seed(1)
    raw = head.criterion(out.mask_logits, out.class_logits, *semantic_targets(labels))
    assert torch.allclose(weighted["loss_cross_entropy"], 2.0 * raw["loss_cross_entropy"])
    assert torch.allclose(weighted["loss_mask"], 5.0 * raw["loss_mask"])
    assert torch.allclose(weighted["loss_dice"], 5.0 * raw["loss_dice"])


def test_loss_decreases_over_a_few_steps():
    torch.manual_seed(0)
    head = Mask2FormerHead(4, [16] * 4, **TINY)
    maps, labels = tiny_maps(), block_labels()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = head.loss(head(maps), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_all_ignored_image_still_gives_a_finite_loss():
    head = Mask2FormerHead(4, [16] * 4, **TINY)
    labels = block_labels()
    labels[1] = 255
    loss = head.loss(head(tiny_maps()), labels)
    assert torch.isfinite(loss)
    loss.backward()


def test_semantic_targets_one_mask_per_present_class():
    labels = torch.tensor([[[2, 2, 255], [0, 2, 255]], [[255, 255, 255], [255, 255, 255]]])
    masks, classes = semantic_targets(labels)
    assert classes[0].tolist() == [0, 2]
    assert masks[0].tolist() == [[[0, 0, 0], [1, 0, 0]], [[1, 1, 0], [0, 1, 0]]]
    assert classes[1].numel() == 0 and masks[1].shape == (0, 2, 3)


def test_semantic_inference_equals_class_times_mask_probabilities():
    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(2, 5, 4, generator=generator)
    mask_logits = torch.randn(2, 5, 6, 7, generator=generator)
    scores = semantic_inference(class_logits, mask_logits)
    assert scores.shape == (2, 3, 6, 7)
    probs, masks = class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid()  # no-object dropped after softmax
    expected = torch.zeros(2, 3, 6, 7)
    for b in range(2):
        for c in range(3):
            for q in range(5):
                expected[b, c] += probs[b, q, c] * masks[b, q]
    assert torch.allclose(scores, expected, atol=1e-6)
    resized = semantic_inference(class_logits, mask_logits, size=(12, 14))
    assert resized.shape == (2, 3, 12, 14)
    head = Mask2FormerHead(3, [16] * 4, **TINY)
    assert torch.equal(head.predict(Mask2FormerOutput(class_logits, mask_logits), size=(12, 14)), resized)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_matching_recovers_the_known_assignment(order):
    # Image: left half class 2, right half class 0 (targets in class order: 0 -> right, 2 -> left).
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :, :8] = 2
    right, left = torch.full((16, 16), -8.0), torch.full((16, 16), -8.0)
    right[:, 8:], left[:, :8] = 8.0, 8.0
    # Three query designs: "class 0 on the right", "no object", "class 2 on the left".
    designs = [(0, right), (3, torch.full((16, 16), -8.0)), (2, left)]
    class_logits = torch.full((1, 3, 4), -5.0)
    mask_logits = torch.empty(1, 3, 16, 16)
    for query, design in zip(order, designs):
        class_logits[0, query, design[0]] = 5.0
        mask_logits[0, query] = design[1]
    head = Mask2FormerHead(3, [16] * 4, **TINY)
    (queries, targets), = head.match(Mask2FormerOutput(class_logits, mask_logits), labels)
    assignment = dict(zip(targets.tolist(), queries.tolist()))
    assert assignment == {0: order[0], 1: order[2]}


# ----------------------------------------------------------------------------- Rein link
def rein_vit(token_length: int = 6, query_dim: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32, num_heads=2, img_size=56)
    return va.inject_rein(vit, token_length=token_length, query_dim=query_dim)


def test_rein_query_link_gradients_reach_the_tokens_from_the_head_loss_alone():
    vit = rein_vit()
    rein = vit.vfm_adapters["rein"]
    head = Mask2FormerHead(4, [16] * 4, link_rein_queries=True, **TINY)
    assert not hasattr(head.transformer, "queries_embedder") and not hasattr(head.transformer, "queries_features")
    # Random maps that do not come from the backbone: the only path to Rein is the link.
    loss = head.loss(head(tiny_maps(), queries=va.rein_queries(vit)), block_labels())
    loss.backward()
    for name in ("tokens_a", "tokens_b", "transform.weight", "transform.bias", "merge.weight", "merge.bias"):
        grad = rein.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert rein.token_to_feature.weight.grad is None and rein.delta_feature.weight.grad is None
    assert rein.scale.grad is None


def test_linked_queries_are_every_layer_position_embedding_and_the_initial_features():
    vit = rein_vit()
    head = Mask2FormerHead(4, [16] * 4, link_rein_queries=True, **TINY).eval()
    queries = va.rein_queries(vit).detach()
    seen = {}

    def capture_layer(module, args, kwargs):
        seen.setdefault("position", []).append(args[4])  # query_position_embeddings (Q, B, C)

    def capture_decoder(module, args, kwargs):
        seen["features"] = kwargs["inputs_embeds"]

    handles = [layer.register_forward_pre_hook(capture_layer, with_kwargs=True) for layer in head.transformer.decoder.layers]
    handles.append(head.transformer.decoder.register_forward_pre_hook(capture_decoder, with_kwargs=True))
    with torch.no_grad():
        head(tiny_maps(), queries=queries)
    for handle in handles:
        handle.remove()
    expected = queries[:, None].expand(-1, 2, -1)
    assert len(seen["position"]) == TINY["num_decoder_layers"]
    assert all(torch.equal(p, expected) for p in seen["position"])
    assert torch.allclose(seen["features"], head.transformer.query_link(expected))


def test_link_arguments_are_checked():
    linked = Mask2FormerHead(4, [16] * 4, link_rein_queries=True, **TINY)
    own = Mask2FormerHead(4, [16] * 4, **TINY)
    with pytest.raises(ValueError, match="link_rein_queries=True"):
        linked(tiny_maps())
    with pytest.raises(ValueError, match="own query embeddings"):
        own(tiny_maps(), queries=torch.randn(6, 32))
    with pytest.raises(ValueError, match="queries must be"):
        linked(tiny_maps(), queries=torch.randn(6, 16))
    with pytest.raises(ValueError, match="query_dim"):
        Mask2FormerHead(4, [16] * 4, link_rein_queries=True, query_dim=64, **TINY)
    with pytest.raises(ValueError, match="4 maps"):
        own(tiny_maps()[:3])


def test_segmentor_trains_rein_through_features_and_link():
    vit = rein_vit()
    seg = Mask2FormerSegmentor(vit, num_classes=4, **{k: v for k, v in TINY.items() if k != "num_queries"})
    assert seg.head.link_rein_queries and seg.head.config.num_queries == 6
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    labels = block_labels(size=56)
    loss = seg(images, labels)
    loss.backward()
    rein = vit.vfm_adapters["rein"]
    for param in (rein.tokens_a, rein.merge.weight, rein.token_to_feature.weight, rein.delta_feature.weight, rein.scale):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in vit.named_parameters() if not n.startswith("vfm_adapters"))
    seg.eval()
    with torch.no_grad():
        scores = seg(images)
    assert scores.shape == (2, 4, 56, 56) and torch.all(scores >= 0)


def test_segmentor_without_rein_uses_its_own_queries():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32, num_heads=2, img_size=56)
    seg = Mask2FormerSegmentor(vit, num_classes=3, **TINY)
    assert not seg.head.link_rein_queries and seg.queries() is None
    assert seg(torch.randn(1, 3, 56, 56)).shape == (1, 3, 56, 56)


# ----------------------------------------------------------------------------- configs
EXPECTED = yaml.safe_load((PAPER_CONFIGS / "expected_miou.yaml").read_text())


def test_every_config_has_expected_miou_and_consistent_averages():
    assert {p.name for p in CONFIG_FILES} == set(EXPECTED)
    assert len(CONFIG_FILES) >= 12
    for name, entry in EXPECTED.items():
        config = load_config(PAPER_CONFIGS / name)
        val_names = [spec["name"] for spec in config["data"]["val"]]
        if "miou" not in entry:  # Table 6 prints only the average over the targets
            assert entry["source"].startswith("Table 6") and val_names == ["cityscapes", "bdd", "mapillary"], name
            assert f"average {entry['average']} " in (PAPER_CONFIGS / name).read_text().split("model:")[0], name
            continue
        assert set(entry["miou"]) == set(val_names), name
        if "average" in entry and not entry.get("average_as_printed"):  # the paper's average of its rounded numbers
            assert abs(sum(entry["miou"].values()) / len(entry["miou"]) - entry["average"]) <= 0.1, name
        assert str(entry["miou"][val_names[0]]) in (PAPER_CONFIGS / name).read_text().split("model:")[0], name


def test_table6_rows_match_the_paper():
    averages = {name: EXPECTED[f"gtav_{name}.yaml"]["average"] for name in
                ("resnet50_full", "resnet50_rein", "resnet101_full", "resnet101_rein", "convnext_l_full", "convnext_l_rein")}
    assert averages == {"resnet50_full": 38.9, "resnet50_rein": 46.6, "resnet101_full": 46.1, "resnet101_rein": 46.3,
                        "convnext_l_full": 52.2, "convnext_l_rein": 55.5}


def test_rein_dinov2_rows_match_the_paper_table():
    rein = EXPECTED["gtav_dinov2_l_rein.yaml"]
    assert rein["miou"] == {"cityscapes": 66.4, "bdd": 60.4, "mapillary": 66.1} and rein["average"] == 64.3
    assert EXPECTED["gtav_synthia_dinov2_l_rein.yaml"]["miou"] == {"cityscapes": 68.1}
    assert EXPECTED["citys_acdc_dinov2_l_rein_1024.yaml"]["miou"]["acdc"] == 77.0


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_paper_config_parses_and_builds_on_meta(path):
    config = load_config(path)
    model_config = config["model"]
    assert model_config["head"] == "mask2former"
    assert model_config["backbone_kwargs"]["pretrained_cfg_overlay"]["file"]  # real weights from a local file
    with torch.device("meta"):
        seg = build_mask2former_segmentor(dict(model_config, pretrained=False))
    trainable = sum(p.numel() for p in seg.backbone.parameters() if p.requires_grad)
    assert f"{trainable / 1e6:.2f}M" == EXPECTED[path.name]["trainable"]
    head = seg.head.config
    assert (head.num_decoder_layers, head.num_heads, head.ffn_dim, head.hidden_dim, head.pixel_decoder_layers,
            head.num_points, head.num_queries) == (9, 8, 2048, 256, 6, 12544, 100)
    assert (head.class_weight, head.no_object_weight, head.mask_weight, head.dice_weight) == (2.0, 0.1, 5.0, 5.0)
    assert seg.head.link_rein_queries == ("rein" in model_config["methods"])
    assert len(seg.head.transformer.decoder.layers) == 9


def test_patch_embedding_resampled_from_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64, num_heads=2, img_size=56, num_classes=0)
    file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    backbone = build_backbone({"backbone": "vit_small_patch14_dinov2", "pretrained": True, "backbone_checkpoint": None,
                               "backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64,
                                                   "patch_size": 16, "pretrained_cfg_overlay": {"file": str(file)}}})
    assert backbone.patch_embed.proj.weight.shape == (64, 3, 16, 16)
    assert torch.equal(backbone.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert not torch.equal(backbone.patch_embed.proj.weight[..., :14, :14], torch.zeros(64, 3, 14, 14))


def test_the_trainer_runs_and_reloads_a_mask2former_config(tmp_path):
    """`vfm-adapters train` with `head: mask2former`: loss inside forward, Rein linked, reload."""
    from vfm_adapters.seg.training import load_segmentor, train, trained_state

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = {
            "model": {"backbone": "vit_small_patch14_dinov2",
                      "backbone_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4,
                                          "num_heads": 2, "dynamic_img_size": True},
                      "methods": ["rein"], "method_options": {"rein": {"token_length": 4, "rank": 2, "query_dim": 32}},
                      "num_classes": 7, "head": "mask2former",
                      "head_options": {"num_decoder_layers": 1, "num_heads": 2, "ffn_dim": 16, "hidden_dim": 32,
                                       "pixel_decoder_layers": 1, "pixel_decoder_ffn_dim": 16, "num_points": 16}},
            "data": {"train": [{"type": "synthetic", "num_images": 4, "size": 32, "seed": 1}],
                     "val": [], "crop_size": [32, 32], "scale": [32, 32], "ratio_range": [1.0, 1.0], "num_workers": 0},
            "optim": {"lr": 1e-3},
            "train": {"iterations": 2, "batch_size": 2, "checkpoint_interval": 2, "log_interval": 1,
                      "output_dir": str(tmp_path / "run")},
        }
        outcome = train(config, progress=False, log=lambda line: None, evaluate_at_end=False)
        model = outcome["model"]
        assert model.head.link_rein_queries and outcome["step"] == 2
        assert "features.model.vfm_adapters.rein.tokens_a" in trained_state(model)
        loaded, info = load_segmentor(tmp_path / "run")
        images = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), model.eval()(images))
    finally:
        torch.set_num_threads(previous)


def test_every_name_keeps_its_import_path():
    """The package split by job still answers every name at ``vfm_adapters.seg.mask2former``."""
    import importlib

    from vfm_adapters.seg import mask2former
    from vfm_adapters.seg.build import segmentor_class

    homes = {
        "config": ["Mask2FormerHeadConfig", "Mask2FormerOutput", "semantic_inference", "semantic_targets"],
        "head": ["Mask2FormerHead"],
        "segmentor": ["MASK2FORMER_METHOD_DEFAULTS", "Mask2FormerSegmentor", "build_mask2former_segmentor"],
        "official": ["OFFICIAL_HEAD_PREFIX", "export_official_head", "load_official_head", "official_head_mapping"],
    }
    for module_name, names in homes.items():
        module = importlib.import_module(f"vfm_adapters.seg.mask2former.{module_name}")
        for name in names:
            assert getattr(mask2former, name) is getattr(module, name), name
    assert set(mask2former.__all__) <= {name for names in homes.values() for name in names}
    assert segmentor_class("mask2former") is mask2former.Mask2FormerSegmentor
    assert mask2former.MASK2FORMER_METHOD_DEFAULTS == {"rein": {"link_queries": True}}
    assert mask2former.OFFICIAL_HEAD_PREFIX == "decode_head."
