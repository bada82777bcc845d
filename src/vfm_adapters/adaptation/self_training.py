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

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..seg.datasets import IGNORE_INDEX, IMAGE_SUFFIXES, read_image
from ..seg.model import PixelWeightsUnsupported, check_normalisation, segmentation_loss, train_mode
from ..seg.optim import parameter_groups
from ..seg.transforms import IMAGENET_MEAN, IMAGENET_STD, PhotoMetricDistortion
from .augment import denormalize, normalize
from .dacs import strong_augment
from .ema import ema_update, make_teacher
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

#: OpenCLIP ConvNeXt-L (``convnext_large_d_320``, LAION-2B, "ft soup") in timm: the CLIP
#: ConvNeXt-L image tower behind FC-CLIP and CLOUDS.
CLIP_CONVNEXT_L = "convnext_large_mlp.clip_laion2b_ft_soup_320"
#: CLIP's normalisation on the 0..255 scale.
CLIP_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)


class UnlabelledFolder(Dataset):
    """Images of a folder (recursively), without labels: ``{"image": uint8 (3, H, W), "path"}``.

    Args:
        root: The folder (e.g. generated street scenes).
        transform: Optional ``transform(sample, rng=...)`` (the seg transforms work on
            samples without a label).
        recursive: Also read sub-folders.

    Example:
        >>> import tempfile; from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> Image.new("RGB", (5, 4)).save(f"{root}/a.png")
        >>> data = UnlabelledFolder(root)
        >>> len(data), data[0]["image"].shape, "label" in data[0]
        (1, torch.Size([3, 4, 5]), False)
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, recursive: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"unlabelled image folder {self.root} does not exist")
        pattern = self.root.rglob("*") if recursive else self.root.glob("*")
        self.files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> dict[str, Any]:
        """The raw image ``index`` (no transform)."""
        return {"image": read_image(self.files[index]), "path": str(self.files[index])}

    def get(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample, rng=rng) if self.transform is not None else sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)


class TimmFeatureEncoder(nn.Module):
    """A timm ``features_only`` backbone giving 4 maps (strides 4/8/16/32 for a ConvNeXt).

    Args:
        name: timm model name (default: CLIP ConvNeXt-L, :data:`CLIP_CONVNEXT_L`).
        pretrained: Load timm's pretrained weights (needs a download).
        out_indices: Stages to return.
        frozen: Freeze every weight and keep the module in eval mode (CLOUDS).
        **kwargs: Passed to ``timm.create_model``.

    Example:
        >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0, 1, 2, 3))
        >>> [tuple(f.shape[1:]) for f in enc(torch.randn(1, 3, 64, 64))], enc.channels
        ([(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)], [40, 80, 160, 320])
    """

    def __init__(self, name: str = CLIP_CONVNEXT_L, pretrained: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen: bool = True, **kwargs: Any) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(name, pretrained=pretrained, features_only=True,
                                       out_indices=tuple(out_indices), **kwargs)
        self.channels = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())
        self.frozen = bool(frozen)
        if self.frozen:
            for param in self.model.parameters():
                param.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "TimmFeatureEncoder":
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.model(images))


class DecodeHead(nn.Module):
    """Optional neck + head over a list of feature maps; knows how to score and to train the output.

    Works with the light heads of :mod:`vfm_adapters.seg.heads` (logits) and with
    :class:`vfm_adapters.seg.mask2former.Mask2FormerHead` (a ``Mask2FormerOutput``: scores via
    ``head.predict``, loss via ``head.loss``, i.e. Hungarian matching on pseudo labels).

    Example:
        >>> from vfm_adapters.seg import LinearHead
        >>> head = DecodeHead(LinearHead([4, 4], num_classes=3))
        >>> out = head([torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)])
        >>> head.logits(out, (16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, head: nn.Module, neck: nn.Module | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.neck = neck
        self.head = head
        self.ignore_index = ignore_index

    def forward(self, features: Sequence[Tensor]) -> Any:
        maps = self.neck(features) if self.neck is not None else features
        return self.head(maps)

    def logits(self, output: Any, size: Sequence[int]) -> Tensor:
        """Per-pixel class scores ``(B, K, H, W)`` at ``size``."""
        if isinstance(output, Tensor):
            if tuple(output.shape[-2:]) != tuple(size):
                output = F.interpolate(output, size=tuple(size), mode="bilinear", align_corners=False)
            return output
        return self.head.predict(output, size=tuple(size))

    def loss(self, output: Any, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Cross-entropy (255 ignored; weighted by ``pixel_weights`` if given) for logits, the
        head's own loss otherwise (which refuses per-pixel weights)."""
        if not isinstance(output, Tensor):
            if pixel_weights is not None:
                raise PixelWeightsUnsupported(f"{type(self.head).__name__} has no per-pixel loss to weight (DACS); "
                                              "use a per-pixel head (fpn, linear, daformer)")
            return self.head.loss(output, labels)
        return segmentation_loss(output, labels, self.ignore_index, pixel_weights)


class FeatureSegmentor(nn.Module):
    """``encoder`` (list of maps) + ``decoder`` (:class:`DecodeHead`) -> logits at the image size.

    A :class:`~vfm_adapters.seg.model.SegmentationModel`: its loss is the decoder's
    (cross-entropy for a light head, the head's own for Mask2Former).

    Args:
        encoder: Maps normalised images to a list of feature maps.
        decoder: The :class:`DecodeHead` over them.
        mean: Per-channel mean (0-255 RGB) of the images this model expects.
        std: Per-channel standard deviation, as ``mean``.

    Example:
        >>> from vfm_adapters.seg import FPNHead
        >>> enc = TimmFeatureEncoder("convnext_atto")
        >>> seg = FeatureSegmentor(enc, DecodeHead(FPNHead(enc.channels, num_classes=5, channels=16)))
        >>> seg(torch.randn(1, 3, 64, 64)).shape, seg.num_classes
        (torch.Size([1, 5, 64, 64]), 5)
    """

    def __init__(self, encoder: nn.Module, decoder: DecodeHead, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mean, self.std = check_normalisation(mean, std)
        self.num_classes = int(decoder.head.num_classes)

    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def encode(self, images: Tensor) -> Any:
        """Encoder features; without gradients when the encoder is frozen."""
        if self.encoder_trainable():
            return self.encoder(images)
        with torch.no_grad():
            return self.encoder(images)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``(B, K, H, W)`` at the image size or, given ``labels``, the training loss."""
        if labels is not None:
            return self.loss(images, labels)
        return self.decoder.logits(self.decoder(self.encode(images)), images.shape[-2:])

    def loss(self, images: Tensor, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """The decoder's loss on the encoded images (:meth:`DecodeHead.loss`)."""
        return self.decoder.loss(self.decoder(self.encode(images)), labels, pixel_weights)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1,
                         no_decay: str = "small_tensors") -> list[dict]:
        """AdamW groups (:func:`vfm_adapters.seg.optim.parameter_groups`): a trainable encoder at
        ``lr * backbone_lr_mult``; no decay on 0/1-d tensors, embeddings and norms."""
        return parameter_groups(self, lr, weight_decay, backbone_lr_mult, no_decay, host=self.encoder)

    def decode_modules(self) -> nn.ModuleDict:
        """The trained part (the decode head), as :class:`vfm_adapters.seg.Segmentor` names it."""
        return nn.ModuleDict({"decoder": self.decoder})


def from_segmentor(segmentor: nn.Module) -> FeatureSegmentor:
    """A :class:`FeatureSegmentor` view of a ``seg.Segmentor`` / ``Mask2FormerSegmentor`` (modules shared).

    The encoder is the segmentor's ``features`` (host + adapters), the decoder its neck +
    head. A Mask2Former head whose queries come from Rein is refused: its decoder would
    depend on the backbone's tokens, and CLOUDS' teacher is the decode head alone.

    Example:
        >>> import timm
        >>> from vfm_adapters.seg import Segmentor
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
        >>> seg = Segmentor(vit, num_classes=3, head_channels=8).eval()
        >>> view = from_segmentor(seg)
        >>> view.decoder.head is seg.head, view(torch.randn(2, 3, 32, 32)).shape
        (True, torch.Size([2, 3, 32, 32]))
    """
    head = segmentor.head
    if getattr(head, "link_rein_queries", False):
        raise ValueError("a Mask2Former head linked to Rein's queries cannot have a decode-head-only teacher; "
                         "build the segmentor with link_rein_queries=False")
    return FeatureSegmentor(segmentor.features, DecodeHead(head, segmentor.neck))


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


class MixedStream(Dataset):
    """One stream over labelled source and unlabelled (generated) sets, each with its own transform.

    Keyed by ``(position, index)`` like :class:`vfm_adapters.seg.AugmentedStream` (index
    into the concatenation); each sample gets ``"generated"`` (bool) and, for unlabelled
    images, an all-ignore ``"label"`` so a batch stacks.

    Example:
        >>> src = [{"image": torch.zeros(3, 4, 4), "label": torch.ones(4, 4, dtype=torch.long)}]
        >>> gen = [{"image": torch.ones(3, 4, 4)}]
        >>> stream = MixedStream([src, gen], [None, None])
        >>> [(s["generated"], int(s["label"][0, 0])) for s in (stream[(0, 0)], stream[(1, 1)])]
        [(False, 1), (True, 255)]
    """

    def __init__(self, sources: Sequence[Any], transforms: Sequence[Callable | None], seed: int = 0,
                 generated: Sequence[bool] = (False, True), ignore_index: int = IGNORE_INDEX) -> None:
        if not (len(sources) == len(transforms) == len(generated)):
            raise ValueError("one transform and one generated flag per source")
        self.sources, self.transforms, self.generated = list(sources), list(transforms), [bool(g) for g in generated]
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.seed, self.ignore_index = int(seed), ignore_index

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = (int(k) for k in key)
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        data, local = self.sources[source], index - int(self.offsets[source])
        sample = dict(data.load(local) if hasattr(data, "load") else data[local])
        if self.transforms[source] is not None:
            sample = self.transforms[source](sample, rng=np.random.default_rng([self.seed, position]))
        sample = dict(sample)
        sample["generated"] = self.generated[source]
        if "label" not in sample:
            sample["label"] = torch.full(tuple(sample["image"].shape[-2:]), self.ignore_index, dtype=torch.long)
        return sample


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


class SourceTrainer:
    """Source-only training of the decode head (CLOUDS stage 1): ``loss = decoder.loss(x_s, y_s)``.

    Its ``decoder.safetensors`` is what stage 2 starts from (``model.decoder_checkpoint``).

    Args:
        model: A :class:`FeatureSegmentor` (or :func:`from_segmentor` of a seg segmentor).
        optimizer: Default AdamW (lr 1e-4, wd 0.05) over trainable parameters.
        scheduler: Optional scheduler stepped every step.
        grad_clip: Gradient norm clip.

    Example:
        >>> from vfm_adapters.seg import LinearHead
        >>> enc = TimmFeatureEncoder("convnext_atto", out_indices=(0,))
        >>> trainer = SourceTrainer(FeatureSegmentor(enc, DecodeHead(LinearHead(enc.channels, 3))))
        >>> out = trainer.step(torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long))
        >>> trainer.iteration, out["loss"] > 0
        (1, True)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                 grad_clip: float | None = None) -> None:
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            model = from_segmentor(model)
        self.model = model
        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.teacher, self.generator = None, None
        self.iteration = 0

    def step(self, images: Tensor, labels: Tensor) -> dict[str, Any]:
        """One supervised step on a labelled batch; returns ``{"loss"}``."""
        train_mode(self.model)
        loss = self.model.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration += 1
        return {"loss": float(loss.detach())}
