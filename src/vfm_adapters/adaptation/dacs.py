"""DACS (Tranheden et al., WACV 2021) with DAFormer's options, for any segmentor.

A *segmentor* here is any ``nn.Module`` mapping normalised images ``(B, 3, H, W)`` to
logits ``(B, K, H, W)`` (or ``(B, K, h, w)``, upsampled bilinearly to the label size):
:class:`vfm_adapters.seg.Segmentor` with an EVA02-CLIP or a DINOv2 + Rein backbone, or
anything else.

One step (:func:`dacs_step`, :class:`DACSTrainer`), for a source batch ``(x_s, y_s)``
and a target batch ``x_t`` (DACS, Tranheden et al., WACV 2021; DAFormer, Hoyer et al., CVPR 2022):

1. Source loss ``L_s = CE(f(x_s), y_s)`` (255 ignored).
2. The mean teacher ``g`` labels the target: ``p = softmax(g(x_t))``,
   ``y_t = argmax_c p``; the confidence weight is the share of pixels whose
   ``max_c p >= 0.968`` -- one scalar for the whole batch (as in the DACS
   and DAFormer code; ``weight_mode="image"`` gives one scalar per image).
3. ClassMix: for each pair ``i``, half of the candidate classes (the batch's unique
   source label values, see :func:`class_mix_masks`; DACS's rounding: ``n`` candidates
   -> ``(n + n % 2) // 2`` chosen by a random permutation) give a mask ``M``;
   ``x_m = M x_s + (1 - M) x_t``, ``y_m = M y_s + (1 - M) y_t``, weight
   ``w_m = M + (1 - M) w``.
4. Strong augmentation of ``x_m``: colour jitter (0.2 each, p = 0.8) and Gaussian blur
   (p = 0.5, sigma 0.15-1.15).
5. Target loss ``L_t = mean over all pixels of w_m * CE(f(x_m), y_m)``; the student
   takes a step on ``L_s + L_t``.
6. The teacher follows: ``g <- a_t g + (1 - a_t) f``, ``a_t = min(1 - 1/(t + 1), 0.99)``
   (after the step; DAFormer: at the start of step ``t > 0``, ``ema_timing="before"``).

DAFormer's additions are options: ``ema_alpha=0.999`` with the teacher updated at the
START of step ``t > 0`` (``ema_timing="before"``), a linear learning-rate warm-up
(:func:`warmup_poly_lambda`, 1500 iterations), rare-class sampling of source images
(:class:`RareClassSampler`, temperature 0.01, with :class:`RareClassCrops` re-drawing
the crop until it holds the class), ignoring the top/bottom rows of the pseudo label
(``ignore_top``/``ignore_bottom``, DAFormer uses 15/120 on Cityscapes) and the ImageNet
feature distance on thing classes (``fdist_lambda=0.005``, :func:`feature_distance_loss`;
off by default: the vision-language-model study finds it conflicts with CLIP encoders).
ClassMix draws from ``torch.unique`` over the whole batch's source labels, the ignore
value included, as both official codes do (``class_mix_scope="batch"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from ..seg.datasets import IGNORE_INDEX
from ..seg.model import PixelWeightsUnsupported, SegmentationModel, model_loss, train_mode
from ..seg.transforms import IMAGENET_MEAN, IMAGENET_STD
from .augment import denormalize, normalize
from .ema import ema_alpha, ema_update, make_teacher
from .feature_distance import (CITYSCAPES_THING_CLASSES, downscale_label_ratio, encoder_feature_distance,
                               feature_distance_loss)
from .mixing import (class_mix, class_mix_mask, class_mix_masks, confidence_weight, pseudo_label, pseudo_label_weights,
                     strong_augment)
from .rare_class import (RareClassCrops, RareClassPositions, RareClassSampler, class_pixel_counts,
                         rare_class_probabilities)

__all__ = [
    "DACSConfig", "DACSTrainer", "dacs_step", "warmup_poly_lambda",
    # the pieces, re-exported from .rare_class, .mixing and .feature_distance
    "RareClassCrops", "RareClassPositions", "RareClassSampler", "class_pixel_counts", "rare_class_probabilities",
    "class_mix", "class_mix_mask", "class_mix_masks", "confidence_weight", "pseudo_label", "strong_augment",
    "downscale_label_ratio", "feature_distance_loss",
]


def warmup_poly_lambda(total: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6, power: float = 1.0):
    """DAFormer's schedule as a ``LambdaLR`` factor: linear warm-up, then ``(1 - t/T) ** power``.

    Example:
        >>> f = warmup_poly_lambda(100, warmup_iters=10)
        >>> round(f(0), 6), round(f(5), 3), f(10), f(100)
        (1e-06, 0.475, 0.9, 0.0)
    """
    from ..seg.optim import poly_factor

    return lambda step: poly_factor(step, total, power, warmup_iters, warmup_ratio)


# ----------------------------------------------------------------------------- the step
@dataclass
class DACSConfig:
    """Options of a DACS step; defaults are DACS's, see :meth:`daformer` for DAFormer's.

    Attributes:
        threshold: Pseudo-label confidence threshold (0.968).
        weight_mode: ``"batch"`` (one confidence weight per batch) or ``"image"``.
        ema_alpha: Cap of the teacher's EMA coefficient (DACS 0.99, DAFormer 0.999).
        ema_ramp: ``alpha_t = min(1 - 1/(t+1), ema_alpha)`` (both papers' code); False = fixed alpha.
        ema_timing: ``"after"`` (DACS: after step ``t``'s optimiser step, with ``alpha_t``) or
            ``"before"`` (DAFormer: at the start of step ``t > 0``, before the pseudo labels,
            with ``alpha_t``; the teacher of step 0 is the initial student).
        class_mix_scope: ``"batch"`` (both official codes: half of ``torch.unique`` over the
            whole batch's source labels, the ignore value included) or ``"image"`` (the
            papers' text: half of the image's own classes); see :func:`class_mix_masks`.
        jitter_strength: Colour jitter range (0.2 for brightness, contrast, saturation, hue).
        jitter_p: Probability of jittering a mixed batch (0.8).
        blur_p: Probability of blurring a mixed batch (0.5).
        blur_sigma: Blur sigma range (0.15, 1.15).
        ignore_top: Rows at the top of the pseudo label with weight 0 (DAFormer on Cityscapes: 15).
        ignore_bottom: Rows at the bottom with weight 0 (DAFormer on Cityscapes: 120).
        mean: Normalisation mean on the 0..255 scale (to undo/redo it around augmentation).
        std: Normalisation std on the 0..255 scale.
        fdist_lambda: Weight of DAFormer's ImageNet feature distance on the source batch
            (0 = off, DACS; DAFormer 0.005). Needs the frozen initial encoder
            (:class:`DACSTrainer` makes it).
        fdist_classes: Classes whose feature pixels count (DAFormer: Cityscapes things,
            :data:`CITYSCAPES_THING_CLASSES`); ``None`` = every pixel.
        fdist_scale_min_ratio: ``min_ratio`` of :func:`downscale_label_ratio` (0.75).
        fdist_module: Name of the student's submodule whose output (its last map if a
            list) is the encoder feature (``"features"`` for a ``seg.Segmentor``).
        ignore_index: Ignored label.
        seed: Seed of the step's generator (ClassMix, augmentation).
    """

    threshold: float = 0.968
    weight_mode: str = "batch"
    ema_alpha: float = 0.99
    ema_ramp: bool = True
    ema_timing: str = "after"
    class_mix_scope: str = "batch"
    jitter_strength: float = 0.2
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    ignore_top: int = 0
    ignore_bottom: int = 0
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    fdist_lambda: float = 0.0
    fdist_classes: tuple[int, ...] | None = CITYSCAPES_THING_CLASSES
    fdist_scale_min_ratio: float = 0.75
    fdist_module: str = "features"
    ignore_index: int = IGNORE_INDEX
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fdist_classes is not None:
            self.fdist_classes = tuple(int(c) for c in self.fdist_classes)
        if self.fdist_lambda < 0:
            raise ValueError(f"fdist_lambda must be >= 0, got {self.fdist_lambda}")
        if self.weight_mode not in ("batch", "image"):
            raise ValueError(f"weight_mode must be 'batch' or 'image', got {self.weight_mode!r}")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        if self.ema_timing not in ("after", "before"):
            raise ValueError(f"ema_timing must be 'after' (DACS) or 'before' (DAFormer), got {self.ema_timing!r}")
        if self.class_mix_scope not in ("batch", "image"):
            raise ValueError(f"class_mix_scope must be 'batch' or 'image', got {self.class_mix_scope!r}")
        self.blur_sigma = tuple(float(s) for s in self.blur_sigma)
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)

    @classmethod
    def daformer(cls, **overrides: Any) -> "DACSConfig":
        """DAFormer's settings: EMA 0.999 updated at the start of a step, the Cityscapes
        top/bottom pseudo-label crop.

        Example:
            >>> DACSConfig.daformer().ema_alpha, DACSConfig.daformer(ignore_bottom=0).ignore_top
            (0.999, 15)
            >>> DACSConfig.daformer().ema_timing, DACSConfig().ema_timing
            ('before', 'after')
        """
        return cls(**{"ema_alpha": 0.999, "ema_timing": "before", "ignore_top": 15, "ignore_bottom": 120,
                      **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DACSConfig":
        """Builds a config from a mapping, refusing unknown keys."""
        accepted = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise ValueError(f"unknown DACS option(s) {unknown}; accepted: {sorted(accepted)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _num_classes(student: nn.Module, labels: Tensor, ignore_index: int) -> int:
    """The student's class count (a plain ``images -> logits`` module has none: the labels bound it)."""
    count = getattr(student, "num_classes", None)
    if count is not None:
        return int(count)
    valid = labels[labels != ignore_index]
    return int(valid.max()) + 1 if valid.numel() else 1


def _paired_targets(source_images: Tensor, source_labels: Tensor, target_images: Tensor) -> Tensor:
    """The target image of each source pair (``i % B'``), after checking that all share one size."""
    size = source_labels.shape[-2:]
    if tuple(source_images.shape[-2:]) != tuple(size) or tuple(target_images.shape[-2:]) != tuple(size):
        raise ValueError(f"source images {tuple(source_images.shape[-2:])}, labels {tuple(size)} and target images "
                         f"{tuple(target_images.shape[-2:])} must have the same size (crop both to one size)")
    batch = source_images.shape[0]
    return target_images[torch.arange(batch, device=target_images.device) % target_images.shape[0]]


def _teacher_before_step(student: nn.Module, teacher: nn.Module, step: int, config: DACSConfig,
                         update_teacher: bool) -> float:
    """The step's EMA coefficient; with ``ema_timing="before"`` (DAFormer) the teacher follows now."""
    alpha = ema_alpha(step, config.ema_alpha, config.ema_ramp)
    if config.ema_timing == "before":  # DAFormer: the teacher follows at the start of step t > 0
        if step == 0:
            alpha = 0.0  # step 0: the teacher is (re)set to the initial student (DAFormer's _init_ema_weights)
        if update_teacher:
            ema_update(teacher, student, alpha)
    return alpha


def _source_loss(student: nn.Module, source_images: Tensor, source_labels: Tensor, config: DACSConfig,
                 imagenet_encoder: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    """``(L_s, weighted feature distance or None)``: the student's loss on the source batch; with
    ``fdist_lambda > 0`` a hook captures its ``fdist_module`` output for the feature distance."""
    captured: list[Any] = []
    hook = None
    if config.fdist_lambda > 0:
        if imagenet_encoder is None:
            raise ValueError("fdist_lambda > 0 needs imagenet_encoder, the frozen initial "
                             f"{config.fdist_module!r} module (DACSTrainer makes it)")
        hook = student.get_submodule(config.fdist_module).register_forward_hook(
            lambda module, args, output: captured.append(output))
    try:
        loss_source = model_loss(student, source_images, source_labels, ignore_index=config.ignore_index)
    finally:
        if hook is not None:
            hook.remove()
    if hook is None:
        return loss_source, None
    return loss_source, config.fdist_lambda * encoder_feature_distance(
        captured[0], imagenet_encoder, source_images, source_labels, config.fdist_classes,
        config.fdist_scale_min_ratio, _num_classes(student, source_labels, config.ignore_index), config.ignore_index)


class _MixedBatch(NamedTuple):
    """The ClassMixed, augmented batch of a step and what made it."""

    images: Tensor
    labels: Tensor
    weights: Tensor
    masks: Tensor
    pseudo_weight: Tensor  # (B,) confidence weight of the pseudo labels


@torch.no_grad()
def _mixed_batch(teacher: nn.Module, source_images: Tensor, source_labels: Tensor, target_images: Tensor,
                 config: DACSConfig, generator: torch.Generator | None) -> _MixedBatch:
    """Teacher pseudo labels, ClassMix of source onto target, then the strong augmentation (normalised again)."""
    teacher.eval()
    labels_t, confidence = pseudo_label(teacher(target_images), source_labels.shape[-2:])
    weights_t, weight = pseudo_label_weights(confidence, config.threshold, config.weight_mode, config.ignore_top,
                                             config.ignore_bottom)
    masks = class_mix_masks(source_labels, generator, config.class_mix_scope, config.ignore_index)[0]
    raw_source = denormalize(source_images.detach().float(), config.mean, config.std)
    raw_target = denormalize(target_images.detach().float(), config.mean, config.std)
    mixed, mixed_labels, mixed_weights = class_mix(raw_source, raw_target, source_labels, labels_t, weights_t, masks)
    mixed = strong_augment(mixed.clamp(0, 1), generator, config.jitter_strength, config.jitter_p,
                           config.blur_p, config.blur_sigma)
    mixed = normalize(mixed, config.mean, config.std).to(source_images.dtype)
    return _MixedBatch(mixed, mixed_labels, mixed_weights, masks, weight)


def _optimiser_step(loss: Tensor, optimizer: torch.optim.Optimizer, scheduler: Any | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def dacs_step(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    source_images: Tensor,
    source_labels: Tensor,
    target_images: Tensor,
    step: int,
    config: DACSConfig | None = None,
    generator: torch.Generator | None = None,
    scheduler: Any | None = None,
    update_teacher: bool = True,
    imagenet_encoder: nn.Module | None = None,
) -> dict[str, Any]:
    """One DACS training step: source CE + weighted CE on the ClassMixed batch, then EMA.

    Args:
        student: The segmentor being trained (normalised images -> logits).
        teacher: Its mean teacher (:func:`vfm_adapters.adaptation.ema.make_teacher`).
        optimizer: Optimiser of the student's trainable parameters.
        source_images: Normalised ``(B, 3, H, W)`` source images.
        source_labels: ``(B, H, W)`` source labels (255 ignored).
        target_images: Normalised ``(B', 3, H, W)`` target images (pair ``i`` uses
            target ``i % B'``).
        step: 0-based index of this step (sets the EMA coefficient and, with
            ``ema_timing="before"``, whether the teacher is updated first).
        config: Options (default :class:`DACSConfig`).
        generator: Randomness of ClassMix and the augmentation.
        scheduler: Stepped after the optimiser if given.
        update_teacher: Apply the EMA update (after the step, or before it with ``ema_timing="before"``).
        imagenet_encoder: The frozen initial ``config.fdist_module`` (needed when
            ``config.fdist_lambda > 0``).

    Returns:
        ``{"loss", "loss_source", "loss_target", "pseudo_weight", "alpha", "mixed_images",
        "mixed_labels", "mixed_weights", "masks"}`` (losses as floats, the rest detached).

    Example:
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> student = nn.Conv2d(3, 4, 1)
        >>> teacher = make_teacher(student)
        >>> opt = torch.optim.SGD(student.parameters(), lr=0.1)
        >>> out = dacs_step(student, teacher, opt, torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8)),
        ...                 torch.randn(2, 3, 8, 8), step=0, generator=torch.Generator().manual_seed(0))
        >>> sorted(k for k in out if k.startswith("loss")), out["alpha"]
        (['loss', 'loss_source', 'loss_target'], 0.0)
    """
    config = config or DACSConfig()
    target_images = _paired_targets(source_images, source_labels, target_images)
    alpha = _teacher_before_step(student, teacher, step, config, update_teacher)

    train_mode(student)  # frozen batch norms (a frozen CNN host) keep their statistics
    loss_source, loss_fdist = _source_loss(student, source_images, source_labels, config, imagenet_encoder)
    mix = _mixed_batch(teacher, source_images, source_labels, target_images, config, generator)
    loss_target = model_loss(student, mix.images, mix.labels, mix.weights, config.ignore_index)
    loss = loss_source + loss_target
    if loss_fdist is not None:
        loss = loss + loss_fdist

    _optimiser_step(loss, optimizer, scheduler)
    if update_teacher and config.ema_timing == "after":
        ema_update(teacher, student, alpha)
    return {
        "loss": float(loss.detach()), "loss_source": float(loss_source.detach()),
        "loss_target": float(loss_target.detach()), "pseudo_weight": float(mix.pseudo_weight.mean()), "alpha": alpha,
        **({"loss_fdist": float(loss_fdist.detach())} if loss_fdist is not None else {}),
        "mixed_images": mix.images.detach(), "mixed_labels": mix.labels.detach(),
        "mixed_weights": mix.weights.detach(), "masks": mix.masks,
    }


class DACSTrainer:
    """Holds the student, its mean teacher, the optimiser and the step counter.

    Args:
        segmentor: The student (normalised images -> logits); trained in place.
        optimizer: Optimiser of its trainable parameters (default: AdamW, lr 6e-5, wd 0.01
            over every parameter requiring gradients).
        config: :class:`DACSConfig` (or a mapping of its fields).
        scheduler: Optional learning-rate scheduler, stepped every step.
        teacher: An existing teacher (default: :func:`make_teacher` of the segmentor).

    Example:
        >>> from torch import nn
        >>> trainer = DACSTrainer(nn.Conv2d(3, 2, 1), config={"seed": 1})
        >>> out = trainer.step(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), torch.randn(1, 3, 4, 4))
        >>> trainer.iteration, out["alpha"]
        (1, 0.0)
    """

    def __init__(
        self,
        segmentor: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: DACSConfig | Mapping[str, Any] | None = None,
        scheduler: Any | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        if isinstance(segmentor, SegmentationModel) and not segmentor.per_pixel_loss:
            raise PixelWeightsUnsupported(
                f"{type(segmentor).__name__} has no per-pixel loss for DACS to weight by the pseudo labels' "
                "confidence; use a per-pixel head (fpn, linear, daformer)")
        self.student = segmentor
        self.config = config if isinstance(config, DACSConfig) else DACSConfig.from_dict(config or {})
        self.teacher = teacher if teacher is not None else make_teacher(segmentor)
        if optimizer is None:
            params = [p for p in segmentor.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.iteration = 0
        self.imagenet_encoder = None
        if self.config.fdist_lambda > 0:  # DAFormer's frozen copy of the initial (ImageNet) encoder
            self.imagenet_encoder = make_teacher(segmentor.get_submodule(self.config.fdist_module))

    def step(self, source_images: Tensor, source_labels: Tensor, target_images: Tensor) -> dict[str, Any]:
        """One step of :func:`dacs_step`; returns its dict."""
        out = dacs_step(self.student, self.teacher, self.optimizer, source_images, source_labels, target_images,
                        self.iteration, self.config, self.generator, self.scheduler,
                        imagenet_encoder=self.imagenet_encoder)
        self.iteration += 1
        return out
