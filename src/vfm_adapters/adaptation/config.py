"""The config of a DACS or self-training run: defaults, schema and validation (``vfm-adapters adapt CONFIG``).

A config is YAML/JSON with the sections below; every key is optional except the data.
``model`` accepts every key of :data:`vfm_adapters.seg.config.DEFAULTS` ``["model"]``
(``kind: vit``: a timm ViT host, adapters, neck and a light head, built by
:func:`vfm_adapters.seg.build.build_segmentor`) plus the keys of a ``kind: features``
model (a timm ``features_only`` encoder such as CLIP ConvNeXt-L + a decode head)::

    recipe: dacs                          # dacs | self_training | source_only (CLOUDS stage 1)
    model:
      kind: vit                           # vit | features
      backbone: eva02_large_patch14_clip_224
      backbone_kwargs: {img_size: 512}
      methods: [full]                     # full fine-tuning; [rein] for Rein
      head: fpn                           # fpn | linear (| mask2former for kind: features)
      encoder: convnext_large_mlp.clip_laion2b_ft_soup_320   # kind: features only
      encoder_kwargs: {}
      out_indices: [0, 1, 2, 3]
      freeze_encoder: true
      head_options: {}                    # extra Mask2FormerHead options
      decoder_checkpoint: null            # decoder.safetensors of an earlier run (kind: features)
    data:
      source: [{type: gta5, root: data/gta5}]
      target: [{type: cityscapes, root: data/cityscapes, split: train}]       # dacs
      unlabelled: [{type: unlabelled, root: data/generated}]                   # self_training
      val: [{type: cityscapes, root: data/cityscapes, split: val, resize: [1024, 512]}]
      crop_size: [512, 512]
      scale: [1280, 720]                  # source rescale; target_scale for the target
      target_scale: [1024, 512]
      ratio_range: null                   # null: FIXED keep-ratio resize (DAFormer); [0.5, 2.0]: random rescale
      cat_max_ratio: 0.75                 # both domains (the target crop reads the target's labels if loaded)
      rare_class_sampling: {temperature: 0.01, min_pixels: 3000, min_crop_ratio: 0.5, cache: null}   # or null
    optim: {lr: 6.0e-4, backbone_lr_mult: 0.1, weight_decay: 0.01, warmup_iters: 1500, poly_power: 1.0,
            schedule: poly}                 # poly (warm-up + poly) | constant (CLOUDS)
    train: {iterations: 40000, batch_size: 2, seed: 0, checkpoint_interval: 1000, output_dir: runs/dacs}
    dacs: {ema_alpha: 0.999, ...}          # DACSConfig fields
    self_training: {ema_interval: 100, ...}  # SelfTrainingConfig fields
    sam: {enabled: true, model: null, refine: {min_component_pixels: 5000}}   # model null: DEFAULT_SAM (sam-vit-base)
    eval: {mode: slide, crop: 512, stride: 341}
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterable, Mapping

from ..seg import config as seg_config
from ..seg.build import segmentor_class
from ..seg.config import ConfigError
from .dacs import DACSConfig
from .feature_model import CLIP_CONVNEXT_L
from .self_training import SelfTrainingConfig

__all__ = ["DEFAULTS", "RECIPES", "load_adaptation_config"]

RECIPES = ("dacs", "self_training", "source_only")
DEFAULTS: dict[str, Any] = {
    "recipe": "dacs",
    "model": {
        **copy.deepcopy(seg_config.DEFAULTS["model"]),
        "kind": "vit", "encoder": CLIP_CONVNEXT_L, "encoder_kwargs": {}, "out_indices": [0, 1, 2, 3],
        "freeze_encoder": True, "head_options": {}, "decoder_checkpoint": None,
    },
    "data": {
        "source": [], "target": [], "unlabelled": [], "val": [], "crop_size": [512, 512], "scale": [1280, 720],
        "target_scale": [1024, 512], "ratio_range": [0.5, 2.0], "cat_max_ratio": 0.75, "flip": 0.5,
        "photometric": False, "num_workers": 2, "rare_class_sampling": None,
    },
    "optim": {
        "lr": 6e-5, "weight_decay": 0.01, "betas": [0.9, 0.999], "backbone_lr_mult": 0.1, "poly_power": 1.0,
        "warmup_iters": 0, "warmup_ratio": 1e-6, "grad_clip": None, "schedule": "poly",
    },
    "train": {"iterations": 40000, "batch_size": 2, "seed": 0, "log_interval": 50, "checkpoint_interval": 1000,
              "output_dir": "runs/adaptation"},
    "dacs": {},
    "self_training": {},
    "sam": {"enabled": None, "model": None, "refine": {}},
    "eval": copy.deepcopy(seg_config.DEFAULTS["eval"]),
}


#: Types of the adaptation keys whose default is ``null``.
NULLABLE_TYPES: dict[str, type] = {
    **seg_config.NULLABLE_TYPES, "model.decoder_checkpoint": str, "sam.enabled": bool, "sam.model": str,
}
#: ``data.rare_class_sampling`` keys and their defaults (the section itself may be ``null``).
RARE_CLASS_SAMPLING = {"temperature": 0.01, "min_pixels": 3000, "min_crop_ratio": 0.5, "cache": None}


def _rare_class_sampling(path: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    merged = seg_config.merge_config(RARE_CLASS_SAMPLING, value, prefix=f"{path}.",
                                     types={f"{path}.cache": str})
    return {k: v for k, v in merged.items() if k in value}


_TRAIN_SETS = seg_config.dataset_check({"unlabelled": ("root", "recursive")})
CHECKS: dict[str, seg_config.Check] = {
    "model.methods": seg_config.check_methods, "model.method_options": seg_config.check_method_options,
    "data.source": _TRAIN_SETS, "data.target": _TRAIN_SETS, "data.unlabelled": _TRAIN_SETS,
    "data.val": seg_config.dataset_check(), "data.rare_class_sampling": _rare_class_sampling,
    "dacs": lambda path, value: seg_config.dataclass_options(path, DACSConfig, value),
    "self_training": lambda path, value: seg_config.dataclass_options(path, SelfTrainingConfig, value),
}


def load_adaptation_config(source: str | os.PathLike | Mapping[str, Any] | None = None,
                           overrides: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Reads a YAML/JSON adaptation config (or a dict), applies ``key=value`` overrides, fills defaults.

    The same loader as :func:`vfm_adapters.seg.config.load_config` with this module's
    :data:`DEFAULTS`: unknown keys at any depth (``dacs``/``self_training`` options,
    method options, dataset entries) and wrong types raise
    :class:`~vfm_adapters.seg.config.ConfigError` naming the key path.

    Example:
        >>> cfg = load_adaptation_config({"recipe": "dacs", "dacs": {"ema_alpha": 0.999}}, ["optim.lr=1e-4"])
        >>> cfg["dacs"]["ema_alpha"], cfg["model"]["kind"], cfg["optim"]["poly_power"], cfg["optim"]["lr"]
        (0.999, 'vit', 1.0, 0.0001)
    """
    raw = seg_config.apply_overrides(seg_config.read_source(source), overrides)
    config = seg_config.merge_config(DEFAULTS, raw, CHECKS, NULLABLE_TYPES)
    if config["recipe"] not in RECIPES:
        raise seg_config.unknown_key_error("recipe", config["recipe"], RECIPES, f"unknown recipe {config['recipe']!r}")
    if config["optim"]["schedule"] not in ("poly", "constant"):
        raise ConfigError(f"optim.schedule must be 'poly' or 'constant', got {config['optim']['schedule']!r}")
    if config["model"]["kind"] not in ("vit", "features"):
        raise ConfigError(f"model.kind must be 'vit' or 'features', got {config['model']['kind']!r}")
    if config["model"]["kind"] == "vit" and config["model"]["decoder_checkpoint"]:
        raise ConfigError("model.decoder_checkpoint is read only with model.kind: features (a features-only encoder's "
                          "decode head); a kind: vit run starts from backbone_checkpoint and its own adapters")
    for key in ("iterations", "batch_size"):
        if not isinstance(config["train"][key], int) or config["train"][key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {config['train'][key]!r}")
    seg_config.validate_optim(config["optim"], config["train"])
    seg_config.validate_eval(config["eval"])
    head = config["model"]["head"]
    if config["recipe"] == "dacs" and not segmentor_class(head).per_pixel_loss:
        # DACS weights each pixel of the mixed image's loss by the pseudo label's confidence;
        # a set-prediction head (Mask2Former: matching + mask losses) has no per-pixel loss.
        raise ConfigError(
            f"model.head: {head} cannot be trained with recipe: dacs (DACS weights a per-pixel loss by the pseudo "
            f"labels' confidence, and {head}'s loss is not per pixel); use a per-pixel head (fpn, linear, "
            f"daformer) for DACS, or recipe: self_training / source_only for {head}"
        )
    for section, config_class in (("dacs", DACSConfig), ("self_training", SelfTrainingConfig)):
        try:
            config_class.from_dict(config[section])  # the dataclasses' own value checks, now
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{section}: {error}") from None
    return config
