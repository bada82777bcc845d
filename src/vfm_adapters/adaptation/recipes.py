"""Config-driven DACS and self-training runs (``python -m vfm_adapters.adaptation CONFIG``).

A config is YAML/JSON with the sections below; every key is optional except the data.
``model`` accepts every key of :data:`vfm_adapters.seg.training.DEFAULTS` ``["model"]``
(``kind: vit``: a timm ViT host, adapters, neck and a light head, built by
:func:`vfm_adapters.seg.training.build_segmentor`) plus the keys of a ``kind: features``
model (a timm ``features_only`` encoder such as CLIP ConvNeXt-L + a decode head)::

    recipe: dacs                          # dacs | self_training
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
      ratio_range: [0.5, 2.0]
      rare_class_sampling: {temperature: 0.01, min_pixels: 3000, cache: null}   # or null
    optim: {lr: 6.0e-4, backbone_lr_mult: 0.1, weight_decay: 0.01, warmup_iters: 1500, poly_power: 1.0}
    train: {iterations: 40000, batch_size: 2, seed: 0, output_dir: runs/dacs}
    dacs: {ema_alpha: 0.999, ...}          # DACSConfig fields
    self_training: {ema_interval: 100, ...}  # SelfTrainingConfig fields
    sam: {model: null, refine: {min_component_pixels: 5000}}   # a SamModel path/hub id enables refinement
    eval: {mode: slide, crop: 512, stride: 341}
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .._io import write_atomically
from ..seg import training as seg_training
from ..seg.datasets import build_dataset
from ..seg.heads import HEADS, Segmentor
from ..seg.run_dir import check_run_dir, discard_replaced, prepare_run_dir
from ..seg.sampling import AugmentedStream, StreamSampler
from ..seg.transforms import train_transform
from .dacs import DACSConfig, DACSTrainer, RareClassSampler, class_pixel_counts, warmup_poly_lambda
from .self_training import (
    CLIP_CONVNEXT_L,
    DecodeHead,
    FeatureSegmentor,
    SelfTrainer,
    SelfTrainingConfig,
    TimmFeatureEncoder,
    UnlabelledFolder,
)

__all__ = ["DEFAULTS", "build_model", "build_trainer", "load_adaptation_config", "train_adaptation"]

RECIPES = ("dacs", "self_training")

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
        "warmup_iters": 0, "warmup_ratio": 1e-6, "grad_clip": None,
    },
    "train": {"iterations": 40000, "batch_size": 2, "seed": 0, "log_interval": 50, "output_dir": "runs/adaptation"},
    "dacs": {},
    "self_training": {},
    "sam": {"model": None, "refine": {}},
    "eval": copy.deepcopy(seg_training.DEFAULTS["eval"]),
}


def load_adaptation_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Reads a YAML/JSON adaptation config (or a dict), fills defaults, refuses unknown keys.

    Example:
        >>> cfg = load_adaptation_config({"recipe": "dacs", "dacs": {"ema_alpha": 0.999}})
        >>> cfg["dacs"]["ema_alpha"], cfg["model"]["kind"], cfg["optim"]["poly_power"]
        (0.999, 'vit', 1.0)
    """
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        text = path.read_text()
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    config = copy.deepcopy(DEFAULTS)
    for section, values in raw.items():
        if section not in config:
            raise seg_training.ConfigError(f"unknown config section {section!r}; sections: {sorted(config)}")
        if section == "recipe":
            config["recipe"] = values
            continue
        if not isinstance(values, Mapping):
            raise seg_training.ConfigError(f"config section {section!r} must be a mapping")
        if section in ("dacs", "self_training"):
            config[section].update(values)
            continue
        unknown = sorted(set(values) - set(config[section]))
        if unknown:
            raise seg_training.ConfigError(
                f"unknown key(s) {unknown} in section {section!r}; accepted: {sorted(config[section])}")
        config[section].update(copy.deepcopy(dict(values)))
    if config["recipe"] not in RECIPES:
        raise seg_training.ConfigError(f"recipe must be one of {RECIPES}, got {config['recipe']!r}")
    if config["model"]["kind"] not in ("vit", "features"):
        raise seg_training.ConfigError(f"model.kind must be 'vit' or 'features', got {config['model']['kind']!r}")
    DACSConfig.from_dict(config["dacs"])  # validate early
    SelfTrainingConfig.from_dict(config["self_training"])
    return config


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
    """The segmentor of a config's ``model`` section (works under ``torch.device("meta")``).

    Example:
        >>> m = build_model({**DEFAULTS["model"], "kind": "features", "encoder": "convnext_atto",
        ...                  "num_classes": 3, "head_channels": 8})
        >>> type(m).__name__, m(torch.randn(2, 3, 64, 64)).shape
        ('FeatureSegmentor', torch.Size([2, 3, 64, 64]))
    """
    cfg = {**DEFAULTS["model"], **dict(model_config)}
    if cfg["kind"] == "vit":
        vit_keys = set(seg_training.DEFAULTS["model"])
        model = seg_training.build_segmentor({k: v for k, v in cfg.items() if k in vit_keys})
        return model
    encoder = TimmFeatureEncoder(cfg["encoder"], pretrained=bool(cfg["pretrained"]), out_indices=cfg["out_indices"],
                                 frozen=bool(cfg["freeze_encoder"]), **dict(cfg["encoder_kwargs"] or {}))
    num_classes = int(cfg["num_classes"])
    if cfg["head"] == "mask2former":
        from ..seg.mask2former import Mask2FormerHead

        head = Mask2FormerHead(num_classes, encoder.channels, **dict(cfg["head_options"] or {}))
    elif cfg["head"] in HEADS:
        head = HEADS[cfg["head"]](encoder.channels, num_classes, int(cfg["head_channels"]), float(cfg["dropout"]))
    else:
        raise seg_training.ConfigError(f"unknown head {cfg['head']!r}; available: {sorted(HEADS) + ['mask2former']}")
    model = FeatureSegmentor(encoder, DecodeHead(head))
    if cfg["decoder_checkpoint"]:  # e.g. the decode head of a source-only stage 1
        from safetensors.torch import load_file

        model.decoder.load_state_dict(load_file(str(cfg["decoder_checkpoint"])))
    model.mean, model.std = tuple(cfg["mean"]), tuple(cfg["std"])
    return model


def _parameter_groups(model: nn.Module, optim: Mapping[str, Any]) -> list[dict]:
    if isinstance(model, Segmentor):
        groups = seg_training.parameter_groups(model, optim["lr"], optim["weight_decay"], optim["backbone_lr_mult"])
        return [{k: v for k, v in g.items() if k != "names"} for g in groups]
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if seg_training.no_weight_decay(name, param) else decay).append(param)
    return [g for g in ({"params": decay, "weight_decay": optim["weight_decay"]},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def build_trainer(config: Mapping[str, Any], model: nn.Module | None = None) -> DACSTrainer | SelfTrainer:
    """Model (unless given), AdamW, warm-up + poly schedule and the recipe's trainer.

    Example:
        >>> cfg = load_adaptation_config({"model": {"kind": "features", "encoder": "convnext_atto",
        ...     "num_classes": 3, "head": "linear"}, "recipe": "self_training"})
        >>> type(build_trainer(cfg)).__name__
        'SelfTrainer'
    """
    model = build_model(config["model"]) if model is None else model
    oc, mc = config["optim"], config["model"]
    optimizer = torch.optim.AdamW(_parameter_groups(model, oc), lr=oc["lr"], betas=tuple(oc["betas"]),
                                  weight_decay=oc["weight_decay"])
    schedule = warmup_poly_lambda(int(config["train"]["iterations"]), int(oc["warmup_iters"]), float(oc["warmup_ratio"]),
                                  float(oc["poly_power"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    norm = {"mean": tuple(mc["mean"]), "std": tuple(mc["std"]), "seed": int(config["train"]["seed"])}
    if config["recipe"] == "dacs":
        return DACSTrainer(model, optimizer, DACSConfig.from_dict({**norm, **config["dacs"]}), scheduler)
    refiner = None
    if config["sam"].get("model"):
        from transformers import SamModel

        from .sam_refine import SamRefiner

        refiner = SamRefiner(SamModel.from_pretrained(config["sam"]["model"]), config["sam"].get("refine") or {})
    return SelfTrainer(model, optimizer, SelfTrainingConfig.from_dict({**norm, **config["self_training"]}), refiner,
                       scheduler, oc["grad_clip"])


class _Positions(Sampler):
    """``(position, index)`` pairs from a plain index iterator (for :class:`AugmentedStream`)."""

    def __init__(self, indices: Sampler, start: int = 0) -> None:
        self.indices, self.start = indices, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for k, index in enumerate(self.indices):
            yield self.start + k, int(index)

    def __len__(self) -> int:
        return len(self.indices)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"image": torch.stack([s["image"] for s in samples])}
    if all("label" in s for s in samples):
        out["label"] = torch.stack([s["label"] for s in samples])
    return out


def _build_source(spec: Mapping[str, Any]):
    if str(spec.get("type", "")).lower() == "unlabelled":
        return UnlabelledFolder(spec["root"], recursive=bool(spec.get("recursive", True)))
    return build_dataset(spec)


def _loader(specs, transform, batch: int, seed: int, length: int, workers: int, sampler: Sampler | None = None):
    sources = [_build_source(spec) for spec in specs]
    if sampler is None:
        weights = [float(spec.get("weight", 1.0)) for spec in specs]
        sampler = StreamSampler([len(s) for s in sources], weights, seed=seed, length=length)
    return DataLoader(AugmentedStream(sources, transform, seed), batch_size=batch, sampler=sampler,
                      num_workers=workers, collate_fn=_collate)


def train_adaptation(config: str | os.PathLike | Mapping[str, Any], iterations: int | None = None,
                     log: Callable[[str], None] | None = print, device: str | None = None,
                     overwrite: bool = False) -> dict[str, Any]:
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
    """
    config = load_adaptation_config(config)
    if iterations is not None:
        config["train"]["iterations"] = int(iterations)
    tc, dc, mc = config["train"], config["data"], config["model"]
    output_dir = Path(tc["output_dir"])
    # the same guard as train and demo; the old run is moved aside only once the new one is ready to start
    check_run_dir(output_dir, overwrite=overwrite, resumable=False, error=seg_training.ConfigError)
    say = log or (lambda _: None)
    seed = int(tc["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not dc["source"]:
        raise seg_training.ConfigError("data.source is empty: list the labelled source dataset(s)")
    unlabelled_key = "target" if config["recipe"] == "dacs" else "unlabelled"
    if not dc[unlabelled_key]:
        raise seg_training.ConfigError(f"data.{unlabelled_key} is empty: the {config['recipe']} recipe needs it")

    model = build_model(mc).to(device)
    trainer = build_trainer(config, model)
    total, batch, workers = int(tc["iterations"]), int(tc["batch_size"]), int(dc["num_workers"])
    crop, ratio = tuple(dc["crop_size"]), tuple(dc["ratio_range"])

    def transform(scale, with_flip=True):
        return train_transform(crop, tuple(scale) if scale else None, ratio, dc["cat_max_ratio"],
                               dc["flip"] if with_flip else 0.0, dc["photometric"], mc["mean"], mc["std"])

    sampler = None
    rcs = dc["rare_class_sampling"]
    if rcs:
        if len(dc["source"]) != 1:
            raise seg_training.ConfigError("rare-class sampling needs exactly one source dataset")
        counts = class_pixel_counts(build_dataset(dc["source"][0]), int(mc["num_classes"]), rcs.get("cache"))
        sampler = _Positions(RareClassSampler(counts, float(rcs.get("temperature", 0.01)),
                                              int(rcs.get("min_pixels", 3000)), total * batch, seed))
    source = iter(_loader(dc["source"], transform(dc["scale"]), batch, seed, total * batch, workers, sampler))
    target = iter(_loader(dc[unlabelled_key], transform(dc["target_scale"]), batch, seed + 1, total * batch, workers))

    replaced = prepare_run_dir(output_dir, overwrite=overwrite, resumable=False, error=seg_training.ConfigError)
    write_atomically(output_dir / "config.json",
                     lambda path: Path(path).write_text(json.dumps(config, indent=2, default=str) + "\n"))
    started, out = time.perf_counter(), {"loss": float("nan")}
    for step in range(total):
        src, tgt = next(source), next(target)
        out = trainer.step(src["image"].to(device), src["label"].to(device), tgt["image"].to(device))
        if (step + 1) % max(int(tc["log_interval"]), 1) == 0 or step + 1 == total:
            entry = {k: v for k, v in out.items() if isinstance(v, (float, int, bool))}
            entry.update(step=step + 1, seconds=round(time.perf_counter() - started, 2))
            with open(output_dir / "log.jsonl", "a") as stream:
                stream.write(json.dumps(entry) + "\n")
            say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    if isinstance(model, Segmentor):
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
