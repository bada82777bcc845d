"""The step loop, seeding and run-directory set-up shared by ``train`` and ``adapt``.

Both commands seed every generator the same way (:func:`seed_everything`), open their
run directory the same way once every check has passed (:func:`open_run`: replace or
update it, write ``config.json``, cut ``log.jsonl`` back to a resumed step), and run the
same loop (:func:`run_steps`): progress bar, a log line every ``log_interval`` steps, a
checkpoint every ``checkpoint_interval`` steps and at the end, and a stop with
:class:`TrainingDivergedError` as soon as the loss is not finite, before the checkpoint
that would save such weights. What a step does is the caller's function.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .._io import append_text, write_atomically
from .config import ConfigError
from .run_dir import prepare_run_dir, truncate_log

__all__ = ["LossNotFinite", "StepSchedule", "TrainingDivergedError", "append_log", "open_run", "run_steps",
           "seed_everything"]

LOG_NAME = "log.jsonl"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the checkpoint that would save such weights."""


class LossNotFinite(Exception):
    """Raised by a step function that found a non-finite loss before updating any weight."""

    def __init__(self, loss: float) -> None:
        super().__init__(loss)
        self.loss = loss


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators (CUDA's through torch).

    Example:
        >>> seed_everything(3); a = torch.rand(1); seed_everything(3); torch.equal(a, torch.rand(1))
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(output_dir: Path, config: Mapping[str, Any], *, resume: bool, overwrite: bool, start: int,
             error: type[Exception] = ConfigError) -> tuple[Path | None, float]:
    """Sets up the run directory once every check has passed.

    An earlier run is moved aside (``overwrite``) or kept (``resume``), ``config.json`` is
    written atomically and ``log.jsonl`` keeps only the steps up to ``start``.

    Returns:
        The folder the old run was moved to (remove it with
        :func:`~vfm_adapters.seg.run_dir.discard_replaced` when the new run ends) and the
        training seconds the kept log records.

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp()) / "run"
        >>> open_run(run, {"train": {"seed": 0}}, resume=False, overwrite=False, start=0)
        (None, 0.0)
        >>> append_log(run, {"step": 1, "loss": 0.5, "seconds": 2.0})
        >>> sorted(p.name for p in run.iterdir()), (run / "log.jsonl").read_text()
        (['config.json', 'log.jsonl'], '{"step": 1, "loss": 0.5, "seconds": 2.0}\\n')
    """
    replaced = prepare_run_dir(output_dir, resume=resume, overwrite=overwrite, error=error)
    write_atomically(output_dir / "config.json",
                     lambda path: Path(path).write_text(json.dumps(config, indent=2, default=str) + "\n"))
    return replaced, truncate_log(output_dir / LOG_NAME, start)


def append_log(output_dir: Path, entry: Mapping[str, Any]) -> None:
    """Appends one JSON line to the run's ``log.jsonl`` (see :func:`open_run`'s example)."""
    append_text(output_dir / LOG_NAME, json.dumps(dict(entry)) + "\n")


@dataclass(frozen=True)
class StepSchedule:
    """Which steps run now and when to log and to checkpoint.

    Args:
        start: First step (0-based; a resumed run's checkpoint step).
        end: Stop before this step (``total``, or earlier for a time-boxed job).
        total: The run's length (the progress bar's).
        log_interval: Log every this many steps (and at ``end``).
        checkpoint_interval: Checkpoint every this many steps (0: only at ``end``).
        checkpoint_path: Where the checkpoint is written (named when training diverges).

    Example:
        >>> plan = StepSchedule(0, 10, 10, log_interval=4, checkpoint_interval=5, checkpoint_path=Path("ck.pt"))
        >>> [done for done in range(1, 11) if plan.logs_at(done)], [done for done in range(1, 11) if plan.saves_at(done)]
        ([4, 8, 10], [5, 10])
    """

    start: int
    end: int
    total: int
    log_interval: int
    checkpoint_interval: int
    checkpoint_path: Path

    def logs_at(self, done: int) -> bool:
        return done % max(self.log_interval, 1) == 0 or done == self.end

    def saves_at(self, done: int) -> bool:
        return (self.checkpoint_interval > 0 and done % self.checkpoint_interval == 0) or done == self.end


def run_steps(schedule: StepSchedule, step: Callable[[int], Mapping[str, Any]], *,
              log: Callable[[int, Sequence[Mapping[str, Any]]], None], save: Callable[[int], None],
              after: Callable[[int], None] | None = None, desc: str = "train", progress: bool = True) -> Mapping[str, Any]:
    """Runs ``step(i)`` for ``i`` in ``[start, end)``; returns the last step's output.

    ``step`` returns at least ``{"loss": float}`` (``"lr"`` is shown too) or raises
    :class:`LossNotFinite`. After each step: ``log(done, outputs since the last log)`` when
    due, ``save(done)`` when due, then ``after(done)`` (e.g. an evaluation).

    Example:
        >>> import tempfile
        >>> plan = StepSchedule(0, 4, 4, log_interval=2, checkpoint_interval=0, checkpoint_path=Path("ck.pt"))
        >>> logged, saved = [], []
        >>> out = run_steps(plan, lambda i: {"loss": float(i)}, log=lambda done, outs: logged.append((done, len(outs))),
        ...                 save=saved.append, progress=False)
        >>> out, logged, saved
        ({'loss': 3.0}, [(2, 2), (4, 2)], [4])
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=schedule.total, initial=schedule.start, desc=desc, disable=not progress, dynamic_ncols=True)
    out: Mapping[str, Any] = {"loss": float("nan")}
    pending: list[Mapping[str, Any]] = []
    last_saved = schedule.start if schedule.start > 0 else None
    for index in range(schedule.start, schedule.end):
        try:
            out = step(index)
        except LossNotFinite as stop:
            _diverged(stop.loss, index + 1, schedule.checkpoint_path, last_saved)
        if not math.isfinite(float(out["loss"])):
            _diverged(float(out["loss"]), index + 1, schedule.checkpoint_path, last_saved)
        done = index + 1
        pending.append(out)
        bar.update(1)
        bar.set_postfix({k: f"{out[k]:.3f}" if k == "loss" else f"{out[k]:.2e}" for k in ("loss", "lr") if k in out})
        if schedule.logs_at(done):
            log(done, pending)
            pending = []
        if schedule.saves_at(done):
            save(done)
            last_saved = done
        if after is not None:
            after(done)
    bar.close()
    return out


def _diverged(loss: float, step: int, checkpoint_path: Path, last_saved: int | None) -> None:
    kept = (f"the last good checkpoint {checkpoint_path} (step {last_saved}) is intact; continue from it with "
            "--resume after the fix" if last_saved is not None else "no checkpoint was written yet")
    raise TrainingDivergedError(
        f"the training loss is {loss} at step {step}: training diverged and was stopped before any checkpoint "
        f"held its weights; {kept}. Lower optim.lr, set optim.grad_clip, or check the data of this step")


def elapsed_since(started: float, offset: float = 0.0) -> float:
    """Seconds since ``started`` (a ``time.perf_counter()``) plus ``offset`` (earlier runs'), rounded for logs.

    Example:
        >>> elapsed_since(time.perf_counter(), offset=10.0) >= 10.0
        True
    """
    return round(offset + time.perf_counter() - started, 2)
