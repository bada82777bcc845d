"""Tests of the adaptation recipes (DACS, self-training with SAM refinement) on tiny models."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import numpy as np
import pytest

from vfm_adapters.seg.config import ConfigError
import timm
import torch
import transformers
from torch import nn

import vfm_adapters as va
from vfm_adapters.adaptation import (
    DACSConfig,
    DACSTrainer,
    DecodeHead,
    FeatureSegmentor,
    RareClassSampler,
    SamRefineConfig,
    SamRefiner,
    SelfTrainer,
    SelfTrainingConfig,
    TimmFeatureEncoder,
    UnlabelledFolder,
    build_trainer,
    class_components,
    class_mix,
    class_mix_mask,
    confidence_weight,
    dacs_step,
    ema_alpha,
    ema_update,
    generate_images,
    load_adaptation_config,
    make_teacher,
    merge_masks,
    pseudo_label,
    rare_class_probabilities,
    train_adaptation,
)
from vfm_adapters.adaptation import generate as generate_module
from vfm_adapters.adaptation.augment import denormalize, normalize
from vfm_adapters.seg import FPNHead, LinearHead, Segmentor

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "examples" / "configs" / "adaptation" / "*.yaml")))


def tiny_segmentor(num_classes: int = 4, seed: int = 0) -> Segmentor:
    """A 2-block timm ViT with Rein and a light FPN head (32x32 inputs)."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    va.inject_rein(vit, token_length=4, rank=4, link_queries=False)
    return Segmentor(vit, num_classes=num_classes, layers=[0, 1, 1, 1], head_channels=8, dropout=0.0)


def tiny_feature_segmentor(num_classes: int = 3, seed: int = 0) -> FeatureSegmentor:
    torch.manual_seed(seed)
    encoder = TimmFeatureEncoder("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    return FeatureSegmentor(encoder, DecodeHead(FPNHead(encoder.channels, num_classes, channels=8, dropout=0.0)))


# ----------------------------------------------------------------------------- ClassMix
def test_class_mix_mask_picks_half_of_the_classes_with_dacs_rounding():
    label = torch.tensor([[0, 0, 3, 3, 255], [5, 5, 3, 7, 7], [5, 9, 9, 7, 255]])
    present = torch.tensor([0, 3, 5, 7, 9])  # n = 5 -> (5 + 1) // 2 = 3 classes
    mask, chosen = class_mix_mask(label, torch.Generator().manual_seed(4))
    expected = present[torch.randperm(5, generator=torch.Generator().manual_seed(4))[:3]]
    assert chosen.tolist() == expected.tolist()
    assert torch.equal(mask, torch.isin(label, expected))
    assert not bool(mask[label == 255].any())
    for n, k in [(1, 1), (2, 1), (3, 2), (4, 2), (6, 3)]:
        lbl = torch.arange(n).repeat(2, 1)
        assert len(class_mix_mask(lbl, torch.Generator().manual_seed(0))[1]) == k


def test_class_mix_pastes_exactly_the_chosen_classes():
    g = torch.Generator().manual_seed(1)
    source_labels = torch.randint(0, 6, (2, 9, 11), generator=g)
    source_labels[:, 0] = 255
    source_images, target_images = torch.rand(2, 3, 9, 11, generator=g), torch.rand(2, 3, 9, 11, generator=g)
    pseudo = torch.randint(0, 6, (2, 9, 11), generator=g)
    weights = torch.full((2, 9, 11), 0.4)
    masks, chosen = zip(*[class_mix_mask(lbl, g) for lbl in source_labels])
    masks = torch.stack(masks)
    images, labels, mixed_w = class_mix(source_images, target_images, source_labels, pseudo, weights, masks)
    for i in range(2):
        pasted = torch.isin(source_labels[i], chosen[i])
        assert torch.equal(pasted, masks[i])
        assert torch.equal(images[i][:, pasted], source_images[i][:, pasted])
        assert torch.equal(images[i][:, ~pasted], target_images[i][:, ~pasted])
        assert torch.equal(labels[i][pasted], source_labels[i][pasted])
        assert torch.equal(labels[i][~pasted], pseudo[i][~pasted])
        assert set(labels[i][pasted].unique().tolist()) == set(chosen[i].tolist())
        assert torch.all(mixed_w[i][pasted] == 1) and torch.all(mixed_w[i][~pasted] == 0.4)


def test_confidence_weight_on_a_hand_made_probability_map():
    logits = torch.log(torch.tensor([[0.97, 0.03], [0.968, 0.032], [0.5, 0.5], [0.1, 0.9]])).T.reshape(1, 2, 2, 2)
    labels, confidence = pseudo_label(logits)
    assert labels.tolist() == [[[0, 0], [0, 1]]]
    # pixels >= 0.968: 0.97 and 0.968 -> 2 of 4
    assert confidence_weight(confidence).tolist() == [0.5]
    two = torch.cat([confidence, torch.full((1, 2, 2), 0.99)])
    assert confidence_weight(two).tolist() == [0.75, 0.75]  # one scalar per batch (REFERENCE)
    assert confidence_weight(two, per="image").tolist() == [0.5, 1.0]
    with pytest.raises(ValueError):
        confidence_weight(two, per="pixel")


# ----------------------------------------------------------------------------- mean teacher
def test_ema_formula_hand_computed_for_parameters_and_buffers():
    assert [ema_alpha(t) for t in (0, 1, 2, 3)] == [0.0, 0.5, 1 - 1 / 3, 0.75]
    assert ema_alpha(10**6) == 0.99 and ema_alpha(10**6, 0.999) == 0.999 and ema_alpha(0, 0.999, ramp=False) == 0.999
    student = nn.BatchNorm1d(2)
    teacher = make_teacher(student)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([2.0, 4.0]))
        teacher.weight.copy_(torch.tensor([1.0, 0.0]))
        student.running_mean.copy_(torch.tensor([10.0, 20.0]))
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.tensor([0.75 * 1 + 0.25 * 2, 0.25 * 4.0]))
    assert torch.allclose(teacher.running_mean, torch.tensor([2.5, 5.0]))
    assert int(teacher.num_batches_tracked) == 7
    ema_update(teacher, student, 0.0)  # alpha_0 = 0: the teacher becomes the student
    assert torch.equal(teacher.weight, student.weight)


def test_teacher_is_independent_of_the_student():
    student = tiny_segmentor().eval()
    teacher = make_teacher(student)
    x = torch.randn(2, 3, 28, 28)
    before = teacher(x).clone()
    assert torch.allclose(before, student(x))
    student_ptrs = {p.data_ptr() for p in student.parameters()}
    assert not student_ptrs & {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # change only the student's Rein
        for p in va.adapter_parameters(student.backbone):
            p.add_(0.5)
    assert not torch.allclose(student(x), before, atol=1e-4)
    assert torch.equal(teacher(x), before)
    assert len(va.adapter_parameters(teacher.backbone)) == len(va.adapter_parameters(student.backbone))


# ----------------------------------------------------------------------------- DACS steps
def test_dacs_step_mixes_from_the_teacher_and_reduces_the_loss():
    model = tiny_segmentor(num_classes=4)
    g = torch.Generator().manual_seed(0)
    mean, std = DACSConfig().mean, DACSConfig().std  # images that are valid after normalisation
    src = normalize(torch.rand(2, 3, 28, 28, generator=g), mean, std)
    src_lbl = torch.randint(0, 4, (2, 28, 28), generator=g)
    src_lbl[:, :4] = 255
    tgt = normalize(torch.rand(2, 3, 28, 28, generator=g), mean, std)
    config = DACSConfig(jitter_p=0.0, blur_p=0.0, ema_alpha=0.99, seed=3)
    trainer = DACSTrainer(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3), config)
    with torch.no_grad():
        expected_pseudo, confidence = pseudo_label(trainer.teacher(tgt), (28, 28))
    first = trainer.step(src, src_lbl, tgt)
    m = first["masks"]
    assert torch.equal(first["mixed_labels"], torch.where(m, src_lbl, expected_pseudo))
    assert torch.allclose(first["mixed_images"], torch.where(m[:, None], src, tgt), atol=1e-4)
    w = confidence_weight(confidence)[0]
    assert torch.all(first["mixed_weights"][m] == 1) and torch.allclose(first["mixed_weights"][~m], w.expand((~m).sum()))
    assert first["alpha"] == 0.0
    # after step 0 (alpha 0) the teacher equals the student
    for (name, tp), sp in zip(trainer.teacher.named_parameters(), model.parameters()):
        assert torch.equal(tp, sp), name
    outs = [first] + [trainer.step(src, src_lbl, tgt) for _ in range(5)]
    assert trainer.iteration == 6 and outs[-1]["alpha"] == pytest.approx(1 - 1 / 6)
    assert outs[-1]["loss"] < outs[0]["loss"] and outs[-1]["loss_source"] < outs[0]["loss_source"]


def test_dacs_daformer_options_and_augmentation():
    config = DACSConfig.daformer(ignore_top=3, ignore_bottom=2, seed=0, class_mix_scope="image")
    assert config.ema_alpha == 0.999
    student = nn.Conv2d(3, 3, 1)
    teacher = make_teacher(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    src, tgt = torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8)
    lbl = torch.full((1, 10, 8), 255)
    out = dacs_step(student, teacher, opt, src, lbl, tgt, step=5, config=config, generator=torch.Generator().manual_seed(0))
    assert not out["masks"].any()  # only ignore in the source label: nothing pasted
    assert torch.all(out["mixed_weights"][:, :3] == 0) and torch.all(out["mixed_weights"][:, -2:] == 0)
    assert out["alpha"] == pytest.approx(1 - 1 / 6)
    config.class_mix_scope = "batch"  # the authors' code: 255 is a candidate, so the ignored source is pasted
    out = dacs_step(student, teacher, opt, src, lbl, tgt, step=5, config=config, generator=torch.Generator().manual_seed(0))
    assert out["masks"].all() and torch.all(out["mixed_labels"] == 255)
    x = torch.rand(2, 3, 16, 16)
    m, s = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    assert torch.allclose(denormalize(normalize(x, m, s), m, s), x, atol=1e-5)


def test_rare_class_sampling_probabilities_and_sampler():
    counts = np.array([[900, 100, 0], [900, 0, 0], [800, 0, 4000]])
    classes, p = rare_class_probabilities(counts, temperature=0.5)
    freq = np.array([2600, 100, 4000]) / 6700
    expected = np.exp((1 - freq) / 0.5) / np.exp((1 - freq) / 0.5).sum()
    assert classes.tolist() == [0, 1, 2] and np.allclose(p, expected)
    sampler = RareClassSampler(counts, temperature=0.5, min_pixels=50, length=3000, seed=0)
    drawn = np.bincount(list(sampler), minlength=3) / 3000
    # image 0 gets class 0 (1/3 of its share) and class 1; image 2 gets class 2 and class 0
    share = dict(zip(classes.tolist(), p))
    assert drawn[0] == pytest.approx(share[0] / 3 + share[1], abs=0.04)
    assert drawn[2] == pytest.approx(share[0] / 3 + share[2], abs=0.04)


# ----------------------------------------------------------------------------- SAM refinement
def tiny_sam(seed: int = 0) -> transformers.SamModel:
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(seed)
    config = transformers.SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=32,
                                      num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    model = transformers.SamModel(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # tiny configs initialise near zero; draw real weights
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def test_components_are_split_and_small_ones_dropped():
    label = np.full((20, 20), 255)
    label[:10, :10] = 1        # 100 px
    label[15:, 15:] = 1        # 25 px, same class, separate component
    label[:10, 12:] = 2        # 80 px
    comps = class_components(label, min_pixels=30)
    assert [(c, int(m.sum())) for c, m in comps] == [(1, 100), (2, 80)]
    assert len(class_components(label, min_pixels=24)) == 3
    assert class_components(label, min_pixels=100) == [(2, 80)][:0]  # "larger than": 100 is not > 100


def test_sam_refinement_rules_with_controlled_masks(monkeypatch):
    refiner = SamRefiner(tiny_sam(), SamRefineConfig(min_component_pixels=20, points_per_component=5, seed=0))
    label = torch.full((16, 16), 3)
    label[:, :8] = 1     # component of class 1 (128 px)
    label[:, 8:] = 2     # component of class 2 (128 px)
    label[0:2, 0:2] = 4  # small component of class 4 (4 px): dropped
    seen = {}

    def fake_prompt(image, points):
        seen["points"] = points
        n = len(points)
        masks = torch.zeros(n, 3, 16, 16, dtype=torch.bool)
        scores = torch.zeros(n, 3)
        # component 0 (class 1): best = mask 2, covering columns 0..9 (overlaps component 1's mask)
        masks[0, 0, :, :] = True
        masks[0, 2, 4:, 0:10] = True
        scores[0] = torch.tensor([0.1, 0.2, 0.9])
        # component 1 (class 2): best = mask 1, columns 8..15 in rows 4..
        masks[1, 1, 4:, 8:16] = True
        masks[1, 0, :, :] = True
        scores[1] = torch.tensor([0.3, 0.8, 0.1])
        return masks, scores

    monkeypatch.setattr(refiner, "prompt", fake_prompt)
    refined = refiner.refine(torch.zeros(3, 16, 16), label)
    points = seen["points"]
    assert points.shape == (2, 5, 2)
    for comp, cls in enumerate((1, 2)):  # points lie inside their component
        xs, ys = points[comp, :, 0].astype(int), points[comp, :, 1].astype(int)
        assert torch.all(label[ys, xs] == cls)
    expected = torch.full((16, 16), 255)
    expected[4:, 0:8] = 1
    expected[4:, 10:16] = 2   # columns 8, 9 claimed by both masks: ignored
    assert torch.equal(refined, expected)
    assert set(refined.unique().tolist()) <= {1, 2, 255}  # never the dropped class 4, never new classes
    again = refiner.refine(torch.zeros(3, 16, 16), label)
    assert torch.equal(again, refined) and np.array_equal(seen["points"], points)  # seeded


def test_merge_masks_drops_overlaps_and_merges_a_class():
    masks = torch.zeros(3, 2, 4, dtype=torch.bool)
    masks[0, :, :2] = True
    masks[1, :, 3:] = True   # same class as mask 0: merged
    masks[2, 0, 1:3] = True  # overlaps mask 0 at (0, 1)
    assert merge_masks(masks, [5, 5, 6], (2, 4)).tolist() == [[5, 255, 6, 5], [5, 5, 255, 5]]


def test_real_tiny_sam_end_to_end():
    refiner = SamRefiner(tiny_sam(), {"min_component_pixels": 50, "seed": 1})
    label = torch.zeros(40, 48, dtype=torch.long)
    label[:, 24:] = 7
    label[:5, :5] = 3  # 25 px: dropped
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    masks, scores = refiner.prompt(image, np.array([[[5.0, 5.0]] * 5, [[30.0, 20.0]] * 5]))
    assert masks.shape == (2, 3, 40, 48) and scores.shape == (2, 3)
    refined = refiner(image[None], label[None])[0]
    assert refined.shape == (40, 48)
    assert set(refined.unique().tolist()) <= {0, 7, 255}
    assert torch.equal(refined, refiner.refine(image, label))  # deterministic


# ----------------------------------------------------------------------------- self-training
def test_self_training_teacher_updates_every_interval_and_loss_falls():
    model = tiny_feature_segmentor(num_classes=3)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    trainer = SelfTrainer(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3),
                          SelfTrainingConfig(ema_alpha=0.5, ema_interval=2, jitter_p=1.0, blur_p=0.0))
    g = torch.Generator().manual_seed(0)
    src, unl = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    lbl = torch.randint(0, 3, (2, 32, 32), generator=g)
    head0 = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    outs = []
    for step in range(4):
        before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
        out = trainer.step(src, lbl, unl)
        outs.append(out)
        after = trainer.teacher.state_dict()
        if step in (1, 3):
            assert out["teacher_updated"]
            student_after = model.decoder.state_dict()
            for k in after:
                if after[k].dtype.is_floating_point:
                    assert torch.allclose(after[k], 0.5 * before[k] + 0.5 * student_after[k], atol=1e-6), k
        else:
            assert not out["teacher_updated"]
            assert all(torch.equal(after[k], before[k]) for k in after)
        assert not torch.equal(out["augmented_images"], unl)
    assert any(not torch.equal(head0[k], trainer.teacher.state_dict()[k]) for k in head0)
    assert outs[-1]["loss"] < outs[0]["loss"]
    # the encoder (frozen, shared by the teacher) did not move
    assert trainer.teacher.head is not model.decoder.head


def test_self_training_with_sam_refinement_and_unlabelled_folder(tmp_path):
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = UnlabelledFolder(tmp_path)
    assert len(data) == 2 and data[0]["image"].dtype == torch.uint8 and "label" not in data[0]
    images = torch.stack([data[i]["image"] for i in range(2)]).float()
    images = (images - 127.5) / 60.0
    model = tiny_feature_segmentor(num_classes=3)
    refiner = SamRefiner(tiny_sam(), {"min_component_pixels": 8})
    trainer = SelfTrainer(model, config={"mean": (127.5,) * 3, "std": (60.0,) * 3}, refiner=refiner)
    out = trainer.step(None, None, images)
    with torch.no_grad():
        teacher_pred = trainer.teacher.logits(trainer.teacher(model.encoder(images)), (32, 32)).argmax(1)
    pseudo = out["pseudo_labels"]
    assert pseudo.shape == (2, 32, 32)
    # SAM masks may extend past their component, but every label is one of the teacher's classes
    assert set(pseudo.unique().tolist()) <= set(teacher_pred.unique().tolist()) | {255}
    assert np.isfinite(out["loss"])


def test_from_segmentor_view_and_mask2former_decoder():
    from vfm_adapters.adaptation import from_segmentor
    from vfm_adapters.seg.mask2former import Mask2FormerHead

    seg = tiny_segmentor(num_classes=3).eval()
    view = from_segmentor(seg)
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(view(x), seg(x), atol=1e-5)
    head = Mask2FormerHead(3, [8, 16, 16, 16], num_queries=4, num_decoder_layers=1, num_heads=2, ffn_dim=32,
                           hidden_dim=32, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32, num_points=16)
    encoder = TimmFeatureEncoder("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    model = FeatureSegmentor(encoder, DecodeHead(head))
    images = torch.randn(1, 3, 64, 64)
    assert model(images).shape == (1, 3, 64, 64)
    loss = model.decoder.loss(model.decoder(model.encode(images)), torch.randint(0, 3, (1, 64, 64)))
    assert loss.requires_grad and torch.isfinite(loss)


# ----------------------------------------------------------------------------- configs and runs
@pytest.mark.parametrize("path", CONFIGS, ids=[Path(p).stem for p in CONFIGS])
def test_example_configs_parse_and_build_on_meta(path):
    config = load_adaptation_config(path)
    with torch.device("meta"):
        trainer = build_trainer(config)
    model = trainer.student if isinstance(trainer, DACSTrainer) else trainer.model
    assert next(model.parameters()).device.type == "meta"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if "rein" in path:
        assert va.injected_methods(model.backbone) == ["rein"]
        assert trainable < 0.1 * sum(p.numel() for p in model.parameters())
    if "eva02" in path:
        assert trainable == sum(p.numel() for p in model.parameters())  # full fine-tuning
        assert trainer.config.ema_alpha == 0.999
    if config["recipe"] == "self_training":
        assert isinstance(trainer, SelfTrainer) and trainer.config.ema_interval == 100
        assert not any(p.requires_grad for p in model.encoder.parameters())
        assert model.encoder.channels == [192, 384, 768, 1536]


def test_configs_reject_unknown_keys():
    with pytest.raises(ValueError):
        load_adaptation_config({"dacs": {"treshold": 0.9}})
    with pytest.raises(ValueError):
        load_adaptation_config({"data": {"sources": []}})
    with pytest.raises(ValueError):
        load_adaptation_config({"recipe": "mic"})


def test_train_adaptation_runs_a_tiny_dacs_config(tmp_path):
    config = {
        "recipe": "dacs",
        "model": {"backbone": "vit_small_patch14_dinov2", "backbone_kwargs": {"img_size": 28, "depth": 2, "embed_dim": 32,
                  "num_heads": 2}, "methods": ["rein"], "method_options": {"rein": {"token_length": 4, "rank": 4}},
                  "layers": [0, 1, 1, 1], "scales": [4, 2, 1, 1], "head_channels": 8, "num_classes": 7},
        "data": {"source": [{"type": "synthetic", "num_images": 4, "size": 40}],
                 "target": [{"type": "synthetic", "domain": "fog", "num_images": 4, "size": 40}],
                 "val": [{"type": "synthetic", "domain": "fog", "num_images": 1, "size": 28}],
                 "crop_size": [28, 28], "scale": None, "target_scale": None, "num_workers": 0,
                 "rare_class_sampling": {"temperature": 0.1, "min_pixels": 10}},
        "optim": {"lr": 1e-3, "warmup_iters": 1},
        "train": {"iterations": 2, "batch_size": 2, "output_dir": str(tmp_path / "run"), "log_interval": 1},
        "eval": {"mode": "whole"},
    }
    result = train_adaptation(config, log=None, device="cpu")
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "run" / "segmentor.json").is_file() and "synthetic" in result["results"]
    saved = (tmp_path / "run" / "head.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_adaptation(config, log=None, device="cpu")  # never silently replaces a finished run
    assert (tmp_path / "run" / "head.safetensors").read_bytes() == saved
    train_adaptation(config, log=None, device="cpu", overwrite=True)
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == 2  # a new log, not appended


# ----------------------------------------------------------------------------- generation
def test_prompts_and_generation_with_a_stub_pipeline(tmp_path, monkeypatch):
    prompts = generate_module.SCENE_PROMPTS
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)
    text = " ".join(prompts).lower()
    for word in ("rain", "snow", "fog", "night", "sunset", "tokyo", "paris"):
        assert word in text
    from PIL import Image

    calls = []

    class Stub:
        def __call__(self, prompt, height, width, **kwargs):
            calls.append(list(prompt))
            return type("Out", (), {"images": [Image.new("RGB", (width, height)) for _ in prompt]})()

    paths = generate_images(tmp_path, 3, pipeline=Stub(), size=16, batch_size=2)
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]
    assert calls == [list(prompts[:2]), [prompts[2]]]
    generate_images(tmp_path, 3, pipeline=Stub(), size=16)  # resumable: nothing left to draw
    assert len(calls) == 2
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        generate_images(tmp_path / "new", 1, model="any")


def test_dacs_step_keeps_a_frozen_batch_norm_in_eval_mode():
    """A frozen CNN host's batch norms keep their running statistics during adaptation."""
    frozen = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).requires_grad_(False)
    student = nn.Sequential(frozen, nn.Conv2d(4, 3, 1))
    teacher = make_teacher(student)
    before = frozen[1].running_mean.clone()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    src, tgt = torch.randn(2, 3, 8, 8) * 5 + 3, torch.randn(2, 3, 8, 8)
    lbl = torch.randint(0, 3, (2, 8, 8))
    dacs_step(student, teacher, opt, src, lbl, tgt, step=1, config=DACSConfig(seed=0),
              generator=torch.Generator().manual_seed(0))
    assert not frozen[1].training and student[1].training
    assert torch.equal(frozen[1].running_mean, before)


@pytest.mark.parametrize("kind", ["vit", "features"])
def test_dacs_with_a_mask2former_head_is_refused_when_the_config_loads(tmp_path, kind):
    """DACS would train Mask2Former's scores with a per-pixel loss (the wrong objective): refused up front."""
    from vfm_adapters.adaptation.recipes import load_adaptation_config
    from vfm_adapters.seg.config import ConfigError

    config = {"recipe": "dacs", "model": {"kind": kind, "head": "mask2former"},
              "data": {"source": [{"type": "synthetic"}], "target": [{"type": "synthetic", "domain": "fog"}]},
              "train": {"output_dir": str(tmp_path / "run")}}
    with pytest.raises(ConfigError, match="mask2former cannot be trained with recipe: dacs"):
        load_adaptation_config(config)
    assert not (tmp_path / "run").exists()


def test_a_decoder_checkpoint_for_a_vit_model_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="decoder_checkpoint is read only with model.kind: features"):
        load_adaptation_config({"model": {"kind": "vit", "decoder_checkpoint": "stage1/decoder.safetensors"}})
