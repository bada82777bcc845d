"""Config-driven DACS and self-training runs (``python -m vfm_adapters.adaptation CONFIG``).

A config is YAML/JSON with the sections below; every key is optional except the data.
``model`` accepts every key of :data:`vfm_adapters.seg.training.DEFAULTS` ``["model"]``
(``kind: vit``: a timm ViT host, adapters, neck and a light head, built by
:func:`vfm_adapters.seg.training.build_segmentor`) plus the keys of a ``kind: features``
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
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .._io import write_atomically
from ..seg import config as seg_config
from ..seg import training as seg_training
from ..seg.datasets import build_dataset
from ..seg.build import build_segmentor, segmentor_class
from ..seg.run_dir import check_run_dir, discard_replaced, prepare_run_dir, truncate_log
from ..seg.sampling import AugmentedStream, StreamSampler
from ..seg.transforms import (Compose, Normalize, PhotoMetricDistortion, RandomCrop, RandomFlip, RandomRescale,
                              Resize)
from .dacs import (DACSConfig, DACSTrainer, RareClassCrops, RareClassPositions, RareClassSampler, class_pixel_counts,
                   warmup_poly_lambda)
from .self_training import (
    CLIP_CONVNEXT_L,
    DecodeHead,
    FeatureSegmentor,
    MixedStream,
    SelfTrainer,
    SourceTrainer,
    SelfTrainingConfig,
    TimmFeatureEncoder,
    UnlabelledFolder,
)

__all__ = ["CHECKPOINT_NAME", "DEFAULTS", "adaptation_transform", "build_clip_classifier", "build_model",
           "build_trainer", "load_adaptation_checkpoint", "load_adaptation_config", "save_adaptation_checkpoint",
           "train_adaptation"]

RECIPES = ("dacs", "self_training", "source_only")
#: Resumable state of an adaptation run, in ``train.output_dir``.
CHECKPOINT_NAME = "checkpoint.pt"

DEFAULTS: dict[str, Any] = {
    "recipe": "dacs",
    "model": {
        **copy.deepcopy(seg_training.DEFAULTS["model"]),
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
    "eval": copy.deepcopy(seg_training.DEFAULTS["eval"]),
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
        raise seg_training.ConfigError(f"optim.schedule must be 'poly' or 'constant', got {config['optim']['schedule']!r}")
    if config["model"]["kind"] not in ("vit", "features"):
        raise seg_training.ConfigError(f"model.kind must be 'vit' or 'features', got {config['model']['kind']!r}")
    for key in ("iterations", "batch_size"):
        if not isinstance(config["train"][key], int) or config["train"][key] < 1:
            raise seg_training.ConfigError(f"train.{key} must be a positive integer, got {config['train'][key]!r}")
    seg_config.validate_optim(config["optim"], config["train"])
    seg_config.validate_eval(config["eval"])
    if config["recipe"] == "dacs" and config["model"]["head"] == "mask2former":
        # DACS's losses are per-pixel cross-entropies on the mixed image; Mask2Former is
        # trained by set prediction (matching + mask losses), which DACS does not implement.
        raise seg_training.ConfigError(
            "model.head: mask2former cannot be trained with recipe: dacs (DACS's losses are per-pixel cross-entropy "
            "on logits, Mask2Former needs its matching and mask losses); use a per-pixel head (fpn, linear, "
            "daformer) for DACS, or recipe: self_training / source_only for Mask2Former"
        )
    for section, config_class in (("dacs", DACSConfig), ("self_training", SelfTrainingConfig)):
        try:
            config_class.from_dict(config[section])  # the dataclasses' own value checks, now
        except (TypeError, ValueError) as error:
            raise seg_training.ConfigError(f"{section}: {error}") from None
    return config


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
    """The segmentor of a config's ``model`` section (works under ``torch.device("meta")``).

    ``kind: vit`` is :func:`vfm_adapters.seg.build.build_segmentor`; ``kind: features``
    puts the head of the configured segmentor class (:func:`~vfm_adapters.seg.build.segmentor_class`)
    on a timm ``features_only`` encoder.

    Example:
        >>> m = build_model({**DEFAULTS["model"], "kind": "features", "encoder": "convnext_atto",
        ...                  "num_classes": 3, "head_channels": 8})
        >>> type(m).__name__, m(torch.randn(2, 3, 64, 64)).shape
        ('FeatureSegmentor', torch.Size([2, 3, 64, 64]))
    """
    cfg = {**DEFAULTS["model"], **dict(model_config)}
    if cfg["kind"] == "vit":
        vit_keys = set(seg_config.DEFAULTS["model"])
        return build_segmentor({k: v for k, v in cfg.items() if k in vit_keys})
    encoder = TimmFeatureEncoder(cfg["encoder"], pretrained=bool(cfg["pretrained"]), out_indices=cfg["out_indices"],
                                 frozen=bool(cfg["freeze_encoder"]), **dict(cfg["encoder_kwargs"] or {}))
    head = segmentor_class(cfg["head"]).build_head(cfg["head"], encoder.channels, cfg)
    model = FeatureSegmentor(encoder, DecodeHead(head), mean=cfg["mean"], std=cfg["std"])
    if cfg["decoder_checkpoint"]:  # e.g. the decode head of a source-only stage 1
        from safetensors.torch import load_file

        model.decoder.load_state_dict(load_file(str(cfg["decoder_checkpoint"])))
    return model


def _constant(step: int) -> float:
    return 1.0


def build_trainer(config: Mapping[str, Any], model: nn.Module | None = None) -> DACSTrainer | SelfTrainer | SourceTrainer:
    """Model (unless given), AdamW, warm-up + poly schedule and the recipe's trainer.

    Example:
        >>> cfg = load_adaptation_config({"model": {"kind": "features", "encoder": "convnext_atto",
        ...     "num_classes": 3, "head": "linear"}, "recipe": "self_training"})
        >>> type(build_trainer(cfg)).__name__
        'SelfTrainer'
    """
    model = build_model(config["model"]) if model is None else model
    oc, mc = config["optim"], config["model"]
    groups = model.parameter_groups(oc["lr"], oc["weight_decay"], oc["backbone_lr_mult"])
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=oc["lr"],
                                  betas=tuple(oc["betas"]), weight_decay=oc["weight_decay"])
    if oc["schedule"] == "constant":  # CLOUDS: the lr never changes (its step at 100k is never reached)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    else:
        schedule = warmup_poly_lambda(int(config["train"]["iterations"]), int(oc["warmup_iters"]),
                                      float(oc["warmup_ratio"]), float(oc["poly_power"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    norm = {"mean": tuple(mc["mean"]), "std": tuple(mc["std"]), "seed": int(config["train"]["seed"])}
    if config["recipe"] == "dacs":
        return DACSTrainer(model, optimizer, DACSConfig.from_dict({**norm, **config["dacs"]}), scheduler)
    if config["recipe"] == "source_only":
        return SourceTrainer(model, optimizer, scheduler, oc["grad_clip"])
    refiner = None
    sam = config["sam"]
    if sam.get("enabled") or (sam.get("enabled") is None and sam.get("model")):
        from .sam_refine import SamRefiner

        # loaded on first use (so a config builds offline / on the meta device)
        refiner = SamRefiner.from_pretrained(sam.get("model"), sam.get("refine") or {})
    return SelfTrainer(model, optimizer, SelfTrainingConfig.from_dict({**norm, **config["self_training"]}), refiner,
                       scheduler, oc["grad_clip"])


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"image": torch.stack([s["image"] for s in samples])}
    if all("label" in s for s in samples):
        out["label"] = torch.stack([s["label"] for s in samples])
    if all("generated" in s for s in samples):
        out["generated"] = torch.tensor([bool(s["generated"]) for s in samples])
    return out


def adaptation_transform(crop_size: tuple[int, int], scale: tuple[int, int] | None,
                         ratio_range: tuple[float, float] | None, cat_max_ratio: float, flip: float,
                         photometric: bool, mean, std) -> Compose:
    """The training pipeline of an adaptation config.

    ``ratio_range=None`` is DAFormer's UDA pipeline: a FIXED keep-ratio resize into
    ``scale`` (GTA5 (1280, 720), Cityscapes (1024, 512)), then the crop; a range gives
    the random rescale of the supervised recipes.

    Example:
        >>> t = adaptation_transform((4, 4), (16, 8), None, 0.75, 0.0, False, (0, 0, 0), (1, 1, 1))
        >>> t.transforms[0]
        Resize(size=None, scale=(16, 8))
    """
    steps: list[Any] = []
    if scale is not None:
        steps.append(Resize(scale=tuple(scale)) if ratio_range is None else RandomRescale(tuple(scale), tuple(ratio_range)))
    steps.append(RandomCrop(tuple(crop_size), cat_max_ratio=float(cat_max_ratio)))
    if flip > 0:
        steps.append(RandomFlip(flip))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(Normalize(mean, std))
    return Compose(steps)


def _loader_generator(seed: int) -> torch.Generator:
    """A loader's own generator: creating a loader then draws nothing from the global RNG (exact resume)."""
    return torch.Generator().manual_seed(int(seed))


def _build_source(spec: Mapping[str, Any]):
    if str(spec.get("type", "")).lower() == "unlabelled":
        return UnlabelledFolder(spec["root"], recursive=bool(spec.get("recursive", True)))
    return build_dataset(spec)


def _loader(specs, transform, batch: int, seed: int, length: int, workers: int, sampler: Sampler | None = None,
            start: int = 0):
    sources = [_build_source(spec) for spec in specs]
    if sampler is None:
        weights = [float(spec.get("weight", 1.0)) for spec in specs]
        sampler = StreamSampler([len(s) for s in sources], weights, seed=seed, start=start, length=length)
    return DataLoader(AugmentedStream(sources, transform, seed), batch_size=batch, sampler=sampler,
                      num_workers=workers, collate_fn=_collate, generator=_loader_generator(seed))


def _trainer_modules(trainer: Any) -> dict[str, nn.Module]:
    student = trainer.student if isinstance(trainer, DACSTrainer) else trainer.model
    modules = {"student": student}
    if getattr(trainer, "teacher", None) is not None:
        modules["teacher"] = trainer.teacher
    return modules


def save_adaptation_checkpoint(path: str | os.PathLike, trainer: Any, step: int, config: Mapping[str, Any]) -> None:
    """Writes everything a bit-exact resume needs, atomically.

    The student's trained tensors (parameters requiring gradients and every buffer), the
    whole teacher (its frozen entries drift by EMA rounding, so they are saved too), the
    optimiser, the scheduler, the trainer's generator and step, and the global RNGs.

    Example:
        >>> import tempfile
        >>> trainer = DACSTrainer(nn.Conv2d(3, 2, 1))
        >>> _ = trainer.step(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), torch.randn(1, 3, 4, 4))
        >>> path = Path(tempfile.mkdtemp()) / CHECKPOINT_NAME
        >>> save_adaptation_checkpoint(path, trainer, step=1, config={})
        >>> fresh = DACSTrainer(nn.Conv2d(3, 2, 1))
        >>> load_adaptation_checkpoint(path, fresh), fresh.iteration, torch.equal(fresh.student.weight, trainer.student.weight)
        (1, 1, True)
    """
    modules = _trainer_modules(trainer)
    student = modules["student"]
    payload = {
        "step": int(step), "iteration": int(trainer.iteration),
        "student": {**{n: p.detach().cpu().clone() for n, p in student.named_parameters() if p.requires_grad},
                    **{n: b.detach().cpu().clone() for n, b in student.named_buffers()}},
        "teacher": ({k: v.detach().cpu().clone() for k, v in modules["teacher"].state_dict().items()}
                    if "teacher" in modules else None),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "generator": trainer.generator.get_state() if getattr(trainer, "generator", None) is not None else None,
        "rng": seg_training.random_state(), "config": json.dumps(config, sort_keys=True, default=str),
    }
    write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


def load_adaptation_checkpoint(path: str | os.PathLike, trainer: Any, config: Mapping[str, Any] | None = None) -> int:
    """Restores :func:`save_adaptation_checkpoint`'s state into a freshly built trainer; returns the step."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if config is not None:
        saved, now = json.loads(payload["config"]), json.loads(json.dumps(config, sort_keys=True, default=str))
        changed = sorted(k for k in set(saved) | set(now) if k != "train" and saved.get(k) != now.get(k))
        if changed:
            raise seg_training.ConfigError(f"checkpoint {path} was written with a different config (sections "
                                           f"{changed} differ); resume with the run's own config")
    modules = _trainer_modules(trainer)
    student = modules["student"]
    owners = {n: p for n, p in student.named_parameters() if p.requires_grad}
    owners.update(dict(student.named_buffers()))
    if set(owners) != set(payload["student"]):
        missing, extra = sorted(set(owners) - set(payload["student"])), sorted(set(payload["student"]) - set(owners))
        raise seg_training.ConfigError(f"checkpoint {path} does not match this model (missing {missing[:5]}, "
                                       f"unexpected {extra[:5]})")
    with torch.no_grad():
        for name, tensor in payload["student"].items():
            owners[name].copy_(tensor)
    if payload["teacher"] is not None and "teacher" in modules:
        modules["teacher"].load_state_dict(payload["teacher"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    if payload["scheduler"] is not None and trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(payload["scheduler"])
    if payload["generator"] is not None:
        trainer.generator.set_state(payload["generator"])
    trainer.iteration = int(payload["iteration"])
    seg_training.restore_random_state(payload["rng"])
    return int(payload["step"])


def train_adaptation(config: str | os.PathLike | Mapping[str, Any], iterations: int | None = None,
                     log: Callable[[str], None] | None = print, device: str | None = None,
                     overwrite: bool = False, resume: bool = False, stop_after: int | None = None,
                     progress: bool = True,
                     overrides: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Runs a DACS or self-training config; returns ``{"step", "loss", "results", "output_dir", "model", "trainer"}``.

    Saves the student at the end (``save_segmentor`` layout for a ViT segmentor, the
    decode head as ``decoder.safetensors`` + ``config.json`` otherwise) and evaluates on
    ``data.val`` with the config's protocol.

    Args:
        config: Path or dict (see the module docstring).
        iterations: Override ``train.iterations`` (e.g. a smoke run).
        log: Called with log lines (``None``: silent).
        device: Default CUDA when available.
        overwrite: Replace a run already in ``train.output_dir``; without it such a
            directory is refused, so an earlier run is never silently replaced.
        resume: Continue from ``output_dir/checkpoint.pt`` (written every
            ``train.checkpoint_interval`` steps and when stopping): student, teacher,
            optimiser, scheduler, the trainer's generator, the global RNGs and the data
            stream positions are restored, so the resumed run is bit-identical to an
            uninterrupted one.
        stop_after: Stop (after checkpointing) once this many steps ran in this call.
        progress: Show a tqdm progress bar.
        overrides: ``key=value`` strings (``"optim.lr=6e-5"``) or a ``{dotted key: value}``
            mapping applied before the config is validated (``iterations`` comes after them).
    """
    config = load_adaptation_config(config, [*seg_config.parse_overrides(overrides),
                                             *([("train.iterations", iterations)] if iterations is not None else [])])
    tc, dc, mc = config["train"], config["data"], config["model"]
    output_dir = Path(tc["output_dir"])
    # the same guard as train and demo; the old run is moved aside only once the new one is ready to start
    check_run_dir(output_dir, resume=resume, overwrite=overwrite, error=seg_training.ConfigError)
    say = log or (lambda _: None)
    from tqdm.auto import tqdm

    seed = int(tc["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = config["recipe"]
    if not dc["source"]:
        raise seg_training.ConfigError("data.source is empty: list the labelled source dataset(s)")
    unlabelled_key = {"dacs": "target", "self_training": "unlabelled"}.get(recipe)
    if unlabelled_key and not dc[unlabelled_key]:
        raise seg_training.ConfigError(f"data.{unlabelled_key} is empty: the {recipe} recipe needs it")

    model = build_model(mc).to(device)
    trainer = build_trainer(config, model)
    total, batch, workers = int(tc["iterations"]), int(tc["batch_size"]), int(dc["num_workers"])
    checkpoint_path = output_dir / CHECKPOINT_NAME
    start = 0
    if resume and checkpoint_path.is_file():
        start = load_adaptation_checkpoint(checkpoint_path, trainer, config)
        say(f"resumed from {checkpoint_path} at step {start}/{total}")
    elif resume:
        say(f"no checkpoint at {checkpoint_path}; starting from scratch")
    end = total if stop_after is None else min(total, start + int(stop_after))
    count = (end - start) * batch
    crop = tuple(dc["crop_size"])
    ratio = tuple(dc["ratio_range"]) if dc["ratio_range"] is not None else None

    def transform(scale, with_flip=True, photometric=None, fixed=False):
        return adaptation_transform(crop, tuple(scale) if scale else None, None if fixed else ratio,
                                    dc["cat_max_ratio"], dc["flip"] if with_flip else 0.0,
                                    dc["photometric"] if photometric is None else photometric, mc["mean"], mc["std"])

    mixed = recipe == "self_training" and trainer.config.batch_mode == "mixed"
    rcs = dc["rare_class_sampling"]
    if mixed:  # CLOUDS: one stream of source (rescale, crop, ColorAugSSD, flip) and generated (flip only)
        sources = [_build_source(spec) for spec in dc["source"]]
        generated = [_build_source(spec) for spec in dc["unlabelled"]]
        source_t = transform(dc["scale"], photometric=True)
        generated_t = Compose([RandomCrop(crop), RandomFlip(dc["flip"]), Normalize(mc["mean"], mc["std"])])
        factor = float(trainer.config.generated_repeat_factor)
        stream = MixedStream(sources + generated, [source_t] * len(sources) + [generated_t] * len(generated), seed,
                             [False] * len(sources) + [True] * len(generated))
        weights = [float(len(d)) for d in sources] + [factor * len(d) for d in generated]
        sampler = StreamSampler([len(d) for d in sources + generated], weights, seed=seed, start=start * batch,
                                length=count)
        source = iter(DataLoader(stream, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=_collate,
                                 generator=_loader_generator(seed)))
        target = None
    elif rcs:
        unknown = sorted(set(rcs) - {"temperature", "min_pixels", "min_crop_ratio", "cache"})
        if unknown:
            raise seg_training.ConfigError(f"unknown rare_class_sampling key(s) {unknown}; accepted: "
                                           "['cache', 'min_crop_ratio', 'min_pixels', 'temperature']")
        if len(dc["source"]) != 1:
            raise seg_training.ConfigError("rare-class sampling needs exactly one source dataset")
        source_data = _build_source(dc["source"][0])
        counts = class_pixel_counts(source_data, int(mc["num_classes"]), rcs.get("cache"))
        min_pixels = int(rcs.get("min_pixels", 3000))
        sampler = RareClassPositions(RareClassSampler(counts, float(rcs.get("temperature", 0.01)), min_pixels,
                                                      count, seed), start=start * batch)
        crops = RareClassCrops(source_data, transform(dc["scale"]), seed, min_pixels,
                               float(rcs.get("min_crop_ratio", 0.5)))
        source = iter(DataLoader(crops, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=_collate,
                                 generator=_loader_generator(seed)))
    else:
        source = iter(_loader(dc["source"], transform(dc["scale"]), batch, seed, count, workers, start=start * batch))
    if unlabelled_key and not mixed:
        target = iter(_loader(dc[unlabelled_key], transform(dc["target_scale"]), batch, seed + 1, count, workers,
                              start=start * batch))

    replaced = prepare_run_dir(output_dir, resume=resume, overwrite=overwrite, error=seg_training.ConfigError)
    truncate_log(output_dir / "log.jsonl", start)  # a new run starts a new log; a resumed one keeps steps <= start
    write_atomically(output_dir / "config.json",
                     lambda path: Path(path).write_text(json.dumps(config, indent=2, default=str) + "\n"))
    started, out = time.perf_counter(), {"loss": float("nan")}
    interval = int(tc["checkpoint_interval"])
    bar = tqdm(total=total, initial=start, desc=recipe, disable=not progress, dynamic_ncols=True)
    for step in range(start, end):
        src = next(source)
        if mixed:
            out = trainer.step_mixed(src["image"].to(device), src["label"].to(device), src["generated"].to(device))
        elif recipe == "source_only":
            out = trainer.step(src["image"].to(device), src["label"].to(device))
        else:
            tgt = next(target)
            out = trainer.step(src["image"].to(device), src["label"].to(device), tgt["image"].to(device))
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.3f}")
        if done % max(int(tc["log_interval"]), 1) == 0 or done == end:
            entry = {k: v for k, v in out.items() if isinstance(v, (float, int, bool))}
            entry.update(step=done, seconds=round(time.perf_counter() - started, 2))
            with open(output_dir / "log.jsonl", "a") as stream_file:
                stream_file.write(json.dumps(entry) + "\n")
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        if (interval > 0 and done % interval == 0) or done == end:
            save_adaptation_checkpoint(checkpoint_path, trainer, done, config)
    bar.close()
    if end < total:  # stopped early: the checkpoint holds everything; --resume continues
        return {"step": end, "loss": out["loss"], "results": {}, "output_dir": str(output_dir), "model": model,
                "trainer": trainer}

    if mc["kind"] == "vit":
        seg_training.save_segmentor(model, output_dir, {k: v for k, v in mc.items() if k in seg_training.DEFAULTS["model"]},
                                    extra={"recipe": config["recipe"]})
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()}
        write_atomically(output_dir / "decoder.safetensors", lambda path: save_file(state, path))
    results = {}
    if dc["val"]:
        model.eval()
        results = seg_training.evaluate_sets(model, config, seg_training.build_val_sets(config))
        write_atomically(output_dir / "results.json",
                         lambda path: Path(path).write_text(json.dumps(results, indent=2) + "\n"))
        say(json.dumps({k: round(v["mIoU"], 2) for k, v in results.items()}))
    discard_replaced(replaced)
    return {"step": total, "loss": out["loss"], "results": results, "output_dir": str(output_dir),
            "model": model, "trainer": trainer}
