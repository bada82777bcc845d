"""One guard for every command that writes a run directory (train, adapt, demo).

A directory that already holds a run is never silently replaced: without ``resume`` or
``overwrite`` it is refused, naming what it holds. With ``overwrite`` the old run's
entries are first *moved aside* into a hidden ``.replaced-<time>`` folder inside the
directory, and that folder is removed only once the new run has finished its work
(:func:`discard_replaced`), so a run killed half-way never leaves old outputs beside
new ones, and the old run can still be recovered from the folder. Only the entries the
command itself writes are ever moved: other files in the directory (e.g. the user's
config) are left alone.

The training log is kept consistent with a resumed checkpoint by :func:`truncate_log`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

from .._io import write_atomically

#: Entries ``train`` / ``adapt`` / ``save_segmentor`` write into a run directory.
RUN_ENTRIES = ("checkpoint.pt", "config.json", "log.jsonl", "results.json", "segmentor.json", "manifest.json",
               "head.safetensors", "backbone.safetensors", "decoder.safetensors", "adapters")
REPLACED_PREFIX = ".replaced-"


class RunDirectoryError(FileExistsError):
    """A run directory that already holds a run, used without ``resume`` or ``overwrite``."""


def existing_entries(directory: str | os.PathLike, entries: Iterable[str] = RUN_ENTRIES) -> list[str]:
    """The ``entries`` present in ``directory``.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "head.safetensors").write_bytes(b"x"); _ = (run / "notes.txt").write_text("mine")
        >>> existing_entries(run)
        ['head.safetensors']
    """
    directory = Path(directory)
    return [name for name in entries if os.path.lexists(directory / name)]


def check_run_dir(directory: str | os.PathLike, entries: Iterable[str] = RUN_ENTRIES, *, resume: bool = False,
                  overwrite: bool = False, resumable: bool = True, error: type[Exception] = RunDirectoryError) -> list[str]:
    """The refusal half of :func:`prepare_run_dir`, without touching anything: call it before
    the run's other checks, so a run refused later never moved the old one aside.

    Returns:
        The entries present (that ``overwrite`` would move aside).

    Example:
        >>> import tempfile
        >>> check_run_dir(tempfile.mkdtemp())
        []
    """
    directory = Path(directory)
    if resume and overwrite:
        raise error("resume and overwrite exclude each other: --resume continues the run, --overwrite replaces it")
    present = existing_entries(directory, entries) if directory.is_dir() else []
    if present and not (resume or overwrite):
        options = "--resume (resume=True) to continue it, " if resumable else ""
        raise error(f"{directory} already holds a run ({', '.join(present)}): pass {options}--overwrite "
                    "(overwrite=True) to replace it (the old run is moved aside first and removed once the new one "
                    "finishes), or choose another output directory")
    return present


def prepare_run_dir(directory: str | os.PathLike, entries: Iterable[str] = RUN_ENTRIES, *, resume: bool = False,
                    overwrite: bool = False, resumable: bool = True,
                    error: type[Exception] = RunDirectoryError) -> Path | None:
    """Creates ``directory`` or checks what it holds before a run writes into it.

    Args:
        directory: The run (output) directory.
        entries: The names this command writes there; only these count as "a run" and
            only these are moved aside.
        resume: The caller continues the run that is there (nothing is moved).
        overwrite: Replace the run that is there: its entries are moved into a hidden
            ``.replaced-*`` folder first (see :func:`discard_replaced`).
        resumable: Whether the command has a ``--resume`` (only for the error message).
        error: The exception class to raise (e.g. the caller's ``ConfigError``).

    Returns:
        The folder the old run was moved to, or ``None`` when nothing was moved.

    Raises:
        error: ``directory`` holds a run and neither ``resume`` nor ``overwrite`` is
            set, or both are.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> prepare_run_dir(run) is None
        True
        >>> _ = (run / "head.safetensors").write_bytes(b"old")
        >>> prepare_run_dir(run)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vfm_adapters.seg.run_dir.RunDirectoryError: ... already holds a run (head.safetensors): ...
        >>> aside = prepare_run_dir(run, overwrite=True)
        >>> (aside / "head.safetensors").read_bytes(), (run / "head.safetensors").exists()
        (b'old', False)
    """
    directory = Path(directory)
    entries = list(entries)
    present = check_run_dir(directory, entries, resume=resume, overwrite=overwrite, resumable=resumable, error=error)
    directory.mkdir(parents=True, exist_ok=True)
    if not present or resume:
        return None
    aside = Path(tempfile.mkdtemp(dir=directory, prefix=f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-"))
    # the manifest first: from the first move on, what is left is no longer a loadable run
    for name in sorted(present, key=lambda n: (n != "manifest.json", n != "segmentor.json", n)):
        os.replace(directory / name, aside / name)
    return aside


def discard_replaced(aside: str | os.PathLike | None) -> None:
    """Removes the folder :func:`prepare_run_dir` moved an overwritten run into (after the new run finished)."""
    if aside is not None and Path(aside).name.startswith(REPLACED_PREFIX) and Path(aside).is_dir():
        shutil.rmtree(aside)


def truncate_log(path: str | os.PathLike, step: int) -> float:
    """Keeps the entries of a JSON-lines log up to ``step`` (a resumed run's checkpoint); returns their last ``seconds``.

    Entries written after the checkpoint (by a run that was killed later) would
    otherwise appear twice once the resumed run logs the same steps again. ``step`` 0
    removes the log. An unreadable line ends the kept part (a kill mid-write).

    Example:
        >>> import tempfile, pathlib, json
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> _ = log.write_text("".join(json.dumps({"step": s, "seconds": s * 1.5}) + "\\n" for s in (1, 2, 3, 4)))
        >>> truncate_log(log, 2), [json.loads(line)["step"] for line in log.read_text().splitlines()]
        (3.0, [1, 2])
    """
    path = Path(path)
    if not path.is_file():
        return 0.0
    if step <= 0:
        path.unlink()
        return 0.0
    kept, seconds = [], 0.0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not isinstance(entry, dict) or int(entry.get("step", 0)) > step:
            break
        kept.append(line)
        seconds = float(entry.get("seconds", seconds))
    text = "".join(line + "\n" for line in kept)
    write_atomically(path, lambda temporary: Path(temporary).write_text(text))
    return seconds
