"""Options and set-up shared by several sub-commands (not a command itself: the leading
underscore keeps :mod:`vfm_adapters.cli` from registering it)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator


def add_config_arguments(parser: argparse.ArgumentParser, example_overrides: str) -> None:
    """The ``CONFIG [KEY=VALUE ...]`` positionals shared by ``train`` and ``adapt``."""
    parser.add_argument("config", help="a config shipped with the package by name (see 'vfm-adapters configs'), "
                                       "or a YAML/JSON file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides right after CONFIG (before the flags): dotted keys, values read as YAML, "
                             f"e.g. {example_overrides}")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads; 0 (default) = the cores other processes leave free, and 1 on a "
                             "machine with 2 cores or fewer (OpenMP threads slow down badly on an oversubscribed CPU)")


def choose_threads(requested: int) -> int:
    """``requested`` if positive; else the cores left free by other processes, and 1 on <= 2 cores.

    PyTorch's OpenMP threads slow down by an order of magnitude when the CPU is
    oversubscribed (measured on a 2-core machine: ``train synthetic_cpu`` ran at 0.29-0.35
    it/s with torch's default threads and 7.15 it/s with one thread; benchmarks/RESULTS.md),
    and on a 2-core machine any other process oversubscribes two threads.

    Example:
        >>> choose_threads(3)
        3
        >>> choose_threads(0) >= 1
        True
    """
    if requested < 0:
        raise ValueError(f"--threads must be 0 (automatic) or a positive number of threads, got {requested}")
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    if cores <= 2:
        return 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        busy = 0.0
    return max(1, min(cores - math.ceil(busy), 16))


@contextlib.contextmanager
def torch_threads(requested: int) -> Iterator[int]:
    """Runs the body with :func:`choose_threads` torch CPU threads, restoring the old count.

    Example:
        >>> with torch_threads(1) as threads:
        ...     threads
        1
    """
    import torch

    threads = choose_threads(requested)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def refuse_plain_torchrun() -> None:
    """Refuses a multi-process CPU launch that Accelerate would not see as distributed.

    ``torchrun --nproc_per_node N`` without a GPU starts N processes that Accelerate treats
    as N independent single-process runs unless ``ACCELERATE_USE_CPU=true`` is set, so every
    rank would train alone and write the same output directory.

    Example:
        >>> refuse_plain_torchrun()  # one process: nothing to refuse
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return
    import torch

    cpu_flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not torch.cuda.is_available() and not cpu_flag:
        raise ValueError(
            f"launched as {world} processes (WORLD_SIZE={world}) on a machine without CUDA, but ACCELERATE_USE_CPU is not "
            "set, so each process would train alone and write the same output directory; run "
            "'ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m vfm_adapters.cli train ...' or 'accelerate launch --cpu ...'"
        )
