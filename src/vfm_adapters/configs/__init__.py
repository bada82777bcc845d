"""The example and paper-row configs shipped inside the package, found by name.

``vfm-adapters train synthetic_cpu`` and ``vfm-adapters train paper/gtav_dinov2_l_rein``
read the YAML files in this folder, so a ``pip install`` (not only a clone) can run every
documented command; ``vfm-adapters configs`` lists them. A path to an existing file always
wins over a shipped name. In a clone, ``examples/configs`` is a link to this folder.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _root() -> Path:
    return Path(str(resources.files(__name__)))


def shipped_configs() -> dict[str, Path]:
    """Every shipped config: its name (path below this folder, no suffix) -> file.

    Example:
        >>> configs = shipped_configs()
        >>> "synthetic_cpu" in configs and "paper/gtav_dinov2_l_rein" in configs
        True
    """
    root = _root()
    found = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in CONFIG_SUFFIXES and path.is_file() and path.stem != "expected_miou":
            found[path.relative_to(root).with_suffix("").as_posix()] = path
    return found


def resolve_config(name_or_path: str | os.PathLike) -> Path:
    """A config file from a path, or else from a shipped config's name.

    Accepts ``synthetic_cpu``, ``paper/gtav_dinov2_l_rein``, the same with a suffix, or
    the bare file name when it is unique (``gtav_dinov2_l_rein``).

    Raises:
        FileNotFoundError: Neither a file nor a shipped name; the message lists close names.

    Example:
        >>> resolve_config("synthetic_cpu").name
        'synthetic_cpu.yaml'
        >>> resolve_config("gtav_dinov2_l_rein").parent.name
        'paper'
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    configs = shipped_configs()
    key = path.as_posix()
    for suffix in CONFIG_SUFFIXES:
        key = key.removesuffix(suffix)
    key = key.removeprefix("examples/configs/")
    if key in configs:
        return configs[key]
    by_stem = [name for name in configs if name.rsplit("/", 1)[-1] == key]
    if len(by_stem) == 1:
        return configs[by_stem[0]]
    close = difflib.get_close_matches(key, list(configs), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; 'vfm-adapters configs' lists the shipped configs"
    if len(by_stem) > 1:
        hint = f"; the name is ambiguous, one of: {', '.join(by_stem)}"
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a shipped config name{hint}")
