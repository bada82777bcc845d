"""Config-driven DACS and self-training runs (``vfm-adapters adapt CONFIG``).

The config and its reference are in :mod:`vfm_adapters.adaptation.config`; the data
streams in :mod:`~vfm_adapters.adaptation.loaders`; the resumable state in
:mod:`~vfm_adapters.adaptation.checkpoints`. This module builds the model and the
recipe's trainer and runs the steps through :func:`vfm_adapters.seg.loop.run_steps`,
the loop ``train`` uses too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .._io import write_atomically
from ..seg.build import build_segmentor, segmentor_class
from ..seg.checkpoints import save_segmentor
from ..seg.config import DEFAULTS as SEG_DEFAULTS
from ..seg.config import ConfigError, parse_overrides
from ..seg.label_checks import check_label_range
from ..seg.loop import StepSchedule, append_log, elapsed_since, open_run, run_steps, seed_everything
from ..seg.run_dir import check_run_dir, discard_replaced
from ..seg.training import build_val_sets, evaluate_sets
from .checkpoints import CHECKPOINT_NAME, load_adaptation_checkpoint, save_adaptation_checkpoint
from .config import DEFAULTS, load_adaptation_config
from .dacs import DACSConfig, DACSTrainer, warmup_poly_lambda
from .loaders import UNLABELLED_DATA, adaptation_transform, mixes_batches, training_streams
from .feature_model import DecodeHead, FeatureSegmentor, SourceTrainer, TimmFeatureEncoder
from .self_training import SelfTrainer, SelfTrainingConfig

__all__ = ["CHECKPOINT_NAME", "DEFAULTS", "adaptation_transform", "build_model", "build_trainer",
           "load_adaptation_checkpoint", "load_adaptation_config", "save_adaptation_checkpoint", "train_adaptation"]


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
        vit_keys = set(SEG_DEFAULTS["model"])
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


def train_adaptation(config: str | os.PathLike | Mapping[str, Any], iterations: int | None = None,
                     log: Callable[[str], None] | None = print, device: str | None = None,
                     overwrite: bool = False, resume: bool = False, stop_after: int | None = None,
                     progress: bool = True,
                     overrides: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Runs a DACS or self-training config; returns ``{"step", "loss", "results", "output_dir", "model", "trainer"}``.

    Saves the student at the end (``save_segmentor`` layout for a ViT segmentor, the
    decode head as ``decoder.safetensors`` + ``config.json`` otherwise) and evaluates on
    ``data.val`` with the config's protocol. A non-finite loss stops the run with
    :class:`~vfm_adapters.seg.loop.TrainingDivergedError` before a checkpoint holds it.

    Args:
        config: Path or dict (see :mod:`vfm_adapters.adaptation.config`).
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
    config = load_adaptation_config(config, [*parse_overrides(overrides),
                                             *([("train.iterations", iterations)] if iterations is not None else [])])
    tc = config["train"]
    output_dir = Path(tc["output_dir"])
    # the same guard as train and demo; the old run is moved aside only once the new one is ready to start
    check_run_dir(output_dir, resume=resume, overwrite=overwrite, error=ConfigError)
    say = log or (lambda _: None)
    seed_everything(int(tc["seed"]))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_data(config)
    model = build_model(config["model"]).to(device)
    trainer = build_trainer(config, model)
    schedule = _schedule(config, output_dir, stop_after, trainer, resume, say)
    source, target = training_streams(config, schedule.start, schedule.end)
    replaced, _ = open_run(output_dir, config, resume=resume, overwrite=overwrite, start=schedule.start)
    started = time.perf_counter()

    def write_log(done: int, outputs) -> None:
        entry = {**outputs[-1], "step": done, "seconds": elapsed_since(started)}
        append_log(output_dir, entry)
        say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    out = run_steps(schedule, _step_function(config, trainer, source, target, device), log=write_log,
                    save=lambda done: save_adaptation_checkpoint(schedule.checkpoint_path, trainer, done, config),
                    desc=config["recipe"], progress=progress)
    summary = {"loss": out["loss"], "output_dir": str(output_dir), "model": model, "trainer": trainer}
    if schedule.end < schedule.total:  # stopped early: the checkpoint holds everything; --resume continues
        return {"step": schedule.end, "results": {}, **summary}
    results = _finish(config, model, output_dir, say)
    discard_replaced(replaced)
    return {"step": schedule.total, "results": results, **summary}


def _check_data(config: Mapping[str, Any]) -> None:
    dc, recipe = config["data"], config["recipe"]
    if not dc["source"]:
        raise ConfigError("data.source is empty: list the labelled source dataset(s)")
    key = UNLABELLED_DATA.get(recipe)
    if key and not dc[key]:
        raise ConfigError(f"data.{key} is empty: the {recipe} recipe needs it")


def _schedule(config: Mapping[str, Any], output_dir: Path, stop_after: int | None, trainer: Any, resume: bool,
              say: Callable[[str], None]) -> StepSchedule:
    """The steps of this call, after restoring ``checkpoint.pt`` when resuming."""
    tc = config["train"]
    total, path, start = int(tc["iterations"]), output_dir / CHECKPOINT_NAME, 0
    if resume and path.is_file():
        start = load_adaptation_checkpoint(path, trainer, config)
        say(f"resumed from {path} at step {start}/{total}")
    elif resume:
        say(f"no checkpoint at {path}; starting from scratch")
    end = total if stop_after is None else min(total, start + int(stop_after))
    return StepSchedule(start, end, total, int(tc["log_interval"]), int(tc["checkpoint_interval"]), path)


def _step_function(config: Mapping[str, Any], trainer: Any, source, target, device: str) -> Callable[[int], dict]:
    """One trainer step on the next batches; returns its numbers (no tensors: they are kept until the next log)."""
    mixed, recipe, num_classes = mixes_batches(config), config["recipe"], int(config["model"]["num_classes"])

    def step(_: int) -> dict[str, Any]:
        src = next(source)
        check_label_range(src["label"], num_classes, src["path"])  # on the loader's CPU tensor: no device sync
        images, labels = src["image"].to(device), src["label"].to(device)
        if mixed:
            out = trainer.step_mixed(images, labels, src["generated"].to(device))
        elif recipe == "source_only":
            out = trainer.step(images, labels)
        else:
            out = trainer.step(images, labels, next(target)["image"].to(device))
        return {k: v for k, v in out.items() if isinstance(v, (float, int, bool))}

    return step


def _finish(config: Mapping[str, Any], model: nn.Module, output_dir: Path, say: Callable[[str], None]) -> dict:
    """Saves the student (segmentor layout for ``kind: vit``, the decode head otherwise) and evaluates it."""
    mc = config["model"]
    if mc["kind"] == "vit":
        save_segmentor(model, output_dir, {k: v for k, v in mc.items() if k in SEG_DEFAULTS["model"]},
                       extra={"recipe": config["recipe"]})
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()}
        write_atomically(output_dir / "decoder.safetensors", lambda path: save_file(state, path))
    if not config["data"]["val"]:
        return {}
    model.eval()
    results = evaluate_sets(model, config, build_val_sets(config))
    write_atomically(output_dir / "results.json", lambda path: Path(path).write_text(json.dumps(results, indent=2) + "\n"))
    say(json.dumps({k: round(v["mIoU"], 2) for k, v in results.items()}))
    return results
