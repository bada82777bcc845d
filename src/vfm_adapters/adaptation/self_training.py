"""Self-training on unlabelled (e.g. generated) images with an EMA decode-head teacher (CLOUDS).

CLOUDS ("Collaborating Foundation Models for Domain Generalized Semantic Segmentation") trains in two stages: a segmentor on the labelled source
alone, then the same model on source + unlabelled images (about 5k Stable-Diffusion
street scenes, see :mod:`vfm_adapters.adaptation.generate`). In stage 2, per step:

1. the teacher -- an EMA copy of the *decode head only*, sharing the frozen backbone --
   predicts the clean unlabelled image: ``y_u = argmax g(x_u)``;
2. optionally :class:`~vfm_adapters.adaptation.sam_refine.SamRefiner` refines ``y_u``
   (kept SAM masks only, everything else 255);
3. the student sees a colour-augmented copy ``A(x_u)`` (ColorAugSSD, as the CLOUDS code)
   and is trained on ONE batch mixing source and generated images under one loss
   (:func:`self_training_mixed_step`, the CLOUDS code), or -- ``batch_mode="separate"`` --
   with ``L = L_sup(x_s, y_s) + lambda * L_sup(A(x_u), y_u)`` (:func:`self_training_step`);
4. every ``ema_interval`` (100) steps: ``g <- 0.999 g + 0.001 f`` (decode head only).

The model protocol is small: ``model.encoder(images)`` gives features (frozen, so they are
computed without gradients when nothing in the encoder trains), ``model.decoder(features)``
gives the head's output, and ``model.decoder.logits(output, size)`` /
``model.decoder.loss(output, labels)`` turn it into scores and a loss.
:class:`FeatureSegmentor` (a timm ``features_only`` backbone such as CLIP ConvNeXt-L +
a head) and :func:`from_segmentor` (a :class:`vfm_adapters.seg.Segmentor` or
``Mask2FormerSegmentor``) provide it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..seg.datasets import IGNORE_INDEX
from ..seg.model import train_mode
from ..seg.transforms import IMAGENET_MEAN, IMAGENET_STD, PhotoMetricDistortion
from .augment import denormalize, normalize
from .data import MixedStream, UnlabelledFolder
from .ema import ema_update, make_teacher
from .feature_model import (CLIP_CONVNEXT_L, CLIP_MEAN, CLIP_STD, DecodeHead, FeatureSegmentor, SourceTrainer,
                            TimmFeatureEncoder, from_segmentor)
from .mixing import strong_augment
from .sam_refine import SamRefiner

__all__ = [
    "CLIP_CONVNEXT_L",
    "CLIP_MEAN",
    "CLIP_STD",
    "DecodeHead",
    "FeatureSegmentor",
    "MixedStream",
    "SelfTrainer",
    "SelfTrainingConfig",
    "SourceTrainer",
    "TimmFeatureEncoder",
    "UnlabelledFolder",
    "augment_student_copy",
    "from_segmentor",
    "self_training_mixed_step",
    "self_training_step",
]


@dataclass
class SelfTrainingConfig:
    """Options of the self-training stage (defaults: CLOUDS).

    Attributes:
        ema_alpha: EMA coefficient of the decode-head teacher (0.999).
        ema_interval: Update the teacher every this many steps (100).
        unlabelled_weight: Weight ``lambda`` of the unlabelled loss (1).
        source_weight: Weight of the labelled source loss (1).
        jitter_strength: Colour jitter of the student's copy (brightness/contrast/saturation/hue).
        jitter_p: Probability of jittering a batch.
        blur_p: Probability of blurring a batch.
        blur_sigma: Blur sigma range.
        mean: Normalisation mean (0..255 scale) of the model's inputs.
        std: Normalisation std (0..255 scale).
        batch_mode: ``"mixed"`` (the CLOUDS code: ONE batch mixes labelled source and
            generated images, generated ones labelled by the teacher, under one loss;
            :meth:`SelfTrainer.step_mixed`) or ``"separate"`` (a source and an unlabelled
            batch, two losses; :meth:`SelfTrainer.step`). Used by the config runner.
        generated_repeat_factor: Share of generated images in a mixed stream relative to
            their count (CLOUDS 2.0: the generated set is seen twice per source epoch).
        student_augment: Augmentation of the student's copy of a generated image:
            ``"color_aug_ssd"`` (CLOUDS: the SSD/mmseg photometric distortion, brightness
            +-32, contrast and saturation 0.5-1.5, hue +-18 degrees, each p = 0.5) or
            ``"jitter_blur"`` (DACS's colour jitter + blur with the ``jitter_*``/``blur_*`` options).
        ignore_index: Ignored label.
        seed: Seed of the augmentation.
    """

    ema_alpha: float = 0.999
    ema_interval: int = 100
    unlabelled_weight: float = 1.0
    source_weight: float = 1.0
    jitter_strength: float = 0.2
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    batch_mode: str = "mixed"
    generated_repeat_factor: float = 2.0
    student_augment: str = "color_aug_ssd"
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    ignore_index: int = IGNORE_INDEX
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_mode not in ("mixed", "separate"):
            raise ValueError(f"batch_mode must be 'mixed' (CLOUDS) or 'separate', got {self.batch_mode!r}")
        if self.student_augment not in ("color_aug_ssd", "jitter_blur"):
            raise ValueError(f"student_augment must be 'color_aug_ssd' or 'jitter_blur', got {self.student_augment!r}")
        if self.generated_repeat_factor <= 0:
            raise ValueError(f"generated_repeat_factor must be > 0, got {self.generated_repeat_factor}")
        if self.ema_interval < 1:
            raise ValueError(f"ema_interval must be at least 1, got {self.ema_interval}")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        self.blur_sigma = tuple(float(s) for s in self.blur_sigma)
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SelfTrainingConfig":
        accepted = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise ValueError(f"unknown self-training option(s) {unknown}; accepted: {sorted(accepted)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@torch.no_grad()
def teacher_labels(model: FeatureSegmentor, teacher: DecodeHead, images: Tensor) -> Tensor:
    """The teacher decode head's argmax on the (clean) images, over the shared encoder."""
    teacher.eval()
    features = model.encoder(images)
    return teacher.logits(teacher(features), images.shape[-2:]).argmax(dim=1)


def _optimise(loss: Tensor, model: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              grad_clip: float | None, step: int, config: "SelfTrainingConfig") -> bool:
    """One optimiser (and scheduler) step on ``loss``; every ``ema_interval`` steps the
    decoder's EMA teacher follows. Returns whether the teacher was updated."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    updated = (step + 1) % config.ema_interval == 0
    if updated:
        ema_update(teacher, model.decoder, config.ema_alpha)
    return updated


def self_training_step(
    model: FeatureSegmentor,
    teacher: DecodeHead,
    optimizer: torch.optim.Optimizer,
    source_images: Tensor | None,
    source_labels: Tensor | None,
    unlabelled_images: Tensor,
    step: int,
    config: SelfTrainingConfig | None = None,
    refiner: SamRefiner | None = None,
    generator: torch.Generator | None = None,
    scheduler: Any | None = None,
    grad_clip: float | None = None,
) -> dict[str, Any]:
    """One self-training step (see the module docstring).

    Args:
        model: Student (``encoder`` + ``decoder``), e.g. a :class:`FeatureSegmentor`.
        teacher: EMA copy of ``model.decoder`` (:func:`~vfm_adapters.adaptation.ema.make_teacher`).
        optimizer: Optimiser of the trainable parameters.
        source_images: Normalised labelled images, or ``None`` for unlabelled-only steps.
        source_labels: Their labels.
        unlabelled_images: Normalised unlabelled images (clean; augmented here).
        step: 0-based step index; the teacher is updated when ``(step + 1) % ema_interval == 0``.
        config: :class:`SelfTrainingConfig`.
        refiner: Optional SAM refinement of the pseudo labels.
        generator: Randomness of the augmentation.
        scheduler: Stepped after the optimiser if given.
        grad_clip: Max gradient norm (CLOUDS: 0.01), ``None`` for none.

    Returns:
        ``{"loss", "loss_source", "loss_unlabelled", "teacher_updated", "pseudo_labels",
        "augmented_images"}``.

    Example:
        >>> from vfm_adapters.seg import LinearHead
        >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0,))
        >>> model = FeatureSegmentor(enc, DecodeHead(LinearHead(enc.channels, num_classes=3)))
        >>> teacher = make_teacher(model.decoder)
        >>> opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        >>> out = self_training_step(model, teacher, opt, torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32,
        ...     dtype=torch.long), torch.randn(1, 3, 32, 32), step=0, config=SelfTrainingConfig(ema_interval=1))
        >>> out["teacher_updated"], out["pseudo_labels"].shape
        (True, torch.Size([1, 32, 32]))
    """
    config = config or SelfTrainingConfig()
    pseudo = teacher_labels(model, teacher, unlabelled_images)
    if refiner is not None:
        raw = denormalize(unlabelled_images.detach().float(), config.mean, config.std) * 255.0
        pseudo = refiner(raw.clamp(0, 255), pseudo, start_index=step * unlabelled_images.shape[0])
    with torch.no_grad():
        augmented = augment_student_copy(unlabelled_images, config, step, generator)

    train_mode(model)  # frozen batch norms (a frozen CNN host) keep their statistics
    loss_unlabelled = model.loss(augmented, pseudo)
    loss = config.unlabelled_weight * loss_unlabelled
    loss_source = torch.zeros(())
    if source_images is not None:
        loss_source = model.loss(source_images, source_labels)
        loss = loss + config.source_weight * loss_source

    updated = _optimise(loss, model, teacher, optimizer, scheduler, grad_clip, step, config)
    return {"loss": float(loss.detach()), "loss_source": float(loss_source.detach()),
            "loss_unlabelled": float(loss_unlabelled.detach()), "teacher_updated": updated,
            "pseudo_labels": pseudo.detach(), "augmented_images": augmented.detach()}


def augment_student_copy(images: Tensor, config: SelfTrainingConfig, step: int,
                         generator: torch.Generator | None = None) -> Tensor:
    """The student's copy of normalised (clean) images: ColorAugSSD or jitter + blur.

    ColorAugSSD draws per image from ``numpy`` generators seeded by ``(seed, step, i)``.

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = augment_student_copy(x, SelfTrainingConfig(), step=0)
        >>> y.shape == x.shape, torch.equal(y, augment_student_copy(x, SelfTrainingConfig(), step=0))
        (True, True)
    """
    raw = denormalize(images.detach().float(), config.mean, config.std).clamp(0, 1)
    if config.student_augment == "jitter_blur":
        out = strong_augment(raw, generator, config.jitter_strength, config.jitter_p, config.blur_p, config.blur_sigma)
    else:
        distort = PhotoMetricDistortion()
        out = torch.stack([
            distort({"image": image * 255.0}, rng=np.random.default_rng([config.seed, int(step), i]))["image"] / 255.0
            for i, image in enumerate(raw.cpu())]).to(raw.device)
    return normalize(out, config.mean, config.std).to(images.dtype)


def self_training_mixed_step(
    model: FeatureSegmentor,
    teacher: DecodeHead,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    generated: Tensor,
    step: int,
    config: SelfTrainingConfig | None = None,
    refiner: SamRefiner | None = None,
    generator: torch.Generator | None = None,
    scheduler: Any | None = None,
    grad_clip: float | None = None,
) -> dict[str, Any]:
    """One CLOUDS step on ONE batch mixing labelled source and generated images.

    The teacher labels the clean generated images (SAM-refined if a refiner is given),
    the student sees them augmented (:func:`augment_student_copy`) and the source images
    as they come (their augmentation is in the data pipeline); the whole batch, with the
    source labels and the pseudo labels, goes through the decoder's loss ONCE (for a
    Mask2Former head: one Hungarian matching and one criterion over all images).

    Args:
        images: Normalised ``(B, 3, H, W)`` images, source and generated.
        labels: ``(B, H, W)``; the rows of generated images are ignored (replaced).
        generated: ``(B,)`` bool, True for generated (unlabelled) images.
        step: 0-based step; the teacher is updated when ``(step + 1) % ema_interval == 0``.

    Returns:
        ``{"loss", "generated", "teacher_updated", "pseudo_labels", "student_images", "targets"}``.

    Example:
        >>> from vfm_adapters.seg import LinearHead
        >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0,))
        >>> model = FeatureSegmentor(enc, DecodeHead(LinearHead(enc.channels, num_classes=3)))
        >>> opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        >>> out = self_training_mixed_step(model, make_teacher(model.decoder), opt, torch.randn(4, 3, 32, 32),
        ...     torch.zeros(4, 32, 32, dtype=torch.long), torch.tensor([False, True, False, True]), step=0)
        >>> out["generated"], out["targets"].shape
        (2, torch.Size([4, 32, 32]))
    """
    config = config or SelfTrainingConfig()
    generated = generated.to(torch.bool).to(images.device)
    if generated.shape != (images.shape[0],):
        raise ValueError(f"generated must be a ({images.shape[0]},) bool flag per image, got {tuple(generated.shape)}")
    student_images, targets = images.detach().clone(), labels.detach().clone().long()
    pseudo = None
    if bool(generated.any()):
        clean = images[generated]
        pseudo = teacher_labels(model, teacher, clean)
        if refiner is not None:
            raw = denormalize(clean.detach().float(), config.mean, config.std) * 255.0
            pseudo = refiner(raw.clamp(0, 255), pseudo, start_index=step * images.shape[0])
        with torch.no_grad():
            student_images[generated] = augment_student_copy(clean, config, step, generator)
        targets[generated] = pseudo.to(targets.device)

    train_mode(model)  # frozen batch norms (a frozen CNN host) keep their statistics
    loss = model.loss(student_images, targets)
    updated = _optimise(loss, model, teacher, optimizer, scheduler, grad_clip, step, config)
    return {"loss": float(loss.detach()), "generated": int(generated.sum()), "teacher_updated": updated,
            "pseudo_labels": None if pseudo is None else pseudo.detach(), "student_images": student_images,
            "targets": targets}


class SelfTrainer:
    """Holds the student, the decode-head teacher, the optimiser, the refiner and the step counter.

    Build it after the source-only stage: the teacher starts as a copy of the trained head.

    Args:
        model: A :class:`FeatureSegmentor` (or :func:`from_segmentor` of a seg segmentor).
        optimizer: Default AdamW (lr 1e-5, wd 0.05, CLOUDS) over trainable parameters.
        config: :class:`SelfTrainingConfig` or a mapping of its fields.
        refiner: Optional :class:`SamRefiner`.
        scheduler: Optional scheduler stepped every step.
        grad_clip: Gradient norm clip (CLOUDS: 0.01).

    Example:
        >>> from vfm_adapters.seg import LinearHead
        >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0,))
        >>> trainer = SelfTrainer(FeatureSegmentor(enc, DecodeHead(LinearHead(enc.channels, 3))))
        >>> out = trainer.step(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long),
        ...                    torch.randn(1, 3, 32, 32))
        >>> trainer.iteration, out["teacher_updated"]
        (1, False)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: SelfTrainingConfig | Mapping[str, Any] | None = None,
        refiner: SamRefiner | None = None,
        scheduler: Any | None = None,
        grad_clip: float | None = None,
    ) -> None:
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            model = from_segmentor(model)
        self.model = model
        self.config = config if isinstance(config, SelfTrainingConfig) else SelfTrainingConfig.from_dict(config or {})
        self.teacher = make_teacher(model.decoder)
        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05)
        self.optimizer, self.scheduler, self.refiner, self.grad_clip = optimizer, scheduler, refiner, grad_clip
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.iteration = 0

    def step(self, source_images: Tensor | None, source_labels: Tensor | None, unlabelled_images: Tensor) -> dict[str, Any]:
        """One :func:`self_training_step` (separate source and unlabelled batches); returns its dict."""
        out = self_training_step(self.model, self.teacher, self.optimizer, source_images, source_labels,
                                 unlabelled_images, self.iteration, self.config, self.refiner, self.generator,
                                 self.scheduler, self.grad_clip)
        self.iteration += 1
        return out

    def step_mixed(self, images: Tensor, labels: Tensor, generated: Tensor) -> dict[str, Any]:
        """One :func:`self_training_mixed_step` (CLOUDS: one mixed batch, one loss); returns its dict."""
        out = self_training_mixed_step(self.model, self.teacher, self.optimizer, images, labels, generated,
                                       self.iteration, self.config, self.refiner, self.generator, self.scheduler,
                                       self.grad_clip)
        self.iteration += 1
        return out
