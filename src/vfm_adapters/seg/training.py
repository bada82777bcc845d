"""The training loop of ``vfm-adapters train``: a segmentor from a config, resumable exactly.

``train(config)`` builds host + adapters + neck + head (:mod:`~vfm_adapters.seg.build`),
trains adapters + neck + head with AdamW and the configured schedule
(:mod:`~vfm_adapters.seg.optim`) through ``accelerate.Accelerator`` (so ``accelerate
launch`` gives multi-GPU data parallelism and ``mixed_precision`` bf16 autocast on CUDA),
and saves only what was trained (:mod:`~vfm_adapters.seg.checkpoints`). The config and its
reference are in :mod:`vfm_adapters.seg.config`; the loop itself is
:func:`vfm_adapters.seg.loop.run_steps`, shared with ``adapt``.

Exact resumption: ``output_dir/checkpoint.pt`` is written atomically every
``checkpoint_interval`` steps with the trained tensors, the optimiser, the scheduler and
every random generator state. The data stream is a pure function of ``(seed, position)``
(:mod:`vfm_adapters.seg.sampling`), so a resumed run starts the stream at the right
position and, on CPU, reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .._io import write_atomically
from .build import build_segmentor
from .checkpoints import CHECKPOINT_NAME, check_resumed_config, load_checkpoint, save_checkpoint, save_segmentor
from .config import ConfigError, load_config
from .datasets import build_dataset
from .inference import evaluate
from .label_checks import check_dataset_labels, check_label_range
from .loop import (LossNotFinite, StepSchedule, TrainingDivergedError, append_log, elapsed_since, open_run,
                   run_steps, seed_everything)
from .metrics import results_table
from .model import SegmentationModel, train_mode
from .optim import build_scheduler
from .run_dir import check_run_dir, discard_replaced, existing_entries
from .sampling import AugmentedStream, StreamSampler, collate_samples
from .transforms import train_transform

__all__ = ["TrainingDivergedError", "build_val_sets", "evaluate_sets", "make_accelerator", "train"]


def _mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(train_config: Mapping[str, Any]):
    """The run's ``accelerate.Accelerator``: precision, trackers (``log_with``) and DDP options.

    ``find_unused_parameters`` is for models with trainable parameters that get no gradient
    in a step (Rein's query link under a light head, if a config enables it); DDP otherwise
    stops with an error on the first backward pass.

    Example:
        >>> acc = make_accelerator({"mixed_precision": "no", "output_dir": "/tmp/x", "log_with": None,
        ...                         "find_unused_parameters": False})
        >>> acc.mixed_precision
        'no'
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    log_with = train_config.get("log_with")
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(train_config["mixed_precision"]),
        log_with=log_with,
        project_dir=str(train_config["output_dir"]) if log_with else None,
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=bool(train_config.get("find_unused_parameters", False)))],
    )
    if log_with:
        requested = [log_with] if isinstance(log_with, str) else list(log_with)
        accelerator.init_trackers("vfm-adapters", config={k: v for k, v in train_config.items()
                                                          if isinstance(v, (int, float, str, bool))})
        started = {tracker.name for tracker in accelerator.trackers}
        missing = [name for name in requested if name != "all" and name not in started]
        if missing or not started:
            raise ConfigError(
                f"train.log_with: tracker(s) {missing or requested} could not start (not installed?); install them, e.g. "
                "pip install 'vfm-adapters[tensorboard]' for tensorboard, or remove train.log_with"
            )
    return accelerator


def build_val_sets(config: Mapping[str, Any]) -> dict[str, tuple[Any, dict]]:
    """``{name: (dataset, per-dataset eval options)}`` from ``data.val``."""
    sets = {}
    for i, spec in enumerate(config["data"]["val"]):
        name = spec.get("name") or f"{spec.get('type')}{'' if i == 0 else i}"
        options = {"resize": tuple(spec["resize"])} if spec.get("resize") else {}
        if spec.get("scale"):  # keep-ratio into (long, short), e.g. half-size Mapillary into (1024, 512)
            options["scale"] = tuple(spec["scale"])
        sets[name] = (build_dataset(spec), options)
        check_dataset_labels(sets[name][0], int(config["model"]["num_classes"]), f"validation set {name}")
    return sets


def evaluate_sets(model: SegmentationModel, config: Mapping[str, Any], sets: Mapping[str, tuple[Any, dict]],
                  progress: bool = False) -> dict[str, dict]:
    """Evaluates on every validation set with the config's protocol and the model's own normalisation."""
    ev = config["eval"]
    results = {}
    for name, (dataset, options) in sets.items():
        results[name] = evaluate(model, dataset, int(model.num_classes), mode=ev["mode"], crop=int(ev["crop"]),
                                 stride=int(ev["stride"]), mean=model.mean, std=model.std,
                                 limit=ev.get("limit"), progress=progress, **options)
    return results


@dataclass
class _Run:
    """What one call of :func:`train` works with (built by :func:`_start`)."""

    config: dict[str, Any]
    accelerator: Any
    model: nn.Module  # possibly wrapped (DDP)
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: StepSchedule
    elapsed: float
    say: Callable[[str], None]

    @property
    def output_dir(self) -> Path:
        return Path(self.config["train"]["output_dir"])


def train(config: str | os.PathLike | Mapping[str, Any], resume: bool = False, stop_after: int | None = None,
          progress: bool = True, log: Callable[[str], None] | None = None, evaluate_at_end: bool = True,
          overwrite: bool = False, overrides: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Trains a segmentor from a config; returns ``{"step", "loss", "results", "output_dir", "seconds"}``.

    Args:
        config: Path to a YAML/JSON config, or a dict (see :mod:`vfm_adapters.seg.config`).
        resume: Continue from ``output_dir/checkpoint.pt`` if it exists.
        stop_after: Stop (after checkpointing) once this many steps ran in this call,
            e.g. to split a run into time-boxed jobs; the run continues with ``resume``.
        progress: Show a tqdm progress bar.
        log: Called with log lines (default: ``print`` on the main process).
        evaluate_at_end: Evaluate on ``data.val`` when training finishes.
        overwrite: Start from scratch even if ``output_dir`` already holds a run. Without
            it (and without ``resume``) such a directory is refused, so an earlier run's
            checkpoint and weights are never silently replaced.
        overrides: ``key=value`` strings (``"optim.lr=2e-4"``) or a ``{dotted key: value}``
            mapping applied to the config before it is validated (:func:`~vfm_adapters.seg.config.load_config`).
    """
    config = load_config(config, overrides)
    output_dir = Path(config["train"]["output_dir"])
    # refuse early; the old run is moved aside (overwrite) only once everything else checked out
    check_run_dir(output_dir, resume=resume, overwrite=overwrite, error=ConfigError)
    accelerator = make_accelerator(config["train"])
    if not config["data"]["train"]:
        raise ConfigError("data.train is empty: list at least one training dataset")
    run = _start(config, accelerator, resume, stop_after, log or accelerator.print)
    batches, accum = _train_batches(run)
    val_sets = build_val_sets(config) if accelerator.is_main_process and config["data"]["val"] else {}
    replaced = None
    if accelerator.is_main_process:  # only now, with the checkpoint loaded and the data checked
        replaced, logged = open_run(output_dir, config, resume=resume, overwrite=overwrite, start=run.schedule.start)
        if replaced is not None:
            run.say(f"the previous run in {output_dir} was moved to {replaced}; it is removed when this run ends")
        run.elapsed = logged if run.elapsed < 0 else run.elapsed  # checkpoints of older versions hold no time
    run.elapsed = max(run.elapsed, 0.0)
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    out = _loop(run, batches, accum, val_sets, started, progress)
    results = _finish(run, val_sets, evaluate_at_end, progress)
    if accelerator.is_main_process:
        discard_replaced(replaced)
    accelerator.end_training()
    schedule = run.schedule
    return {"step": schedule.end if schedule.start < schedule.end else schedule.start, "loss": float(out["loss"]),
            "results": results, "output_dir": str(output_dir), "seconds": time.perf_counter() - started,
            "finished": schedule.end == schedule.total, "model": run.raw_model}


def _start(config: dict[str, Any], accelerator: Any, resume: bool, stop_after: int | None,
           say: Callable[[str], None]) -> _Run:
    """Seeds, builds model, optimiser and schedule, restores a checkpoint, and wraps them for Accelerate."""
    tc, oc = config["train"], config["optim"]
    seed_everything(int(tc["seed"]))
    model = build_segmentor(config["model"])
    groups = model.parameter_groups(oc["lr"], oc["weight_decay"], oc["backbone_lr_mult"], oc["no_decay"])
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=oc["lr"], betas=tuple(oc["betas"]))
    total = int(tc["iterations"])
    scheduler = build_scheduler(optimizer, oc, total)
    output_dir = Path(tc["output_dir"])
    start, elapsed = _resume(output_dir / CHECKPOINT_NAME, config, model, optimizer, scheduler, resume, say)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    end = total if stop_after is None else min(total, start + int(stop_after))
    schedule = StepSchedule(start, end, total, int(tc["log_interval"]), int(tc["checkpoint_interval"]),
                            output_dir / CHECKPOINT_NAME)
    return _Run(config, accelerator, wrapped, accelerator.unwrap_model(wrapped), optimizer, scheduler, schedule,
                elapsed, say)


def _resume(path: Path, config: Mapping[str, Any], model: nn.Module, optimizer, scheduler, resume: bool,
            say: Callable[[str], None]) -> tuple[int, float]:
    """``(start step, training seconds so far)``: ``(0, 0.0)`` for a new run; -1 seconds: unknown."""
    total = int(config["train"]["iterations"])
    if resume and path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        check_resumed_config(payload.get("config"), config, path)
        start = load_checkpoint(path, model, optimizer, scheduler, payload=payload)
        say(f"resumed from {path} at step {start}/{total}")
        return start, float(payload.get("seconds", -1.0))
    if resume:
        finished = [name for name in existing_entries(path.parent) if name not in ("config.json", "log.jsonl")]
        if finished:  # nothing to resume from, but a run's outputs that starting over would replace
            raise ConfigError(f"cannot resume {path.parent}: it has no {CHECKPOINT_NAME} but holds a run "
                              f"({', '.join(finished)}); pass --overwrite (overwrite=True) to start over and replace it")
        say(f"no checkpoint at {path}; starting from scratch")
    return 0, 0.0


def _train_batches(run: _Run) -> tuple[Iterator[dict[str, Any]], int]:
    """The training stream from the run's position, and the gradient accumulation steps."""
    config, accelerator = run.config, run.accelerator
    tc, dc, mc = config["train"], config["data"], config["model"]
    sources = [build_dataset(spec) for spec in dc["train"]]
    for i, source in enumerate(sources):  # a sampled pass: wrong ids fail here, naming a file
        check_dataset_labels(source, int(mc["num_classes"]), f"data.train[{i}] ({dc['train'][i].get('type')})")
    transform = train_transform(tuple(dc["crop_size"]), tuple(dc["scale"]) if dc["scale"] else None,
                                tuple(dc["ratio_range"]), dc["cat_max_ratio"], dc["flip"], dc["photometric"],
                                mc["mean"], mc["std"], resize=dc["resize"], short_sides=dc["short_sides"],
                                max_long_side=dc["max_long_side"])
    batch, accum, world = int(tc["batch_size"]), int(tc["grad_accum"]), accelerator.num_processes
    if tc.get("total_batch_size") is not None:
        from ..optim import resolve_grad_accum

        try:
            accum = resolve_grad_accum(batch, accum, tc["total_batch_size"], world)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    per_step = batch * accum * world
    run.say(f"effective batch {per_step} = {batch} per process x {accum} accumulation step(s) x {world} process(es)")
    seed, schedule = int(tc["seed"]), run.schedule
    sampler = StreamSampler([len(s) for s in sources], [float(spec.get("weight", 1.0)) for spec in dc["train"]],
                            seed=seed, start=schedule.start * per_step, length=(schedule.end - schedule.start) * per_step,
                            rank=accelerator.process_index, world_size=world)
    loader = DataLoader(AugmentedStream(sources, transform, seed), batch_size=batch, sampler=sampler,
                        num_workers=int(dc["num_workers"]), generator=torch.Generator().manual_seed(seed),
                        collate_fn=collate_samples, persistent_workers=False)
    return iter(loader), accum


def _loop(run: _Run, batches: Iterator[dict[str, Any]], accum: int, val_sets: Mapping[str, Any], started: float,
          progress: bool) -> Mapping[str, Any]:
    """Runs the steps with logging, checkpoints and interval evaluations."""
    accelerator, tc = run.accelerator, run.config["train"]

    def log(done: int, outputs) -> None:
        if accelerator.is_main_process:
            entry = {"step": done, "loss": float(np.mean([o["loss"] for o in outputs])),
                     "lr": run.scheduler.get_last_lr()[0], "seconds": elapsed_since(started, run.elapsed)}
            append_log(run.output_dir, entry)  # seconds: cumulative over resumes
            accelerator.log({"train/loss": entry["loss"], "train/lr": entry["lr"]}, step=done)

    def save(done: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(run.schedule.checkpoint_path, run.raw_model, run.optimizer, run.scheduler, done,
                            run.config, seconds=run.elapsed + time.perf_counter() - started)

    def evaluate_now(done: int) -> None:
        interval = int(tc["eval_interval"] or 0)
        if val_sets and interval and done % interval == 0 and done < run.schedule.total:
            results = evaluate_sets(run.raw_model, run.config, val_sets)
            run.say(f"step {done}: " + ", ".join(f"{k} mIoU {v['mIoU']:.1f}" for k, v in results.items()))
            train_mode(run.model)

    train_mode(run.model)
    return run_steps(run.schedule, lambda step: _step(run, batches, accum), log=log, save=save, after=evaluate_now,
                     desc="train", progress=progress and accelerator.is_main_process)


def _step(run: _Run, batches: Iterator[dict[str, Any]], accum: int) -> dict[str, float]:
    """One optimiser step over ``accum`` micro-batches; raises :class:`LossNotFinite` before updating on a bad loss."""
    accelerator, model = run.accelerator, run.model
    num_classes, step_loss = int(run.config["model"]["num_classes"]), 0.0
    for micro in range(accum):
        data = next(batches)
        check_label_range(data["label"], num_classes, data["path"])  # on the loader's CPU tensor: no device sync
        images = data["image"].to(accelerator.device, non_blocking=True)
        labels = data["label"].to(accelerator.device, non_blocking=True)
        with accelerator.no_sync(model) if micro < accum - 1 else nullcontext():
            with accelerator.autocast():  # the model's own loss, inside forward (DDP-safe)
                loss = model(images, labels) / accum
            accelerator.backward(loss)
        step_loss += float(loss.detach())
    _check_finite(accelerator, step_loss)
    grad_clip = run.config["optim"]["grad_clip"]
    if grad_clip:
        accelerator.clip_grad_norm_([p for p in run.raw_model.parameters() if p.requires_grad], grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": step_loss, "lr": run.scheduler.get_last_lr()[0]}


def _check_finite(accelerator: Any, loss: float) -> None:
    """Raises :class:`LossNotFinite` on every process when ``loss`` is not finite on any process."""
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad.item()) != 0.0:
        raise LossNotFinite(loss if not math.isfinite(loss) else float("nan"))


def _finish(run: _Run, val_sets: Mapping[str, Any], evaluate_at_end: bool, progress: bool) -> dict[str, dict]:
    """Saves the segmentor and evaluates it when the run reached its last step."""
    accelerator, schedule = run.accelerator, run.schedule
    results: dict[str, dict] = {}
    accelerator.wait_for_everyone()
    if schedule.end != schedule.total or not accelerator.is_main_process:
        return results
    save_segmentor(run.raw_model, run.output_dir, run.config["model"],
                   {"seed": int(run.config["train"]["seed"]), "step": schedule.end})
    if evaluate_at_end and val_sets:
        results = evaluate_sets(run.raw_model, run.config, val_sets, progress=progress)
        accelerator.log({f"val/{name}/mIoU": r["mIoU"] for name, r in results.items()}, step=schedule.end)
        write_atomically(run.output_dir / "results.json",
                         lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
        run.say(results_table({run.output_dir.name: results}))
    return results


#: Names that lived in this module before the split, and the module that has them now.
_MOVED = {
    **dict.fromkeys(("DEFAULTS", "METHOD_DEFAULTS", "load_config"), "config"),
    **dict.fromkeys(("build_backbone", "build_adapted_backbone", "build_segmentor", "segmentor_class"), "build"),
    **dict.fromkeys(("no_weight_decay", "parameter_groups", "poly_factor", "build_scheduler"), "optim"),
    **dict.fromkeys(("train_mode", "segmentation_loss"), "model"),
    **dict.fromkeys(("CHECKPOINT_NAME", "RESUME_SAFE_KEYS", "random_state", "restore_random_state", "trained_state",
                     "save_checkpoint", "load_checkpoint", "config_differences", "check_resumed_config",
                     "save_segmentor", "load_segmentor"), "checkpoints"),
}


def __getattr__(name: str) -> Any:
    """Keeps ``from vfm_adapters.seg.training import X`` working for names that moved in the split."""
    if name in _MOVED:
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
