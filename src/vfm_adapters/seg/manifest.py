"""The run manifest: which files make up a saved segmentor, so a loader never mixes runs.

``save_segmentor`` writes ``manifest.json`` last, beside the files it saved::

    {"format": 1, "methods": ["rein"],
     "files": {"head.safetensors": "<sha256>", "segmentor.json": "<sha256>", "adapters/...": "<sha256>"},
     "backbone_checkpoint": {"path": "../pretrained_backbone/backbone.safetensors", "sha256": "<sha256>"},
     "config_sha256": "<sha256 of the model config>"}

:func:`verify_run` checks it before anything is loaded: a listed file that is missing
or changed, a run file that is not listed (e.g. another run's ``adapters/`` copied in),
or a backbone checkpoint whose content changed is refused with a message naming the
file. ``backbone_checkpoint`` is stored relative to the run directory when it lies
beside it (the demo's ``pretrained_backbone/``) and absolute otherwise, so evaluating
from another working directory finds the same file, or fails clearly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .._io import write_atomically

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
#: Files (and the adapters folder) that belong to a saved segmentor run and are checked on load.
RUN_FILES = ("segmentor.json", "head.safetensors", "backbone.safetensors", "config.json")
ADAPTERS_DIR = "adapters"


class RunManifestError(ValueError):
    """A saved run whose files do not match its manifest (missing, changed or foreign files)."""


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in chunks.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = path.write_bytes(b"abc")
        >>> file_sha256(path)[:12]
        'ba7816bf8f01'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys), so equal configs hash equally.

    Example:
        >>> config_sha256({"a": 1, "b": [2]}) == config_sha256({"b": [2], "a": 1})
        True
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def present_run_files(directory: str | os.PathLike) -> list[str]:
    """Run files present in ``directory`` (relative POSIX paths), temporaries (dot files) excluded.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (run / "head.safetensors").write_bytes(b"x"); (run / "adapters").mkdir()
        >>> _ = (run / "adapters" / "adapter_model.safetensors").write_bytes(b"y")
        >>> present_run_files(run)
        ['adapters/adapter_model.safetensors', 'head.safetensors']
    """
    directory = Path(directory)
    names = [name for name in RUN_FILES if (directory / name).exists()]
    adapters = directory / ADAPTERS_DIR
    if adapters.is_dir():
        for path in adapters.rglob("*"):
            relative = path.relative_to(directory)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                names.append(relative.as_posix())
    return sorted(names)


def stored_checkpoint_path(checkpoint: str | os.PathLike, directory: str | os.PathLike) -> str:
    """How a run records its backbone checkpoint: relative to the run directory when the file
    lies under the run directory's parent (e.g. a sibling run), else absolute.

    ``checkpoint`` is interpreted as the training process did (relative to the working
    directory).

    Example:
        >>> stored_checkpoint_path("/out/pre/backbone.safetensors", "/out/rein")
        '../pre/backbone.safetensors'
        >>> stored_checkpoint_path("/data/dinov2.pth", "/out/rein")
        '/data/dinov2.pth'
    """
    checkpoint, directory = Path(os.path.abspath(checkpoint)), Path(os.path.abspath(directory))
    if checkpoint.is_relative_to(directory.parent):
        return Path(os.path.relpath(checkpoint, directory)).as_posix()
    return str(checkpoint)


def resolve_checkpoint_path(stored: str, directory: str | os.PathLike) -> Path:
    """The file a recorded ``backbone_checkpoint`` names: absolute, or relative to the run directory.

    Example:
        >>> resolve_checkpoint_path("../pre/b.safetensors", "/out/rein").as_posix()
        '/out/pre/b.safetensors'
    """
    path = Path(stored)
    return path if path.is_absolute() else Path(os.path.normpath(Path(os.path.abspath(directory)) / path))


def write_manifest(directory: str | os.PathLike, methods: Iterable[str], model_config: Mapping[str, Any],
                   backbone_checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Hashes the run files now in ``directory`` and writes ``manifest.json`` atomically (last).

    Args:
        directory: The run directory.
        methods: The adapter methods injected when saving.
        model_config: The model config saved in ``segmentor.json``.
        backbone_checkpoint: The host weights file used (as recorded, see
            :func:`stored_checkpoint_path`), hashed so a changed file is detected.
    """
    directory = Path(directory)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "methods": list(methods),
        "files": {name: file_sha256(directory / name) for name in present_run_files(directory)},
        "config_sha256": config_sha256(model_config),
        "backbone_checkpoint": None,
    }
    if backbone_checkpoint:
        resolved = resolve_checkpoint_path(str(backbone_checkpoint), directory)
        # a file moved away during training must not make the final save fail: recorded as unknown
        digest = file_sha256(resolved) if resolved.is_file() else None
        manifest["backbone_checkpoint"] = {"path": str(backbone_checkpoint), "sha256": digest}
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomically(directory / MANIFEST_NAME, lambda path: Path(path).write_text(text))
    return manifest


def verify_run(directory: str | os.PathLike, model_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Checks a saved run against its manifest; returns the manifest.

    Raises:
        RunManifestError: No manifest, a listed file missing or changed, a run file not
            listed (e.g. ``adapters/`` of another run), a model config that is not the
            one saved, or a backbone checkpoint that is missing or changed. The message
            names the file.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise RunManifestError(
            f"{path} not found: the run cannot be checked (written by an older version, or not a finished run); "
            "load_segmentor(..., verify=False) or `vfm-adapters eval --no-verify` loads it unchecked")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise RunManifestError(f"{path} is not a valid run manifest ({error})") from None
    for name, digest in sorted(files.items()):
        target = directory / name
        if not target.is_file():
            raise RunManifestError(f"{target} is listed in {path} but missing: the run is incomplete "
                                   "(evaluating without it would give another model's results)")
        if file_sha256(target) != digest:
            raise RunManifestError(f"{target} does not match {path} (its content changed since the run was saved, "
                                   "or it comes from another run)")
    foreign = [name for name in present_run_files(directory) if name not in files]
    if foreign:
        raise RunManifestError(f"{directory / foreign[0]} is not part of the run saved in {path} "
                               f"(unlisted file(s): {foreign[:5]}); remove it or restore the run")
    if model_config is not None and manifest.get("config_sha256") != config_sha256(model_config):
        raise RunManifestError(f"the model config in {directory / 'segmentor.json'} is not the one recorded in {path}")
    backbone = manifest.get("backbone_checkpoint")
    if backbone:
        resolved = resolve_checkpoint_path(backbone["path"], directory)
        if not resolved.is_file():
            raise RunManifestError(f"backbone checkpoint {resolved} (recorded as {backbone['path']!r} in {path}) "
                                   "not found")
        if backbone.get("sha256") is None:
            raise RunManifestError(f"backbone checkpoint {resolved} was missing when the run was saved, so {path} "
                                   "holds no hash to check it against; load with verify=False (--no-verify) if it is "
                                   "the file the run was trained with")
        if file_sha256(resolved) != backbone["sha256"]:
            raise RunManifestError(f"backbone checkpoint {resolved} changed since the run was saved "
                                   f"(its SHA-256 differs from {path}): the adapters were trained on other weights")
    return manifest
