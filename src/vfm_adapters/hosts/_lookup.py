"""Small helpers for finding sub-modules whose names differ between library versions."""

from __future__ import annotations

import sys

from torch import nn


def first_path(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    """The first dotted name in ``candidates`` that exists under ``module``."""
    for path in candidates:
        try:
            module.get_submodule(path)
        except AttributeError:
            continue
        return path
    return None


def require_path(module: nn.Module, candidates: tuple[str, ...], what: str) -> str:
    path = first_path(module, candidates)
    if path is None:
        from .base import UnsupportedModelError

        raise UnsupportedModelError(
            f"{type(module).__name__}: could not find its {what} (looked for {', '.join(candidates)})"
        )
    return path


def transformers_spec(
    model: nn.Module,
    family: str,
    block_paths: tuple[str, ...],
    part_paths: dict[str, tuple[str, ...]],
    num_prefix_tokens: int,
    layout: str = "BNC",
    global_blocks: tuple[int, ...] | None = None,
    config=None,
):
    """Builds a :class:`HostSpec` for a transformers model from candidate module paths.

    transformers renames modules between major versions (``encoder.layer`` became
    ``layers``, ``attention.attention.query`` became ``attention.q_proj``), so each
    family lists every spelling it knows and the first one present wins.
    """
    from .base import BlockParts, HostSpec, module_names

    container_path = require_path(model, block_paths, "stack of blocks")
    container = model.get_submodule(container_path)
    first_block = container[0]
    parts = {name: first_path(first_block, paths) for name, paths in part_paths.items()}
    config = config if config is not None else model.config
    return HostSpec(
        family=family,
        block_names=module_names(model, container),
        embed_dim=int(config.hidden_size),
        num_prefix_tokens=num_prefix_tokens,
        patch_size=int(config.patch_size),
        layout=layout,  # type: ignore[arg-type]
        parts=BlockParts(**parts),
        global_blocks=global_blocks,
    )


def is_instance_of(model: nn.Module, class_names: tuple[str, ...]) -> bool:
    """True if ``model`` is an instance of one of the named transformers classes."""
    # A transformers model can only exist once transformers is imported; checking
    # sys.modules avoids a multi-second import when describing a timm model.
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    classes = tuple(getattr(transformers, name) for name in class_names if hasattr(transformers, name))
    return bool(classes) and isinstance(model, classes)
