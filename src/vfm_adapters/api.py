"""The one-call injectors users import as ``vfm_adapters.inject_*``."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .methods.base import inject
from .methods.rein import ReinConfig


def inject_rein(
    model: nn.Module,
    *,
    token_length: int = 100,
    rank: int | None = 16,
    layers: Sequence[int] | str | None = None,
    query_dim: int = 256,
    link_queries: bool = True,
    scale_init: float = 1e-3,
    zero_init_delta: bool = False,
    patch_size: int | None = None,
    kernel: str = "auto",
    freeze_host: bool = True,
    trainable: Sequence[str] | str | None = None,
) -> nn.Module:
    """Adds Rein after the blocks of a ViT, in place, and freezes the host.

    The defaults are the paper's: 100 tokens of rank 16 after every block, the shared
    token-to-feature and delta layers, a learnable scale starting at 1e-3, and the
    query link for a Mask2Former head (2,990,081 trainable parameters on a ViT-L).
    Load pretrained host weights before injecting (host parameter names do not change,
    so loading with ``strict=False`` afterwards also works).

    Args:
        model: A supported timm or transformers ViT, or any discoverable ViT.
        token_length: Tokens per layer ``m``.
        rank: Rank of the tokens ``T = A B``; ``None`` for full-rank tokens.
        layers: Blocks to refine: ``None`` for all, a list of indices, or ``"global"``
            for a SAM host's global-attention blocks (the authors' released SAM setup).
        query_dim: Width of the object queries (see :func:`vfm_adapters.rein_queries`).
        link_queries: Create the query link layers (``transform``, ``merge``).
        scale_init: Initial learnable scale.
        zero_init_delta: Zero-initialise the delta layer and fix the scale to 1.
        patch_size: Patch size for the init bound; default the host's.
        kernel: ``"auto"``, ``"torch"`` or ``"triton"``.
        freeze_host: Freeze every parameter that is not an adapter's.
        trainable: Module-name prefixes that stay trainable when the host is frozen
            (e.g. ``["head"]``; see :func:`vfm_adapters.methods.base.inject`).

    Returns:
        ``model``, now carrying Rein.

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> vit = va.inject_rein(vit)
        >>> vit(torch.randn(1, 3, 56, 56)).shape
        torch.Size([1, 64])
        >>> # the paper's count on a ViT-L, instantly on the meta device
        >>> with torch.device("meta"):
        ...     big = timm.create_model("vit_large_patch14_dinov2")
        >>> va.trainable_parameters(va.inject_rein(big))
        2990081
    """
    config = ReinConfig(
        token_length=token_length,
        rank=rank,
        layers=layers,
        query_dim=query_dim,
        link_queries=link_queries,
        scale_init=scale_init,
        zero_init_delta=zero_init_delta,
        patch_size=patch_size,
        kernel=kernel,
    )
    return inject(model, "rein", config, freeze_host=freeze_host, trainable=trainable)
