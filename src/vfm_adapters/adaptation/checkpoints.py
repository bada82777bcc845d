"""The resumable state of an adaptation run: student, teacher, optimiser, scheduler, generators.

Written atomically every ``train.checkpoint_interval`` steps and when a run stops, so a
resumed DACS or self-training run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._io import write_atomically
from ..seg.checkpoints import random_state, restore_random_state
from ..seg.config import ConfigError
from .dacs import DACSTrainer

__all__ = ["CHECKPOINT_NAME", "load_adaptation_checkpoint", "save_adaptation_checkpoint"]

#: Resumable state of an adaptation run, in ``train.output_dir``.
CHECKPOINT_NAME = "checkpoint.pt"


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
        "rng": random_state(), "config": json.dumps(config, sort_keys=True, default=str),
    }
    write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


def load_adaptation_checkpoint(path: str | os.PathLike, trainer: Any, config: Mapping[str, Any] | None = None) -> int:
    """Restores :func:`save_adaptation_checkpoint`'s state into a freshly built trainer; returns the step."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if config is not None:
        saved, now = json.loads(payload["config"]), json.loads(json.dumps(config, sort_keys=True, default=str))
        changed = sorted(k for k in set(saved) | set(now) if k != "train" and saved.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"checkpoint {path} was written with a different config (sections "
                                           f"{changed} differ); resume with the run's own config")
    modules = _trainer_modules(trainer)
    student = modules["student"]
    owners = {n: p for n, p in student.named_parameters() if p.requires_grad}
    owners.update(dict(student.named_buffers()))
    if set(owners) != set(payload["student"]):
        missing, extra = sorted(set(owners) - set(payload["student"])), sorted(set(payload["student"]) - set(owners))
        raise ConfigError(f"checkpoint {path} does not match this model (missing {missing[:5]}, "
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
    restore_random_state(payload["rng"])
    return int(payload["step"])
