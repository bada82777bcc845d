"""Config-driven training of a :class:`~vfm_adapters.seg.heads.Segmentor`, resumable exactly.

``train(config)`` builds the host (timm), injects the configured adapter methods,
trains adapters + neck + head with AdamW and a poly schedule through
``accelerate.Accelerator`` (so ``accelerate launch`` gives multi-GPU data parallelism
and ``mixed_precision`` bf16 autocast on CUDA), and saves only what was trained:
the adapters (``vfm_adapters.save_adapters``), the neck + head, and the backbone only
if it was itself trained.

Exact resumption: ``output_dir/checkpoint.pt`` is written atomically (temporary file +
``os.replace``) every ``checkpoint_interval`` steps with the trained tensors, the
optimizer, the scheduler and every random generator state. The data stream is a pure
function of ``(seed, position)`` (:mod:`vfm_adapters.seg.sampling`), so a resumed run
starts the stream at the right position and, on CPU, reproduces an uninterrupted run
bit for bit.

Config reference (YAML or JSON; every key optional except the data)::

    model:
      backbone: vit_large_patch14_dinov2   # timm model name
      backbone_kwargs: {img_size: 512}     # passed to timm.create_model
      pretrained: false                    # timm pretrained weights (needs a download)
      patch_resample: timm                 # another patch_size: timm (pseudo-inverse) | bicubic (the Rein authors')
      backbone_checkpoint: null            # a .safetensors/.pt state dict for the host
      methods: [rein]                      # registered methods; [] or [freeze] = head only
      method_options: {rein: {link_queries: false}}
      train_backbone: false                # full fine-tuning (lr x optim.backbone_lr_mult)
      layers: null                         # feature blocks (default [7, 11, 15, 23] of 24)
      scales: [4, 2, 1, 0.5]
      neck: learnable                      # learnable | interpolate (the paper's) | multilevel (CLIP-L)
      head: fpn                            # fpn | linear
      head_channels: 256
      dropout: 0.1
      num_classes: 19
      mean: [123.675, 116.28, 103.53]
      std: [58.395, 57.12, 57.375]
    data:
      train: [{type: gta5, root: data/gta5, weight: 1.0}]
      val: [{type: cityscapes, root: data/cityscapes, split: val, resize: [1024, 512]}]
      crop_size: [512, 512]
      resize: ratio_range                  # ratio_range | short_side_choice (the Rein authors')
      short_sides: null                    # short_side_choice: null = int(crop * x * 0.1), x = 5..20
      max_long_side: null                  # short_side_choice: null = 4 x crop (2048 at 512)
      scale: [1280, 720]                   # ratio_range: keep-ratio rescale target, null = none
      ratio_range: [0.5, 2.0]
      cat_max_ratio: 0.75
      flip: 0.5
      photometric: true
      num_workers: 2
    optim:
      lr: 1.0e-4
      weight_decay: 0.05
      no_decay: authors                    # the Rein authors' names (norms, query/level embeddings,
                                           # Rein tokens and scale; biases decay) | small_tensors
      betas: [0.9, 0.999]
      backbone_lr_mult: 0.1
      poly_power: 0.9
      min_lr: 0.0
      warmup_iters: 0
      warmup_ratio: 1.0e-6
      schedule: poly                       # poly (warm-up x one poly curve) | warmup_poly_restart (the
                                           # authors' ACDC: LinearLR, then PolyLR restarting after warm-up)
      grad_clip: null
    train:
      iterations: 40000
      batch_size: 4                        # per process
      grad_accum: 1
      total_batch_size: null               # if set: grad_accum = total / (batch_size x processes)
      seed: 0
      mixed_precision: auto                # auto = bf16 on CUDA, else no
      log_interval: 50
      checkpoint_interval: 1000
      eval_interval: 0                     # 0 = evaluate only at the end
      output_dir: runs/rein
      log_with: null                       # Accelerate trackers, e.g. tensorboard (extra) or [tensorboard, wandb]
      find_unused_parameters: false        # DDP: needed when some trainable parameter gets no gradient
    eval:
      mode: slide                          # slide | whole
      crop: 512
      stride: 341
      limit: null                          # evaluate on the first N images only
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .._io import append_text, torch_save, write_atomically
from ..checkpoint import save_adapters
from ..methods.base import adapter_parameters, get_method, inject, injected_methods
from .datasets import build_dataset
from .build import build_adapted_backbone, build_backbone, build_segmentor, segmentor_class  # noqa: F401
from .heads import Segmentor
from .model import segmentation_loss, train_mode  # noqa: F401
from .optim import build_scheduler, no_weight_decay, parameter_groups, poly_factor  # noqa: F401
from .inference import evaluate
from .label_checks import check_dataset_labels, check_label_range
from .run_dir import check_run_dir, discard_replaced, existing_entries, prepare_run_dir, truncate_log
from .manifest import RunManifestError, resolve_checkpoint_path, stored_checkpoint_path, verify_run, write_manifest
from .metrics import results_table
from .sampling import AugmentedStream, StreamSampler
from .transforms import train_transform
# the config schema, loader and validation live in seg/config.py; re-exported for existing imports
from .config import DEFAULTS, METHOD_DEFAULTS, ConfigError, load_config  # noqa: F401

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the step that would save such weights."""


# ----------------------------------------------------------------------------- checkpoints
def random_state() -> dict[str, Any]:
    """Every random generator a run draws from (Python, NumPy, torch, CUDA), as plain data.

    Saved in checkpoints so a resumed run continues the same random streams; see
    :func:`restore_random_state`.

    Example:
        >>> import torch
        >>> state = random_state()
        >>> a = torch.rand(1)
        >>> restore_random_state(state)
        >>> torch.equal(torch.rand(1), a)
        True
    """
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: Mapping[str, Any]) -> None:
    """Sets every random generator to a :func:`random_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_state(model: Segmentor) -> dict[str, torch.Tensor]:
    """Every trained tensor: parameters requiring grad, plus the neck's and head's buffers."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in (("neck", model.neck), ("head", model.head)):
        state.update({f"{prefix}.{name}": b.detach().clone() for name, b in module.named_buffers()})
    return state


def save_checkpoint(path: Path, model: Segmentor, optimizer, scheduler, step: int, config: Mapping[str, Any],
                    seconds: float = 0.0) -> None:
    """Writes the resumable training state atomically (``seconds``: training time so far, over resumes)."""
    payload = {
        "step": step, "model": trained_state(model), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": random_state(), "config": json.dumps(config, sort_keys=True),
        "seconds": float(seconds),
    }
    write_atomically(path, lambda temporary: torch_save(payload, temporary), what="checkpoint")


def load_checkpoint(path: Path, model: Segmentor, optimizer, scheduler, payload: Mapping[str, Any] | None = None) -> int:
    """Restores a checkpoint written by :func:`save_checkpoint` (``payload``: its content, if already read); returns its step."""
    if payload is None:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    expected = trained_state(model)
    if set(payload["model"]) != set(expected):
        missing, extra = sorted(set(expected) - set(payload["model"])), sorted(set(payload["model"]) - set(expected))
        raise ConfigError(f"checkpoint {path} does not match this model (missing {missing[:5]}, unexpected {extra[:5]}); "
                          "was the config changed?")
    owners = dict(model.named_parameters())
    owners.update({f"neck.{n}": b for n, b in model.neck.named_buffers()})
    owners.update({f"head.{n}": b for n, b in model.head.named_buffers()})
    with torch.no_grad():
        for name, tensor in payload["model"].items():
            owners[name].copy_(tensor)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    restore_random_state(payload["rng"])
    return int(payload["step"])


#: Config keys that may differ between a checkpoint and the config that resumes it: they
#: change neither the model nor the data stream (``train.iterations`` extends or shortens
#: the poly schedule, as a resumed run is expected to).
RESUME_SAFE_KEYS = ("train.iterations", "train.log_interval", "train.checkpoint_interval", "train.eval_interval",
                    "train.output_dir", "eval", "data.val", "data.num_workers")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for a nested mapping (an empty mapping has no leaves)."""
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any],
                       safe: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[str]:
    """``"key: old -> new"`` for every config value that differs, except under the ``safe`` keys.

    Example:
        >>> config_differences({"train": {"seed": 0, "iterations": 5}}, {"train": {"seed": 1, "iterations": 9}})
        ['train.seed: 0 -> 1']
    """
    old, new = _flatten(json.loads(json.dumps(stored))), _flatten(json.loads(json.dumps(current)))
    defaults = _flatten(json.loads(json.dumps(DEFAULTS)))
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == s or key.startswith(s + ".") for s in safe):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # a key added by a later version, at its default: the same run
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            changed.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return changed


def check_resumed_config(stored: str | Mapping[str, Any] | None, config: Mapping[str, Any], path: Path) -> None:
    """Refuses to resume a checkpoint with a config that differs beyond :data:`RESUME_SAFE_KEYS`, naming the keys."""
    if stored is None:
        return  # a checkpoint of an older version: nothing to compare
    stored = json.loads(stored) if isinstance(stored, str) else stored
    changed = config_differences(stored, config)
    if changed:
        raise ConfigError(
            f"cannot resume {path}: the config differs from the one it was trained with ({'; '.join(changed[:8])}"
            f"{'; ...' if len(changed) > 8 else ''}). On --resume only train.iterations, eval.*, data.val and the "
            "log/checkpoint/eval intervals may change; start a new run (another output_dir, or --overwrite) for the rest")


def save_segmentor(model: Segmentor, directory: str | os.PathLike, model_config: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Saves what was trained: ``adapters/`` (if any), ``head.safetensors``, ``segmentor.json``,
    and ``backbone.safetensors`` only when the host itself was trained.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if injected_methods(model.backbone):
        save_adapters(model.backbone, directory / "adapters")
    decode = {k: v.detach().cpu().contiguous() for k, v in model.decode_modules().state_dict().items()}
    write_atomically(directory / "head.safetensors", lambda p: save_file(decode, p))
    adapter_ids = {id(a) for a in adapter_parameters(model.backbone)}
    host_trained = any(p.requires_grad for p in model.backbone.parameters() if id(p) not in adapter_ids)
    if host_trained:
        host_state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()
                      if not k.startswith("vfm_adapters.")}
        write_atomically(directory / "backbone.safetensors", lambda p: save_file(host_state, p))
    saved_config = dict(model_config)
    checkpoint = saved_config.get("backbone_checkpoint")
    if checkpoint:  # recorded so that it names the same file from any working directory
        saved_config["backbone_checkpoint"] = stored_checkpoint_path(checkpoint, directory)
    info = {"model": saved_config, "settings": model.settings, "host_trained": host_trained,
            "methods": injected_methods(model.backbone), **(extra or {})}
    write_atomically(directory / "segmentor.json", lambda p: Path(p).write_text(json.dumps(info, indent=2, default=str) + "\n"))
    # last: the manifest lists (and hashes) exactly the files above, and the host weights used
    write_manifest(directory, info["methods"], saved_config,
                   None if host_trained else saved_config.get("backbone_checkpoint"))
    return directory


def load_segmentor(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                   verify: bool = True) -> tuple[Segmentor, dict]:
    """Rebuilds a :class:`Segmentor` saved by :func:`save_segmentor` (or by ``train``).

    Args:
        directory: The run directory.
        map_location: Device of the returned model.
        verify: Check the run against its ``manifest.json`` first (see
            :func:`vfm_adapters.seg.manifest.verify_run`): a missing, changed or foreign
            file, or a changed backbone checkpoint, is refused naming the file.
            ``False`` loads a run saved before manifests existed, unchecked.

    Returns:
        The model (eval mode) and the saved ``segmentor.json`` dict.
    """
    from safetensors.torch import load_file

    from ..checkpoint import load_adapters

    directory = Path(directory)
    info_path = directory / "segmentor.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: a saved segmentor directory holds segmentor.json, head.safetensors "
                                "and adapters/ (written by vfm-adapters train or save_segmentor)")
    info = json.loads(info_path.read_text())
    model_config = dict(info["model"])
    manifest = verify_run(directory, info["model"]) if verify else None
    if info.get("methods") and not (directory / "adapters").is_dir():
        raise RunManifestError(f"{directory / 'adapters'} is missing but the run was saved with {info['methods']}: "
                               "evaluating without them would report another model")
    if info.get("host_trained"):
        model_config["backbone_checkpoint"] = str(directory / "backbone.safetensors")
    elif model_config.get("backbone_checkpoint"):
        recorded = str(model_config["backbone_checkpoint"])
        resolved = resolve_checkpoint_path(recorded, directory)
        if manifest is None and not resolved.is_file() and Path(recorded).is_file():
            resolved = Path(recorded)  # verify=False on an older run: its path was relative to the working directory
        model_config["backbone_checkpoint"] = str(resolved)
    model_config["methods"] = []
    model_config["train_backbone"] = False
    # A host neither pretrained nor loaded from a file was randomly initialised right after
    # seeding with the run's seed: re-seeding rebuilds exactly the same frozen weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(info.get("seed", 0)))
        backbone = build_backbone(model_config)
    if (directory / "adapters").is_dir():
        load_adapters(backbone, directory / "adapters")
    if manifest is not None and injected_methods(backbone) != list(manifest["methods"]):
        raise RunManifestError(f"{directory / 'adapters'} holds {injected_methods(backbone)} but the run was saved "
                               f"with {manifest['methods']}")
    settings = info["settings"]
    model = segmentor_class(settings["head"]).from_settings(backbone, settings, mean=model_config["mean"],
                                                             std=model_config["std"])
    model.decode_modules().load_state_dict(load_file(str(directory / "head.safetensors")))
    return model.to(map_location).eval(), info


# ----------------------------------------------------------------------------- training
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


def evaluate_sets(model: Segmentor, config: Mapping[str, Any], sets: Mapping[str, tuple[Any, dict]],
                  progress: bool = False) -> dict[str, dict]:
    """Evaluates on every validation set with the config's protocol."""
    ev, model_cfg = config["eval"], config["model"]
    results = {}
    for name, (dataset, options) in sets.items():
        results[name] = evaluate(model, dataset, int(model_cfg["num_classes"]), mode=ev["mode"], crop=int(ev["crop"]),
                                 stride=int(ev["stride"]), mean=model_cfg["mean"], std=model_cfg["std"],
                                 limit=ev.get("limit"), progress=progress, **options)
    return results


def train(config: str | os.PathLike | Mapping[str, Any], resume: bool = False, stop_after: int | None = None,
          progress: bool = True, log: Callable[[str], None] | None = None, evaluate_at_end: bool = True,
          overwrite: bool = False, overrides: Iterable[str | tuple[str, Any]] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Trains a segmentor from a config; returns ``{"step", "loss", "results", "output_dir", "seconds"}``.

    Args:
        config: Path to a YAML/JSON config, or a dict (see the module docstring).
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
    from tqdm.auto import tqdm

    config = load_config(config, overrides)
    tc, oc, dc, mc = config["train"], config["optim"], config["data"], config["model"]
    output_dir = Path(tc["output_dir"])
    # refuse early; the old run is moved aside (overwrite) only once everything else checked out
    check_run_dir(output_dir, resume=resume, overwrite=overwrite, error=ConfigError)
    accelerator = make_accelerator(tc)
    say = log or accelerator.print
    if not dc["train"]:
        raise ConfigError("data.train is empty: list at least one training dataset")

    seed = int(tc["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = build_segmentor(mc)
    groups = model.parameter_groups(oc["lr"], oc["weight_decay"], oc["backbone_lr_mult"], oc["no_decay"])
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=oc["lr"], betas=tuple(oc["betas"]))
    total = int(tc["iterations"])
    scheduler = build_scheduler(optimizer, oc, total)

    start, elapsed = 0, 0.0
    checkpoint_path = output_dir / CHECKPOINT_NAME
    if resume and checkpoint_path.is_file():
        payload = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        check_resumed_config(payload.get("config"), config, checkpoint_path)
        start = load_checkpoint(checkpoint_path, model, optimizer, scheduler, payload=payload)
        elapsed = float(payload.get("seconds", -1.0))
        say(f"resumed from {checkpoint_path} at step {start}/{total}")
    elif resume:
        finished = [name for name in existing_entries(output_dir) if name not in ("config.json", "log.jsonl")]
        if finished:  # nothing to resume from, but a run's outputs that starting over would replace
            raise ConfigError(f"cannot resume {output_dir}: it has no {CHECKPOINT_NAME} but holds a run "
                              f"({', '.join(finished)}); pass --overwrite (overwrite=True) to start over and replace it")
        say(f"no checkpoint at {checkpoint_path}; starting from scratch")

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model: Segmentor = accelerator.unwrap_model(model)

    sources = [build_dataset(spec) for spec in dc["train"]]
    num_classes = int(mc["num_classes"])
    for i, source in enumerate(sources):  # a sampled pass: wrong ids fail here, naming a file
        check_dataset_labels(source, num_classes, f"data.train[{i}] ({dc['train'][i].get('type')})")
    weights = [float(spec.get("weight", 1.0)) for spec in dc["train"]]
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
    say(f"effective batch {per_step} = {batch} per process x {accum} accumulation step(s) x {world} process(es)")
    end = total if stop_after is None else min(total, start + int(stop_after))
    sampler = StreamSampler([len(s) for s in sources], weights, seed=seed, start=start * per_step,
                            length=(end - start) * per_step, rank=accelerator.process_index, world_size=world)
    loader = DataLoader(AugmentedStream(sources, transform, seed), batch_size=batch, sampler=sampler,
                        num_workers=int(dc["num_workers"]), generator=torch.Generator().manual_seed(seed),
                        collate_fn=_collate, persistent_workers=False)
    batches = iter(loader)

    val_sets = build_val_sets(config) if accelerator.is_main_process and dc["val"] else {}
    log_path = output_dir / "log.jsonl"
    replaced = None
    if accelerator.is_main_process:
        # only now, with the checkpoint loaded and the data checked: replace (overwrite) or update the run
        replaced = prepare_run_dir(output_dir, resume=resume, overwrite=overwrite, error=ConfigError)
        if replaced is not None:
            say(f"the previous run in {output_dir} was moved to {replaced}; it is removed when this run ends")
        write_atomically(output_dir / "config.json",
                         lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
        logged = truncate_log(log_path, start)  # a resumed run logs each step once; a new run starts a new log
        elapsed = logged if elapsed < 0 else elapsed  # checkpoints of older versions hold no time
    elapsed = max(elapsed, 0.0)
    accelerator.wait_for_everyone()
    train_mode(model)
    bar = tqdm(total=total, initial=start, desc="train", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    started, loss_value, running = time.perf_counter(), float("nan"), []
    step = start
    last_saved = start if start > 0 else None  # the step of the checkpoint on disk that this run wrote or resumed
    for step in range(start, end):
        step_loss = 0.0
        for micro in range(accum):
            data = next(batches)
            images = data["image"].to(accelerator.device, non_blocking=True)
            labels = data["label"].to(accelerator.device, non_blocking=True)
            check_label_range(labels, num_classes, data["path"])
            context = accelerator.no_sync(model) if micro < accum - 1 else nullcontext()
            with context:
                with accelerator.autocast():  # the model's own loss, inside forward (DDP-safe)
                    loss = model(images, labels) / accum
                accelerator.backward(loss)
            step_loss += float(loss.detach())
        _stop_if_diverged(accelerator, step_loss, step + 1, checkpoint_path, last_saved)
        if oc["grad_clip"]:
            accelerator.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], oc["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = step_loss
        running.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if accelerator.is_main_process and (done % max(int(tc["log_interval"]), 1) == 0 or done == end):
            entry = {"step": done, "loss": float(np.mean(running)), "lr": scheduler.get_last_lr()[0],
                     "seconds": round(elapsed + time.perf_counter() - started, 2)}  # cumulative over resumes
            running = []
            append_text(log_path, json.dumps(entry) + "\n")
            accelerator.log({"train/loss": entry["loss"], "train/lr": entry["lr"]}, step=done)
        interval = int(tc["checkpoint_interval"])
        if (interval > 0 and done % interval == 0) or done == end:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(checkpoint_path, raw_model, optimizer, scheduler, done, config,
                                seconds=elapsed + time.perf_counter() - started)
            last_saved = done
        if val_sets and tc["eval_interval"] and done % int(tc["eval_interval"]) == 0 and done < total:
            results = evaluate_sets(raw_model, config, val_sets)
            say(f"step {done}: " + ", ".join(f"{k} mIoU {v['mIoU']:.1f}" for k, v in results.items()))
            train_mode(model)
    bar.close()
    finished = (end == total)
    results: dict[str, dict] = {}
    accelerator.wait_for_everyone()
    if finished and accelerator.is_main_process:
        save_segmentor(raw_model, output_dir, mc, {"seed": seed, "step": end})
        if evaluate_at_end and val_sets:
            results = evaluate_sets(raw_model, config, val_sets, progress=progress)
            accelerator.log({f"val/{name}/mIoU": r["mIoU"] for name, r in results.items()}, step=end)
            write_atomically(output_dir / "results.json", lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
            say(results_table({Path(output_dir).name: results}))
    if accelerator.is_main_process:
        discard_replaced(replaced)
    accelerator.end_training()
    return {"step": end if start < end else start, "loss": loss_value, "results": results, "output_dir": str(output_dir),
            "seconds": time.perf_counter() - started, "finished": finished, "model": raw_model}


def _stop_if_diverged(accelerator, loss: float, step: int, checkpoint_path: Path, last_saved: int | None) -> None:
    """Raises :class:`TrainingDivergedError` (on every process) when ``loss`` is not finite on any process.

    Called before the optimiser step, so no weight and no checkpoint ever holds the
    result of a non-finite loss.
    """
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad.item()) == 0.0:
        return
    kept = (f"the last good checkpoint {checkpoint_path} (step {last_saved}) is intact; continue from it with "
            "--resume after the fix" if last_saved is not None else "no checkpoint was written yet")
    raise TrainingDivergedError(
        f"the training loss is {loss} at step {step}: training diverged and was stopped before the optimiser "
        f"step; {kept}. Lower optim.lr, set optim.grad_clip, or check the data of this step")


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "path": [s.get("path") for s in samples],
    }
