"""Pictures of a run: training curves and per-class IoU per domain (matplotlib, no display).

``vfm-adapters plot RUN`` calls :func:`plot_run`, which reads what ``train`` writes into
the run directory (``log.jsonl`` and, after the final evaluation, ``results.json``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ._io import write_atomically


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a ``log.jsonl``; the last entry of a step wins (a resumed run may repeat steps).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> _ = p.write_text('{"step": 1, "loss": 2.0}\\n{"step": 2, "loss": 1.0}\\n{"step": 2, "loss": 1.5}\\n')
        >>> [e["loss"] for e in read_log(p)]
        [2.0, 1.5]
    """
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an integer 'step'")
        by_step[entry["step"]] = entry
    return [by_step[step] for step in sorted(by_step)]


def _save_figure(figure, path: Path) -> None:
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight"))


def plot_run(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draws ``curves.png`` (loss and lr against step) and, if evaluated, ``per_class_iou.png``.

    Returns:
        The PNG files written (into ``output_dir``, default the run directory).

    Raises:
        FileNotFoundError: The directory holds neither ``log.jsonl`` nor ``results.json``.

    Example:
        >>> import json, tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 1e-4}\\n')
        >>> _ = (run / "results.json").write_text(json.dumps({"fog": {"mIoU": 50.0, "IoU": {"road": 60.0, "sky": 40.0}}}))
        >>> [p.name for p in plot_run(run)]
        ['curves.png', 'per_class_iou.png']
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    out = Path(output_dir) if output_dir is not None else run
    log_path, results_path = run / "log.jsonl", run / "results.json"
    if not log_path.is_file() and not results_path.is_file():
        raise FileNotFoundError(f"{run} holds neither log.jsonl nor results.json: is it a run directory written by 'train'?")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if log_path.is_file():
        entries = read_log(log_path)
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        steps = [e["step"] for e in entries]
        for axis, key in zip(axes, ("loss", "lr")):
            values = [e.get(key, math.nan) for e in entries]
            axis.plot(steps, values, marker="." if len(steps) < 50 else None)
            axis.set_xlabel("step")
            axis.set_ylabel(key)
            axis.grid(alpha=0.3)
        axes[0].set_title("training loss")
        axes[1].set_title("learning rate")
        _save_figure(figure, out / "curves.png")
        plt.close(figure)
        written.append(out / "curves.png")
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        domains = [name for name, r in results.items() if isinstance(r, dict) and r.get("IoU")]
        if domains:
            classes = list(results[domains[0]]["IoU"])
            figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(classes) * max(1, len(domains)) ** 0.5), 4))
            width = 0.8 / len(domains)
            for i, domain in enumerate(domains):
                values = [results[domain]["IoU"].get(c, math.nan) for c in classes]
                positions = [j + (i - (len(domains) - 1) / 2) * width for j in range(len(classes))]
                axis.bar(positions, values, width=width, label=f"{domain} (mIoU {results[domain].get('mIoU', math.nan):.1f})")
            axis.set_xticks(range(len(classes)))
            axis.set_xticklabels(classes, rotation=60, ha="right")
            axis.set_ylabel("IoU (%)")
            axis.set_ylim(0, 100)
            axis.legend(fontsize="small")
            axis.set_title("per-class IoU per domain")
            _save_figure(figure, out / "per_class_iou.png")
            plt.close(figure)
            written.append(out / "per_class_iou.png")
    return written
