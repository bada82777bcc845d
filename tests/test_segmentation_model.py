"""Every segmentation model of the library offers one interface (SegmentationModel); heads come from a registry.

The matrix builds each implementation (light heads, Mask2Former, the features-only
segmentor with either head) and holds each to the same contract: scores at the image
size, ``model(images, labels)`` is ``model.loss``, parameter groups cover the trainable
parameters once, normalisation given at construction, per-pixel weights accepted only
by per-pixel objectives.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch

from vfm_adapters._registry import DuplicateNameError
from vfm_adapters.adaptation import DACSTrainer, DecodeHead, FeatureSegmentor, TimmFeatureEncoder
from vfm_adapters.seg import HEADS, SEGMENTORS, FPNHead, SegmentationModel, Segmentor, build_segmentor
from vfm_adapters.seg.build import segmentor_class
from vfm_adapters.seg.config import DEFAULTS, ConfigError
from vfm_adapters.seg.mask2former import Mask2FormerHead, Mask2FormerSegmentor
from vfm_adapters.seg.model import PixelWeightsUnsupported, model_loss, segmentation_loss

TINY_M2F = dict(num_queries=4, num_decoder_layers=1, num_heads=2, ffn_dim=32, hidden_dim=32, pixel_decoder_layers=1,
                pixel_decoder_ffn_dim=32, num_points=16)
MEAN, STD = (120.0, 110.0, 100.0), (50.0, 55.0, 60.0)
CLASSES = 3


def _vit():
    return timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32, num_heads=2, img_size=56)


def _encoder():
    return TimmFeatureEncoder("convnext_atto", depths=[1, 1, 1, 1], dims=[8, 16, 16, 16])


def _build(kind: str):
    if kind in ("fpn", "linear", "daformer"):
        return Segmentor(_vit(), CLASSES, head=kind, head_channels=8, dropout=0.0, mean=MEAN, std=STD)
    if kind == "mask2former":
        return Mask2FormerSegmentor(_vit(), CLASSES, mean=MEAN, std=STD, **TINY_M2F)
    encoder = _encoder()
    head = (FPNHead(encoder.channels, CLASSES, 8, 0.0) if kind == "features+fpn"
            else Mask2FormerHead(CLASSES, encoder.channels, **TINY_M2F))
    return FeatureSegmentor(encoder, DecodeHead(head), mean=MEAN, std=STD)


KINDS = ["fpn", "linear", "daformer", "mask2former", "features+fpn", "features+mask2former"]
PER_PIXEL = {"fpn", "linear", "daformer", "features+fpn"}


@pytest.fixture(params=KINDS)
def model(request):
    torch.manual_seed(0)
    built = _build(request.param)
    built.kind = request.param
    return built


def _batch(size: int = 56):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, size, size, generator=generator)
    labels = torch.randint(0, CLASSES, (2, size, size), generator=generator)
    labels[:, :3] = 255
    return images, labels


def test_every_model_implements_the_protocol(model):
    assert isinstance(model, SegmentationModel)
    assert model.num_classes == CLASSES and model.mean == MEAN and model.std == STD
    images, _ = _batch()
    assert model.eval()(images).shape == (2, CLASSES, 56, 56)


def test_forward_with_labels_is_the_models_own_loss(model):
    images, labels = _batch()
    model.eval()
    torch.manual_seed(3)
    through_forward = model(images, labels)
    torch.manual_seed(3)
    direct = model.loss(images, labels)
    torch.manual_seed(3)
    helper = model_loss(model, images, labels)
    assert through_forward.ndim == 0 and math.isfinite(float(direct.detach()))
    assert torch.equal(through_forward, direct) and torch.equal(direct, helper)
    direct.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_parameter_groups_cover_each_trainable_parameter_once(model):
    groups = model.parameter_groups(1e-3, 0.05, backbone_lr_mult=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)
    assert {g["weight_decay"] for g in groups} <= {0.0, 0.05}


def test_per_pixel_weights_only_for_per_pixel_objectives(model):
    images, labels = _batch()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2))
    model.eval()
    if model.kind in PER_PIXEL:
        logits = model(images)
        expected = (torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none") * weights).mean()
        torch.testing.assert_close(model.loss(images, labels, weights), expected)
    else:
        with pytest.raises(PixelWeightsUnsupported, match="per-pixel"):
            model.loss(images, labels, weights)


def test_dacs_refuses_a_student_without_a_per_pixel_loss():
    from vfm_adapters.adaptation import dacs_step, make_teacher

    torch.manual_seed(0)
    student = _build("mask2former")
    with pytest.raises(PixelWeightsUnsupported, match="DACS"):
        DACSTrainer(student)
    images, labels = _batch()  # the bare step function refuses too, through the model's own loss
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(PixelWeightsUnsupported, match="DACS"):
        dacs_step(student, make_teacher(student), optimizer, images, labels, images.flip(0), step=0,
                  generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # no step was taken


def test_normalisation_is_checked_at_construction():
    with pytest.raises(ValueError, match="3 values"):
        Segmentor(_vit(), CLASSES, head_channels=8, mean=(1.0, 2.0), std=STD)
    with pytest.raises(ValueError, match="std > 0"):
        FeatureSegmentor(_encoder(), DecodeHead(FPNHead([8, 16, 16, 16], CLASSES, 8)), std=(1.0, 0.0, 1.0))


def test_a_features_encoder_that_trains_gets_the_backbone_lr_multiplier():
    model = _build("features+fpn")
    model.encoder.requires_grad_(True)
    groups = model.parameter_groups(1e-3, 0.05, backbone_lr_mult=0.1)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    for group in groups:
        in_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)


def test_heads_come_from_the_registry_and_unknown_heads_are_named():
    assert segmentor_class("fpn") is Segmentor and segmentor_class("mask2former") is Mask2FormerSegmentor
    with pytest.raises(ConfigError, match=r"unknown head 'fnp'.*'fpn'"):
        segmentor_class("fnp")
    with pytest.raises(DuplicateNameError, match="already registered"):
        SEGMENTORS["mask2former"] = Segmentor


def test_a_registered_light_head_is_built_by_name(monkeypatch):
    class TinyHead(FPNHead):
        pass

    monkeypatch.setitem(HEADS, "tiny_head_for_test", TinyHead)
    config = {**DEFAULTS["model"], "backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "depth": 2},
              "head": "tiny_head_for_test", "num_classes": CLASSES, "head_channels": 8, "mean": list(MEAN),
              "std": list(STD)}
    segmentor = build_segmentor(config)
    assert type(segmentor.head) is TinyHead and segmentor.mean == MEAN


def test_segmentation_loss_of_an_all_ignored_batch_is_zero_with_a_graph():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="labels' shape"):
        segmentation_loss(logits, torch.zeros(1, 4, 4, dtype=torch.long), pixel_weights=torch.ones(4, 4))


def test_adapt_stops_on_a_non_finite_loss_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from test_adaptation_authors import _tiny_features_config

    from vfm_adapters.adaptation import train_adaptation
    from vfm_adapters.seg.loop import TrainingDivergedError

    real_loss, calls = FeatureSegmentor.loss, {"n": 0}

    def loss_going_nan(self, images, labels, pixel_weights=None):
        calls["n"] += 1
        loss = real_loss(self, images, labels, pixel_weights)
        return loss * float("nan") if calls["n"] > 1 else loss

    monkeypatch.setattr(FeatureSegmentor, "loss", loss_going_nan)
    config = _tiny_features_config(tmp_path, "self_training", train={"checkpoint_interval": 1})
    with pytest.raises(TrainingDivergedError, match=r"nan at step 2.*checkpoint .* \(step 1\) is intact"):
        train_adaptation(config, log=None, device="cpu", progress=False)
    assert torch.load(tmp_path / "self_training" / "checkpoint.pt", weights_only=False)["step"] == 1
    assert not (tmp_path / "self_training" / "decoder.safetensors").exists()


def test_a_saved_segmentor_comes_back_with_its_normalisation(tmp_path):
    from vfm_adapters.seg import load_segmentor, save_segmentor

    config = {**DEFAULTS["model"], "backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": 32, "depth": 2},
              "num_classes": CLASSES, "head_channels": 8, "mean": list(MEAN), "std": list(STD)}
    torch.manual_seed(0)
    segmentor = build_segmentor(config).eval()
    save_segmentor(segmentor, tmp_path / "run", config, {"seed": 0})
    loaded, _ = load_segmentor(tmp_path / "run")
    images = torch.randn(2, 3, 32, 32)
    assert loaded.mean == MEAN and loaded.std == STD
    torch.testing.assert_close(loaded(images), segmentor(images))


def test_names_that_moved_out_of_training_stay_importable_from_it():
    import importlib

    from vfm_adapters.seg import training

    for name, module in training._MOVED.items():
        assert getattr(training, name) is getattr(importlib.import_module(f"vfm_adapters.seg.{module}"), name), name
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        training.nonexistent  # noqa: B018


def test_per_pixel_loss_says_whether_pixel_weights_are_taken(model):
    assert model.per_pixel_loss == (model.kind in PER_PIXEL)
    assert segmentor_class("daformer").per_pixel_loss and not segmentor_class("mask2former").per_pixel_loss


def test_adapt_checks_label_ids_before_writing_anything(tmp_path):
    from test_adaptation_authors import _tiny_features_config

    from vfm_adapters.adaptation import train_adaptation
    from vfm_adapters.seg.label_checks import LabelRangeError

    config = _tiny_features_config(tmp_path, "self_training", model={"num_classes": 3})  # the scenes hold ids 0-6
    with pytest.raises(LabelRangeError, match="class id"):
        train_adaptation(config, log=None, device="cpu", progress=False)
    assert not (tmp_path / "self_training").exists()
