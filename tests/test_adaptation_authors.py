"""The adaptation recipes as the authors run them (DACS/DAFormer, CLOUDS): issue 15."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from vfm_adapters.adaptation import SamRefineConfig, SamRefiner
from vfm_adapters.adaptation.sam_refine import DEFAULT_SAM

transformers.logging.set_verbosity_error()


def tiny_sam(seed: int = 0) -> transformers.SamModel:
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(seed)
    config = transformers.SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8, window_size=2, global_attn_indexes=[0], mlp_dim=16,
                                      num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=32, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=16, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    return transformers.SamModel(config).eval()


# ----------------------------------------------------------------------------- 1. SAM refinement
def test_sam_falls_back_to_the_teacher_label_when_no_component_qualifies(monkeypatch):
    refiner = SamRefiner(tiny_sam(), SamRefineConfig(min_component_pixels=5000))
    label = torch.randint(0, 4, (16, 16))
    label[0] = 255
    monkeypatch.setattr(refiner, "prompt", lambda *a: pytest.fail("SAM must not be prompted without components"))
    refined = refiner.refine(torch.zeros(3, 16, 16), label)
    assert torch.equal(refined, label) and refined.dtype == torch.long
    assert refined.data_ptr() != label.data_ptr()  # a copy: refining never aliases the teacher's tensor


def test_sam_points_are_x_times_scale_on_a_known_grid(monkeypatch):
    sam = tiny_sam()
    refiner = SamRefiner(sam, SamRefineConfig(min_component_pixels=1))
    seen = {}
    forward = sam.forward

    def spy(*args, **kwargs):
        seen["points"] = kwargs["input_points"].clone()
        return forward(*args, **kwargs)

    monkeypatch.setattr(sam, "forward", spy)
    # a 24 x 48 image into SAM's 32 x 32 input: scale 32 / 48, resized to 16 x 32
    grid = np.array([[[0.0, 0.0], [3.0, 6.0], [47.0, 23.0]], [[12.0, 9.0], [24.0, 12.0], [6.0, 3.0]]])
    refiner.prompt(torch.zeros(3, 24, 48), grid)
    expected = torch.tensor(grid, dtype=torch.float32) * torch.tensor([32 / 48, 16 / 24])
    assert torch.allclose(seen["points"][0], expected)
    assert seen["points"][0, 0, 1].tolist() == [2.0, 4.0]  # (3, 6) -> (2, 4): no +0.5 before the encoder's own


def test_sam_default_is_a_small_sam_loaded_on_first_use():
    refiner = SamRefiner.from_pretrained(config={"min_component_pixels": 10})
    assert refiner.name == DEFAULT_SAM == "facebook/sam-vit-base" and refiner._sam is None  # nothing loaded yet
    from vfm_adapters.adaptation import build_trainer, load_adaptation_config

    cfg = load_adaptation_config({"recipe": "self_training", "sam": {"enabled": True},
                                  "model": {"kind": "features", "encoder": "convnext_atto", "num_classes": 3,
                                            "head": "linear"}})
    trainer = build_trainer(cfg)
    assert trainer.refiner.name == DEFAULT_SAM and trainer.refiner.config.min_component_pixels == 5000
    off = build_trainer(load_adaptation_config({**cfg, "sam": {"enabled": False, "model": "x"}}))
    assert off.refiner is None


# ----------------------------------------------------------------------------- 3. DACS / DAFormer
from torch import nn  # noqa: E402

from vfm_adapters.adaptation import DACSConfig, DACSTrainer, RareClassSampler, class_mix_mask  # noqa: E402
from vfm_adapters.adaptation.dacs import RareClassCrops, RareClassPositions, class_mix_masks  # noqa: E402


class ScalarSegmentor(nn.Module):
    """logits = w * (x[:, :2]): one weight, so the teacher's trajectory is checked by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.w * x[:, :2]


@pytest.mark.parametrize("timing", ["before", "after"])
def test_teacher_timing_against_a_hand_computation(timing):
    student = ScalarSegmentor()
    trainer = DACSTrainer(student, torch.optim.SGD(student.parameters(), lr=0.5),
                          DACSConfig(ema_alpha=0.6, ema_timing=timing, blur_p=0.0, jitter_p=0.0))
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    lbl = torch.randint(0, 2, (2, 4, 4), generator=g)
    if timing == "before":
        with torch.no_grad():
            student.w.fill_(2.0)  # changed after the teacher was made: step 0 re-copies it (DAFormer's init)
    students, teachers, seen = [student.w.item()], [], []
    spy = trainer.teacher.register_forward_hook(lambda m, i, o: seen.append(m.w.item()))
    for _ in range(4):
        trainer.step(src, lbl, tgt)
        students.append(student.w.item())
        teachers.append(trainer.teacher.w.item())
    spy.remove()
    s0, s1, s2, s3, _ = students
    a1, a2, a3 = 0.5, 0.6, 0.6  # min(1 - 1/(t+1), 0.6) for t = 1, 2, 3 (and a0 = 0)
    if timing == "before":  # DAFormer: teacher of step t = EMA with alpha(t) of the student after t steps
        t0 = s0
        t1 = a1 * t0 + (1 - a1) * s1
        t2 = a2 * t1 + (1 - a2) * s2
        t3 = a3 * t2 + (1 - a3) * s3
        assert seen == pytest.approx([t0, t1, t2, t3], abs=1e-6)  # pseudo labels come from the updated teacher
        assert teachers == pytest.approx([t0, t1, t2, t3], abs=1e-6)
    else:  # DACS: after step t with alpha(t); step 0 copies the student
        t0 = students[1]
        t1 = a1 * t0 + (1 - a1) * students[2]
        t2 = a2 * t1 + (1 - a2) * students[3]
        assert seen[:3] == pytest.approx([s0, t0, t1], abs=1e-6)
        assert teachers[:3] == pytest.approx([t0, t1, t2], abs=1e-6)
    assert len(set(round(s, 6) for s in students)) == 5  # the student moved every step


def test_class_mix_draws_half_of_the_batch_classes_including_ignore():
    labels = torch.full((2, 6, 6), 255)
    labels[0, :2], labels[0, 2:4], labels[0, 4:] = 0, 1, 2   # image 0: {0, 1, 2}, no ignore
    labels[1, :2], labels[1, 2:4] = 3, 4                      # image 1: {3, 4, 255}
    candidates = {0, 1, 2, 3, 4, 255}
    saw_ignore = [False, False]
    for seed in range(60):
        masks, chosen = class_mix_masks(labels, torch.Generator().manual_seed(seed))
        for i in range(2):
            picked = set(chosen[i].tolist())
            assert len(picked) == 3 and picked <= candidates  # 6 candidates -> 3, drawn from the whole batch
            assert torch.equal(masks[i], torch.isin(labels[i], chosen[i]))
            saw_ignore[i] |= 255 in picked
        if 255 in chosen[1].tolist():
            assert bool(masks[1][labels[1] == 255].all())  # ignored source pixels are pasted
    assert all(saw_ignore)
    odd = labels.clone()
    odd[1, 2:4] = 3  # unique {0, 1, 2, 3, 255}: 5 -> 3 per image
    assert [len(c) for c in class_mix_masks(odd, torch.Generator().manual_seed(0))[1]] == [3, 3]
    image_scope = class_mix_masks(labels, torch.Generator().manual_seed(0), scope="image")[1]
    assert [len(c) for c in image_scope] == [2, 1] and all(255 not in c.tolist() for c in image_scope)
    with pytest.raises(ValueError, match="scope"):
        class_mix_masks(labels, scope="pair")
    # the same draw as DAFormer's get_class_masks: a permutation of the batch's unique values
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _, chosen = class_mix_masks(labels, g1)
    assert chosen[0].tolist() == class_mix_mask(labels[0], g2, classes=torch.unique(labels))[1].tolist()


def _one_image(size=40, rare=(30, 36)):
    label = torch.zeros(size, size, dtype=torch.long)
    label[:, rare[0]:rare[1]] = 1   # class 1 only in a thin band of columns
    return [{"image": torch.rand(3, size, size), "label": label}]


def test_rare_class_crops_redraw_until_the_crop_holds_the_class():
    from vfm_adapters.seg.transforms import RandomCrop

    data = _one_image()
    counts = np.array([[40 * 34, 40 * 6]])
    sampler = RareClassSampler(counts, temperature=0.01, min_pixels=100, length=30, seed=0)
    keys = list(RareClassPositions(sampler))
    assert [k[0] for k in keys] == list(range(30)) and {k[2] for k in keys} <= {0, 1}
    crops = RareClassCrops(data, RandomCrop((16, 16)), seed=0, min_pixels=100, min_crop_ratio=0.5)
    plain = RareClassCrops(data, RandomCrop((16, 16)), seed=0, min_pixels=100, min_crop_ratio=0.0)
    redrawn = 0
    for position in range(30):
        got = crops[(position, 0, 1)]
        assert int((got["label"] == 1).sum()) > 50 or crops.attempts == [10]
        redrawn += crops.attempts[0] > 0
        first = plain[(position, 0, 1)]  # no re-drawing: the first crop of the same seed
        if crops.attempts == [0]:
            assert torch.equal(first["label"], got["label"])
    assert redrawn > 5  # a 16-px crop of 40 often misses the 6-px band; the re-draws fix it
    never = RareClassCrops(data, RandomCrop((16, 16)), seed=0, min_pixels=10_000, min_crop_ratio=0.5)
    never[(0, 0, 1)]
    assert never.attempts == [10]  # at most 10 re-draws, as DAFormer


def test_uda_configs_use_the_fixed_resize_and_daformer_options():
    import glob
    from pathlib import Path

    from vfm_adapters.adaptation import load_adaptation_config
    from vfm_adapters.adaptation.recipes import adaptation_transform

    root = Path(__file__).resolve().parents[1] / "examples" / "configs" / "adaptation"
    for path in glob.glob(str(root / "dacs_*.yaml")):
        cfg = load_adaptation_config(path)
        data = cfg["data"]
        assert data["ratio_range"] is None and data["cat_max_ratio"] == 0.75 and data["crop_size"] == [512, 512]
        assert data["scale"] == [1280, 720] and data["target_scale"] == [1024, 512]
        assert data["rare_class_sampling"]["min_crop_ratio"] == 0.5
        assert cfg["dacs"]["ema_timing"] == "before" and cfg["dacs"]["class_mix_scope"] == "batch"
    gta = {"image": torch.zeros(3, 1052, 1914, dtype=torch.uint8), "label": torch.zeros(1052, 1914, dtype=torch.long)}
    city = {"image": torch.zeros(3, 1024, 2048, dtype=torch.uint8)}
    for scale, sample, shape in (((1280, 720), gta, (704, 1280)), ((1024, 512), city, (512, 1024))):
        t = adaptation_transform((512, 512), scale, None, 0.75, 0.5, False, (0, 0, 0), (1, 1, 1))
        sizes = {tuple(t.transforms[0](sample, rng=np.random.default_rng(s))["image"].shape[-2:]) for s in range(3)}
        assert sizes == {shape}  # fixed: the same size for every draw
        assert t(sample, rng=np.random.default_rng(0))["image"].shape[-2:] == (512, 512)


# ----------------------------------------------------------------------------- 4. DAFormer's head, FD loss
def test_daformer_head_shape_and_parameter_count_against_a_computation():
    from vfm_adapters.seg import DAFormerHead, Segmentor
    from vfm_adapters.seg.heads import HEADS

    assert HEADS["daformer"] is DAFormerHead
    in_channels, k, c, e = [24, 32, 48, 64], 7, 16, 12
    head = DAFormerHead(in_channels, k, channels=c, embed_dims=e)
    maps = [torch.randn(2, ch, s, s + 2) for ch, s in zip(in_channels, (16, 8, 4, 2))]
    assert head(maps).shape == (2, k, 16, 18)  # the finest level's grid
    f = 4 * e  # fused width
    expected = (
        sum(ch * e + e for ch in in_channels)           # per-level linear embeddings
        + (f * c + 2 * c)                               # ASPP dilation 1: 1x1 conv + BN
        + 3 * (f * 9 + 2 * f + f * c + 2 * c)           # dilations 6/12/18: depthwise 3x3 + BN, pointwise + BN
        + (4 * c * c * 9 + 2 * c)                       # bottleneck 3x3 + BN
        + (c * k + k)                                   # classifier
    )
    assert sum(p.numel() for p in head.parameters()) == expected
    dilated = [m for m in head.modules() if isinstance(m, nn.Conv2d) and m.dilation[0] > 1]
    assert [m.dilation[0] for m in dilated] == [6, 12, 18] and all(m.groups == f for m in dilated)
    assert all(m.bias is None for m in head.aspp.modules() if isinstance(m, nn.Conv2d))
    # the study's setting: 4 levels of EVA02-L (1024 channels), 256 everywhere, 19 classes
    big = DAFormerHead([1024] * 4, 19)
    assert sum(p.numel() for p in big.parameters()) == 4 * (1024 * 256 + 256) + 1024 * 256 + 512 + 3 * (
        1024 * 9 + 2048 + 1024 * 256 + 512) + 4 * 256 * 256 * 9 + 512 + 256 * 19 + 19
    import timm

    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    seg = Segmentor(vit, num_classes=5, layers=[0, 1, 1, 1], head="daformer", head_channels=8)
    assert isinstance(seg.head, DAFormerHead) and seg(torch.randn(2, 3, 28, 28)).shape == (2, 5, 28, 28)


def test_feature_distance_loss_option_on_thing_classes():
    import timm

    from vfm_adapters.adaptation.dacs import CITYSCAPES_THING_CLASSES, feature_distance_loss
    from vfm_adapters.seg import Segmentor

    assert CITYSCAPES_THING_CLASSES == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    f, g = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    f[0, :, 0, 0] = torch.tensor([2.0, 3.0, 6.0])  # distance 7 at feature pixel (0, 0), 0 elsewhere
    f[0, 0, 1, 1] = 4.0                             # distance 4 at (1, 1), a road block: not counted
    lbl = torch.zeros(1, 4, 4, dtype=torch.long)
    lbl[0, :2, :2] = 13                             # car block -> feature pixel (0, 0)
    lbl[0, :2, 2:] = 11                             # person block, distance 0
    lbl[0, 2, 0] = 255                              # a block 3/4 road: still road at min_ratio 0.75
    assert feature_distance_loss(f, g, lbl).item() == pytest.approx((7 + 0) / 2)
    assert feature_distance_loss(f, g, lbl, classes=None).item() == pytest.approx((7 + 4) / 4)
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, img_size=28)
    seg = Segmentor(vit, num_classes=19, layers=[0, 1, 1, 1], head_channels=8, dropout=0.0)
    trainer = DACSTrainer(seg, torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-2),
                          DACSConfig.daformer(fdist_lambda=0.005, ignore_top=0, ignore_bottom=0))
    frozen = {k: v.clone() for k, v in trainer.imagenet_encoder.state_dict().items()}
    labels = torch.full((2, 28, 28), 13)
    labels[:, :14] = 0
    outs = [trainer.step(torch.randn(2, 3, 28, 28), labels, torch.randn(2, 3, 28, 28)) for _ in range(3)]
    assert outs[0]["loss_fdist"] == 0.0 and outs[2]["loss_fdist"] > 0  # the student drifts from its start
    assert all(torch.equal(v, trainer.imagenet_encoder.state_dict()[k]) for k, v in frozen.items())
    assert "loss_fdist" not in DACSTrainer(seg, config=DACSConfig()).step(torch.randn(2, 3, 28, 28), labels,
                                                                          torch.randn(2, 3, 28, 28))


# ----------------------------------------------------------------------------- 2. CLOUDS
from vfm_adapters.adaptation import (  # noqa: E402
    DecodeHead,
    FeatureSegmentor,
    SelfTrainer,
    SelfTrainingConfig,
    TimmFeatureEncoder,
    build_trainer,
    load_adaptation_config,
    make_teacher,
    train_adaptation,
)
from vfm_adapters.seg.clip_classifier import CLIPTextClassifier, class_name_embeddings  # noqa: E402


def tiny_mask2former_segmentor(num_classes: int = 3) -> FeatureSegmentor:
    from vfm_adapters.seg.mask2former import Mask2FormerHead

    torch.manual_seed(0)
    encoder = TimmFeatureEncoder("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    head = Mask2FormerHead(num_classes, encoder.channels, num_queries=4, num_decoder_layers=1, num_heads=2, ffn_dim=32,
                           hidden_dim=32, pixel_decoder_layers=1, pixel_decoder_ffn_dim=32, num_points=16)
    return FeatureSegmentor(encoder, DecodeHead(head))


def test_mixed_batch_goes_through_one_mask2former_criterion(monkeypatch):
    model = tiny_mask2former_segmentor()
    trainer = SelfTrainer(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4),
                          SelfTrainingConfig(ema_interval=1, seed=3))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 3, (8, 64, 64), generator=g)
    generated = torch.tensor([False, True, False, True, True, False, False, True])
    with torch.no_grad():
        expected_pseudo = trainer.teacher.logits(trainer.teacher(model.encoder(images[generated])), (64, 64)).argmax(1)
    calls = []
    criterion_calls = []
    head = model.decoder.head
    original_loss, original_criterion = model.decoder.loss, head.criterion.forward
    monkeypatch.setattr(model.decoder, "loss", lambda out, lbl, weights=None: calls.append((out, lbl.clone())) or original_loss(out, lbl, weights))
    monkeypatch.setattr(head.criterion, "forward", lambda *a, **k: (criterion_calls.append(len(k["mask_labels"]))
                        if "mask_labels" in k else None) or original_criterion(*a, **k))  # positional: deep supervision
    out = trainer.step_mixed(images, labels, generated)
    assert len(calls) == 1 and criterion_calls == [8]  # ONE loss, one criterion over all 8 images
    batch_output, targets = calls[0]
    assert batch_output.class_logits.shape[0] == 8
    assert torch.equal(targets[~generated], labels[~generated])        # source rows keep their labels
    assert torch.equal(targets[generated], expected_pseudo)            # generated rows: the teacher's labels
    assert torch.equal(out["student_images"][~generated], images[~generated])  # source: augmented in the pipeline
    assert not torch.equal(out["student_images"][generated], images[generated])  # generated: ColorAugSSD copy
    assert out["generated"] == 4 and out["teacher_updated"] and np.isfinite(out["loss"])


def test_clip_classifier_scores_by_hand():
    clf = CLIPTextClassifier(hidden_dim=4, embed_dim=2, names_per_class=[1, 2])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # class 0; class 1 has two names
    clf.set_text_embeddings(text)
    with torch.no_grad():
        for layer in clf.class_embed:
            if isinstance(layer, nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        clf.class_embed[-1].bias.copy_(torch.tensor([3.0, 4.0]))  # every query embeds to (0.6, 0.8)
        clf.void_embedding.weight.copy_(torch.tensor([[0.0, -2.0]]))
    scores = clf(torch.randn(1, 2, 4))
    s = 1 / 0.07
    expected = torch.tensor([0.6 * s, max(0.8, -0.6) * s, -0.8 * s])  # class 0, max over class 1's names, void
    assert scores.shape == (1, 2, 3) and torch.allclose(scores[0, 0], expected, atol=1e-4)
    with torch.no_grad():
        clf.logit_scale.fill_(10.0)
    assert torch.allclose(clf(torch.randn(1, 1, 4))[0, 0], expected / s * 100, atol=1e-3)  # clamped at 100
    assert clf.logit_scale.requires_grad and clf.void_embedding.weight.requires_grad
    with pytest.raises(RuntimeError, match="text embeddings"):
        CLIPTextClassifier(4, 2, num_classes=2)(torch.randn(1, 4))
    seen = []

    def encode(texts):
        seen.extend(texts)
        return torch.tensor([[float(len(t)), float(t.count("a"))] for t in texts])

    emb, counts = class_name_embeddings(["road", "car, truck"], encode)
    assert counts == [1, 2] and len(seen) == 3 * 14 and seen[0] == "a photo of a road."
    manual = torch.nn.functional.normalize(encode([t.format("car") for t in
                                                   __import__("vfm_adapters.seg.clip_classifier", fromlist=["x"]).CLIP_TEMPLATES]), dim=-1).mean(0)
    assert torch.allclose(emb[1], torch.nn.functional.normalize(manual, dim=0), atol=1e-6)


def test_clouds_configs_build_on_meta_with_the_authors_settings():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "configs" / "adaptation"
    stage1 = load_adaptation_config(root / "clouds_stage1_source_only_convnext_l.yaml")
    stage2 = load_adaptation_config(root / "clouds_self_training_convnext_l.yaml")
    for cfg in (stage1, stage2):
        with torch.device("meta"):
            trainer = build_trainer(cfg)
        head = trainer.model.decoder.head
        assert isinstance(head.class_predictor, CLIPTextClassifier) and head.class_predictor.num_classes == 19
        assert tuple(head.class_predictor.text_embeddings.shape) == (19, 768)
        assert cfg["optim"]["schedule"] == "constant" and cfg["train"]["batch_size"] == 8
    assert stage1["recipe"] == "source_only" and type(trainer).__name__ == "SelfTrainer"
    st = trainer.config
    assert (st.batch_mode, st.generated_repeat_factor, st.student_augment) == ("mixed", 2.0, "color_aug_ssd")
    assert trainer.refiner is not None and trainer.refiner.name == DEFAULT_SAM
    assert "decoder_checkpoint" in stage2["model"]


def _tiny_features_config(tmp_path, recipe, **sections):
    from PIL import Image

    gen = tmp_path / "generated"
    gen.mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(gen / f"{i}.png")
    config = {
        "recipe": recipe,
        "model": {"kind": "features", "encoder": "convnext_atto", "encoder_kwargs": {"depths": [1, 1, 1, 1],
                  "dims": [8, 16, 16, 16]}, "head": "fpn", "head_channels": 8, "dropout": 0.0, "num_classes": 7},
        "data": {"source": [{"type": "synthetic", "num_images": 3, "size": 40}],
                 "unlabelled": [{"type": "unlabelled", "root": str(gen)}],
                 "crop_size": [32, 32], "scale": None, "num_workers": 0, "photometric": True},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "train": {"iterations": 4, "batch_size": 4, "output_dir": str(tmp_path / recipe), "log_interval": 1,
                  "checkpoint_interval": 0},
        "self_training": {"ema_interval": 2, "ema_alpha": 0.5},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def test_constant_lr_and_stage_two_starts_from_stage_one(tmp_path):
    stage1 = _tiny_features_config(tmp_path, "source_only")
    result = train_adaptation(stage1, log=None, device="cpu", progress=False)
    trainer = result["trainer"]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3] * len(trainer.optimizer.param_groups)
    assert trainer.scheduler.get_last_lr() == [1e-3] * len(trainer.optimizer.param_groups)
    poly = build_trainer(load_adaptation_config({**stage1, "optim": {"lr": 1e-3, "schedule": "poly"}}))
    assert poly.scheduler.lr_lambdas[0](2) < 1.0  # the poly default decays; constant does not
    checkpoint = tmp_path / "source_only" / "decoder.safetensors"
    stage2 = _tiny_features_config(tmp_path, "self_training", model={"decoder_checkpoint": str(checkpoint)})
    from safetensors.torch import load_file

    from vfm_adapters.adaptation import build_model

    saved = load_file(str(checkpoint))
    model = build_model(load_adaptation_config(stage2)["model"])
    assert all(torch.equal(model.decoder.state_dict()[k], v) for k, v in saved.items())
    out = train_adaptation(stage2, log=None, device="cpu", progress=False)
    lines = [__import__("json").loads(x) for x in (tmp_path / "self_training" / "log.jsonl").read_text().splitlines()]
    # 3 source images vs 3 generated x repeat factor 2: a third of each batch of 4 source, two thirds generated
    assert sum(line["generated"] for line in lines) == round(4 * 4 * 2 / 3)
    assert np.isfinite(out["loss"])


# ----------------------------------------------------------------------------- 5. resume and progress
def _states(trainer):
    student = trainer.student if hasattr(trainer, "student") else trainer.model
    return {**{f"s.{k}": v.clone() for k, v in student.state_dict().items()},
            **{f"t.{k}": v.clone() for k, v in trainer.teacher.state_dict().items()}}


def _dacs_config(tmp_path, name):
    return {
        "recipe": "dacs",
        "model": {"backbone": "vit_small_patch14_dinov2", "backbone_kwargs": {"img_size": 28, "depth": 2, "embed_dim": 32,
                  "num_heads": 2}, "methods": ["rein"], "method_options": {"rein": {"token_length": 4, "rank": 4}},
                  "layers": [0, 1, 1, 1], "scales": [4, 2, 1, 1], "head_channels": 8, "num_classes": 7},
        "data": {"source": [{"type": "synthetic", "num_images": 4, "size": 40}],
                 "target": [{"type": "synthetic", "domain": "fog", "num_images": 4, "size": 40}],
                 "crop_size": [28, 28], "scale": [40, 40], "target_scale": [40, 40], "ratio_range": None,
                 "num_workers": 0, "rare_class_sampling": {"temperature": 0.1, "min_pixels": 10}},
        "optim": {"lr": 1e-3, "warmup_iters": 1},
        "dacs": {"ema_timing": "before", "fdist_lambda": 0.005},
        "train": {"iterations": 4, "batch_size": 2, "output_dir": str(tmp_path / name), "log_interval": 1,
                  "checkpoint_interval": 0},
    }


@pytest.mark.parametrize("recipe", ["dacs", "self_training"])
def test_resumed_adaptation_is_bit_exact(tmp_path, recipe, capsys):
    make = (lambda name: _dacs_config(tmp_path, name)) if recipe == "dacs" else (
        lambda name: _tiny_features_config(tmp_path, "self_training", train={"output_dir": str(tmp_path / name)}))
    straight = train_adaptation(make("straight"), log=None, device="cpu", progress=False)
    assert "dacs" not in capsys.readouterr().err and not (tmp_path / "straight" / "checkpoint.pt").stat().st_size == 0
    first = train_adaptation(make("split"), log=None, device="cpu", stop_after=2, progress=True)
    assert first["step"] == 2 and not first["results"]
    assert recipe in capsys.readouterr().err  # the tqdm bar
    resumed = train_adaptation(make("split"), log=None, device="cpu", resume=True, progress=False)
    assert resumed["step"] == 4 and resumed["trainer"].iteration == 4
    a, b = _states(straight["trainer"]), _states(resumed["trainer"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    log = lambda name: [  # noqa: E731
        {k: v for k, v in __import__("json").loads(x).items() if k != "seconds"}
        for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    assert log("straight") == log("split") and len(log("split")) == 4
    changed = make("split")
    changed["optim"] = {**changed["optim"], "lr": 5e-3}
    with pytest.raises(ValueError, match="different config"):
        train_adaptation(changed, log=None, device="cpu", resume=True, progress=False)
