"""Checks shared by the domain-conditioned methods (Domino and domain_rein)."""

from __future__ import annotations

from torch import Tensor

from .base import AdapterError


def positive_int(owner: str, name: str, value: object) -> None:
    """Raises ``ValueError`` naming ``owner.name`` unless ``value`` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def checked_embedding(embedding: Tensor | None, width: int, owner: str) -> Tensor | None:
    """``embedding`` if it is a ``(B, width)`` or ``(width,)`` tensor (or ``None``); else a clear error."""
    if embedding is None:
        return None
    if not isinstance(embedding, Tensor):
        raise AdapterError(f"the domain embedding must be a tensor (B, d), got {type(embedding).__name__}")
    if embedding.ndim not in (1, 2) or embedding.shape[-1] != width:
        raise AdapterError(
            f"{owner} expects a domain embedding of width {width}, shape (B, {width}) or ({width},); "
            f"got shape {tuple(embedding.shape)}"
        )
    return embedding
