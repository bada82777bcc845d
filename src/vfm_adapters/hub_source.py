"""Where adapters named by a local directory or a Hugging Face Hub id are on disk.

Kept apart from :mod:`vfm_adapters.hub` (pushing, ``save_pretrained``/``from_pretrained``)
so that :func:`vfm_adapters.load_adapters` can resolve a Hub id without importing the
module that itself saves adapters: the two never import each other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ._adapter_files import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["ADAPTER_FILES", "LIBRARY_NAME", "resolve_adapter_source"]

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
"""The files an adapter repository must hold; downloaded and uploaded together."""

LIBRARY_NAME = "vfm_adapters"
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def _library_version() -> str:
    from . import __version__

    return __version__


def _hub_id_problem(source: str) -> str | None:
    """Why ``source`` cannot be a Hub repo id, or ``None`` if it can."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as error:
        return str(error)
    return None


def _offline_reason() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "the Hub is offline (HF_HUB_OFFLINE is set)"
    return "the Hub could not be reached"


def _hub_failure(repo_id: str, revision: str | None, filename: str, error: Exception) -> str:
    """A sentence saying what went wrong on the Hub side (or with its cache)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(error, LocalEntryNotFoundError):  # before EntryNotFoundError: it is a subclass
        return (
            f"{_offline_reason()} and {filename} of {repo_id!r}{at} is not in the local cache "
            f"({constants.HF_HUB_CACHE})"
        )
    if isinstance(error, GatedRepoError):
        return f"{repo_id!r} is a gated repository on the Hub: accept its terms and pass token=..."
    if isinstance(error, RepositoryNotFoundError):
        return f"{repo_id!r} was not found on the Hub (or it is private: pass token=...)"
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id!r} exists on the Hub but has no revision {revision!r}"
    if isinstance(error, EntryNotFoundError):
        return f"{repo_id!r}{at} exists on the Hub but holds no {filename}: it is not a vfm_adapters adapter repository"
    return f"fetching {filename} of {repo_id!r}{at} from the Hub failed ({type(error).__name__}: {error})"


def _local_directory(source: str | os.PathLike, revision: str | None) -> Path | None:
    """``source`` as a local directory (which always wins over a Hub id of the same
    spelling), or ``None``; a ``revision`` given with a local directory is an error."""
    path = Path(source)
    if not path.is_dir():
        return None
    if revision is not None:
        raise ValueError(
            f"{str(source)!r} is a local directory, and a local directory always wins over a Hub id of the same "
            f"spelling; revision={revision!r} applies to Hub ids only (move or rename the directory to load from the Hub)"
        )
    return path


def resolve_adapter_source(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local directory that holds the adapters named by ``source``.

    A local directory always wins over a Hub id of the same spelling. Anything else that
    is a valid Hub id is fetched through ``huggingface_hub`` (``adapter_config.json``
    first, then the weights pinned to the same commit), which reuses the local cache and
    honours ``HF_HUB_OFFLINE``.

    Args:
        source: A directory written by :func:`vfm_adapters.save_adapters`, or a Hub
            repository id such as ``"org/rein-dinov2-large"``.
        revision: Branch, tag or commit of a Hub repository (Hub ids only).
        token: Hugging Face token for private or gated repositories (Hub ids only).

    Returns:
        The directory (for a Hub id, the snapshot folder in the cache).

    Raises:
        FileNotFoundError: ``source`` is not a directory here and could not be fetched
            from the Hub; the message says both, and why the Hub failed (offline and not
            cached, no such repository or revision, no adapter files in it).
        ValueError: ``revision`` given for a local directory.

    Example:
        >>> import tempfile
        >>> here = tempfile.mkdtemp()
        >>> resolve_adapter_source(here) == Path(here)
        True
    """
    local = _local_directory(source, revision)
    if local is not None:
        return local
    path = Path(source)
    here = (
        f"{str(source)!r} is not a directory here"
        + (f" ({path.resolve()} is a file)" if path.exists() else "")
    )
    if not isinstance(source, str):
        raise FileNotFoundError(f"{here}; pass a directory written by vfm_adapters.save_adapters, or a Hub id 'org/name' as a string")
    problem = _hub_id_problem(source)
    if problem is not None:
        raise FileNotFoundError(f"{here}, and it is not a Hugging Face Hub id either ({problem})")

    from huggingface_hub import hf_hub_download

    options: dict[str, Any] = dict(token=token, library_name=LIBRARY_NAME, library_version=_library_version())
    pinned = revision
    snapshot: Path | None = None
    for filename in ADAPTER_FILES:
        try:
            local = Path(hf_hub_download(source, filename, revision=pinned, **options))
        except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear message
            raise FileNotFoundError(f"{here}, and {_hub_failure(source, revision, filename, error)}") from error
        if snapshot is None:
            snapshot = local.parent
            # Pin the weights to the commit the config came from, so a branch that moves
            # between the two downloads cannot pair files of different commits.
            if _COMMIT_HASH.match(snapshot.name):
                pinned = snapshot.name
        elif local.parent != snapshot:
            raise FileNotFoundError(
                f"{source!r}: {filename} resolved to {local.parent}, not beside {CONFIG_NAME} in {snapshot}; "
                "the cache is inconsistent"
            )
    assert snapshot is not None
    return snapshot
