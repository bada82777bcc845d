"""What a training run keeps on disk: the resumable run state and the trained segmentor.

``checkpoint.pt`` (:func:`save_checkpoint`) holds the trained tensors, the optimiser, the
scheduler and every random generator state, written atomically, so a resumed run
continues bit for bit; :func:`check_resumed_config` refuses a resume whose config changed
beyond :data:`RESUME_SAFE_KEYS`. :func:`save_segmentor` writes only what was trained
(adapters, neck + head, the host only if it trained) with a manifest;
:func:`load_segmentor` rebuilds the model from it through the head's segmentor class.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .._io import torch_save, write_atomically
from ..checkpoint import save_adapters
from ..methods.base import adapter_parameters, injected_methods
from .build import build_backbone, segmentor_class
from .config import DEFAULTS, ConfigError
from .manifest import RunManifestError, resolve_checkpoint_path, stored_checkpoint_path, verify_run, write_manifest

__all__ = ["CHECKPOINT_NAME", "RESUME_SAFE_KEYS", "check_resumed_config", "config_differences", "load_checkpoint",
           "load_segmentor", "random_state", "restore_random_state", "save_checkpoint", "save_segmentor",
           "trained_state"]

#: The resumable state of a training run, in ``train.output_dir``.
CHECKPOINT_NAME = "checkpoint.pt"


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


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor: parameters requiring grad, plus the decode modules' buffers (neck, head).

    Example:
        >>> import timm
        >>> from vfm_adapters.seg.heads import Segmentor
        >>> seg = Segmentor(timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32).requires_grad_(False),
        ...                 num_classes=2, head_channels=8)
        >>> sorted({name.split(".")[0] for name in trained_state(seg)})  # the host is frozen
        ['head', 'neck']
    """
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b.detach().clone() for name, b in _decode_buffers(model).items()})
    return state


def _decode_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of ``model.decode_modules()`` (batch-norm statistics of a head), by their names in ``model``."""
    return {f"{prefix}.{name}": buffer for prefix, module in model.decode_modules().items()
            for name, buffer in module.named_buffers()}


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, step: int, config: Mapping[str, Any],
                    seconds: float = 0.0) -> None:
    """Writes the resumable training state atomically (``seconds``: training time so far, over resumes).

    Example:
        >>> import tempfile, timm
        >>> from vfm_adapters.seg.heads import Segmentor
        >>> def fresh():
        ...     seg = Segmentor(timm.create_model("vit_tiny_patch16_224", depth=1, img_size=32), 2, head_channels=8)
        ...     opt = torch.optim.AdamW(seg.parameters())
        ...     return seg, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        >>> seg, opt, sched = fresh()
        >>> path = Path(tempfile.mkdtemp()) / CHECKPOINT_NAME
        >>> save_checkpoint(path, seg, opt, sched, step=7, config={"train": {"seed": 0}})
        >>> again, opt2, sched2 = fresh()
        >>> load_checkpoint(path, again, opt2, sched2), torch.equal(again.head.classifier.weight, seg.head.classifier.weight)
        (7, True)
    """
    payload = {
        "step": step, "model": trained_state(model), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": random_state(), "config": json.dumps(config, sort_keys=True),
        "seconds": float(seconds),
    }
    write_atomically(path, lambda temporary: torch_save(payload, temporary), what="checkpoint")


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, payload: Mapping[str, Any] | None = None) -> int:
    """Restores a checkpoint written by :func:`save_checkpoint` (``payload``: its content, if already read); returns its step."""
    if payload is None:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    expected = trained_state(model)
    if set(payload["model"]) != set(expected):
        missing, extra = sorted(set(expected) - set(payload["model"])), sorted(set(payload["model"]) - set(expected))
        raise ConfigError(f"checkpoint {path} does not match this model (missing {missing[:5]}, unexpected {extra[:5]}); "
                          "was the config changed?")
    owners = {**dict(model.named_parameters()), **_decode_buffers(model)}
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
    """Refuses to resume a checkpoint with a config that differs beyond :data:`RESUME_SAFE_KEYS`, naming the keys.

    Example:
        >>> check_resumed_config({"train": {"iterations": 5}}, {"train": {"iterations": 9}}, Path("ck.pt"))  # allowed
        >>> check_resumed_config({"optim": {"lr": 1e-4}}, {"optim": {"lr": 2e-4}}, Path("ck.pt"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vfm_adapters.config_tree.ConfigError: cannot resume ck.pt: ... (optim.lr: 0.0001 -> 0.0002)...
    """
    if stored is None:
        return  # a checkpoint of an older version: nothing to compare
    stored = json.loads(stored) if isinstance(stored, str) else stored
    changed = config_differences(stored, config)
    if changed:
        raise ConfigError(
            f"cannot resume {path}: the config differs from the one it was trained with ({'; '.join(changed[:8])}"
            f"{'; ...' if len(changed) > 8 else ''}). On --resume only train.iterations, eval.*, data.val and the "
            "log/checkpoint/eval intervals may change; start a new run (another output_dir, or --overwrite) for the rest")


def save_segmentor(model: nn.Module, directory: str | os.PathLike, model_config: Mapping[str, Any],
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Saves what was trained: ``adapters/`` (if any), ``head.safetensors``, ``segmentor.json``,
    and ``backbone.safetensors`` only when the host itself was trained.

    Example:
        >>> import tempfile
        >>> from vfm_adapters.seg.build import build_segmentor
        >>> from vfm_adapters.seg.config import DEFAULTS
        >>> config = {**DEFAULTS["model"], "backbone": "vit_tiny_patch16_224", "num_classes": 2,
        ...           "backbone_kwargs": {"img_size": 32, "depth": 1}, "head_channels": 8}
        >>> _ = torch.manual_seed(0); seg = build_segmentor(config).eval()
        >>> run = save_segmentor(seg, tempfile.mkdtemp(), config, {"seed": 0})
        >>> sorted(p.name for p in run.iterdir())
        ['adapters', 'head.safetensors', 'manifest.json', 'segmentor.json']
        >>> loaded, info = load_segmentor(run)
        >>> images = torch.randn(2, 3, 32, 32)
        >>> torch.allclose(loaded(images), seg(images)), info["methods"]
        (True, ['rein'])
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
                   verify: bool = True) -> tuple[nn.Module, dict]:
    """Rebuilds the segmentor saved by :func:`save_segmentor` (or by ``train``).

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
