"""Domain adaptation and self-training recipes on top of adapted vision foundation models.

* :mod:`.dacs`: DACS (mean teacher, confidence-weighted pseudo labels, ClassMix, colour
  jitter + blur) with DAFormer's options (EMA 0.999, warm-up, rare-class sampling in
  :mod:`.rare_class`, feature distance in :mod:`.feature_distance`; the mixing parts in
  :mod:`.mixing`); ``docs/dacs.md``.
* :mod:`.self_training` and :mod:`.sam_refine`: CLOUDS-style self-training with an EMA
  decode-head teacher and SAM refinement of pseudo labels on unlabelled (generated)
  images (:mod:`.data`); the features-only segmentor in :mod:`.feature_model`;
  ``docs/self_training.md``.
* :mod:`.generate`: street scenes from a diffusion model (optional ``diffusers``).
* :mod:`.recipes`: YAML configs -> runs (``vfm-adapters adapt CONFIG``), with the config
  in :mod:`.config`, the data streams in :mod:`.loaders` and the resumable state in
  :mod:`.checkpoints`.

Every recipe trains a :class:`~vfm_adapters.seg.model.SegmentationModel` with its own
loss, or any ``nn.Module`` mapping normalised images ``(B, 3, H, W)`` to logits
``(B, K, H, W)`` with per-pixel cross-entropy.

Example:
    >>> import torch
    >>> from vfm_adapters.adaptation import class_mix_mask
    >>> mask, classes = class_mix_mask(torch.tensor([[0, 1], [2, 3]]), torch.Generator().manual_seed(0))
    >>> int(mask.sum()), len(classes)
    (2, 2)
"""

from .augment import color_jitter, gaussian_blur
from .dacs import (
    DACSConfig,
    DACSTrainer,
    RareClassSampler,
    class_mix,
    class_mix_mask,
    class_pixel_counts,
    confidence_weight,
    dacs_step,
    pseudo_label,
    rare_class_probabilities,
    strong_augment,
    warmup_poly_lambda,
)
from .ema import ema_alpha, ema_update, make_teacher
from .recipes import build_model, build_trainer, load_adaptation_config, train_adaptation
from .sam_refine import SamRefineConfig, SamRefiner, class_components, merge_masks, sample_points
from .self_training import (
    CLIP_CONVNEXT_L,
    DecodeHead,
    FeatureSegmentor,
    SelfTrainer,
    SelfTrainingConfig,
    SourceTrainer,
    TimmFeatureEncoder,
    UnlabelledFolder,
    from_segmentor,
    self_training_mixed_step,
    self_training_step,
)

_LAZY = {"SCENE_PROMPTS", "generate_images", "load_prompts"}  # from .generate, imported on use so that
# ``python -m vfm_adapters.adaptation.generate`` does not find the module already imported


def __getattr__(name: str):
    if name in _LAZY:
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLIP_CONVNEXT_L", "DACSConfig", "DACSTrainer", "DecodeHead", "FeatureSegmentor", "RareClassSampler",
    "SCENE_PROMPTS", "SamRefineConfig", "SamRefiner", "SelfTrainer", "SelfTrainingConfig", "TimmFeatureEncoder",
    "UnlabelledFolder", "build_model", "build_trainer", "class_components", "class_mix", "class_mix_mask",
    "class_pixel_counts", "color_jitter", "confidence_weight", "dacs_step", "ema_alpha", "ema_update",
    "from_segmentor", "gaussian_blur", "generate_images", "load_adaptation_config", "load_prompts", "make_teacher",
    "merge_masks", "pseudo_label", "rare_class_probabilities", "sample_points", "self_training_step",
    "strong_augment", "train_adaptation", "warmup_poly_lambda",
    "SourceTrainer", "self_training_mixed_step",
]
