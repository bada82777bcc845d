"""domain_rein: Rein's tokens conditioned on a domain embedding (an extension of this library).

Every Rein token of every refined layer is shifted per image by ``+/- P W``, ``W`` the
batch's domain embedding (:mod:`vfm_adapters.domain`) and ``P`` a learned,
zero-initialised projection: the Add/Sub conditioning of "Domain-Aware Fine-Tuning of
Foundation Models" (Kaplan et al.), applied to Rein's tokens instead of a diffusion
model's prompts. It is in neither paper and off by default.

It attaches through Rein's public seams only: :meth:`Rein.set_token_shift` /
:attr:`Rein.token_shift` and :func:`rein_blocks`. The batch's ``W`` is handed over
with :func:`vfm_adapters.set_domain_embedding`, as for Domino.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._conditioning import checked_embedding, positive_int
from .base import AdapterError, AdapterMethod, Attachment, MethodConfig, inject, injection_state, register_method
from .rein import Rein, rein_blocks

__all__ = ["DomainReinConfig", "DomainReinShift", "inject_domain_rein"]



@dataclass
class DomainReinConfig(MethodConfig):
    """Options of the domain-conditioned Rein (an extension of this library).

    Attributes:
        embed_dim: Width ``d`` of the domain embedding.
        mode: ``"add"`` (tokens + P W) or ``"sub"`` (tokens - P W), after the paper's
            Domino-Add / Domino-Sub.
    """

    embed_dim: int
    mode: str = "sub"

    def __post_init__(self) -> None:
        positive_int("DomainReinConfig", "embed_dim", self.embed_dim)
        if self.mode not in ("add", "sub"):
            raise ValueError(f"DomainReinConfig.mode must be 'add' or 'sub', got {self.mode!r}")


class DomainReinShift(nn.Module):
    """The per-image offset ``+/- P W`` of Rein's tokens, ``P`` a zero-initialised Linear(d, c).

    Example:
        >>> import torch
        >>> shift = DomainReinShift(embed_dim=6, token_dim=4, mode="sub")
        >>> shift.set_domain_embedding(torch.randn(3, 6))
        >>> shift(layer=0).shape, bool(shift(layer=0).abs().sum() == 0)
        (torch.Size([3, 1, 4]), True)
    """

    def __init__(self, embed_dim: int, token_dim: int, mode: str = "sub", device: torch.device | None = None) -> None:
        super().__init__()
        if mode not in ("add", "sub"):
            raise ValueError(f"mode must be 'add' or 'sub', got {mode!r}")
        self.embed_dim, self.token_dim, self.mode = embed_dim, token_dim, mode
        self.projection = nn.Linear(embed_dim, token_dim, device=device)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        self._domain_embedding: Tensor | None = None

    def set_domain_embedding(self, embedding: Tensor | None) -> None:
        """Sets the batch's domain embedding ``W`` (B, d) or (d,); ``None`` clears it."""
        self._domain_embedding = checked_embedding(embedding, self.embed_dim, "domain_rein")

    def embedding(self) -> Tensor:
        if self._domain_embedding is None:
            raise AdapterError(
                "domain_rein has no domain embedding: call vfm_adapters.set_domain_embedding(model, W) "
                "with W (B, d) before the forward pass"
            )
        return self._domain_embedding

    def forward(self, layer: int) -> Tensor:
        """The offset (B, 1, c) added to every token of layer ``layer`` (the same for all layers)."""
        embedding = self.embedding()
        offset = self.projection(embedding.to(self.projection.weight.dtype))
        if offset.ndim == 1:
            offset = offset.unsqueeze(0)
        offset = offset[:, None, :]
        return offset if self.mode == "add" else -offset

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, token_dim={self.token_dim}, mode={self.mode!r}"


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    for value in (*args, kwargs.get("hidden_states"), kwargs.get("x")):
        if isinstance(value, Tensor):
            return value
    return None


class _ClearTokenShift:
    """Undo step: removes the token shift from a Rein (an object, see :class:`_SetChild`)."""

    def __init__(self, rein: nn.Module) -> None:
        self.rein = rein

    def __call__(self) -> None:
        self.rein.set_token_shift(None)


class _BatchCheck:
    """Forward pre-hook: the domain embedding's batch must match the features' batch.

    Per-image tokens broadcast, so a mismatch (W of one image for a batch of two) would
    otherwise pass silently. An object, so a deep copy checks its own embedding.
    """

    def __init__(self, shift: DomainReinShift) -> None:
        self.shift = shift

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        embedding = self.shift.embedding()
        hidden = _first_tensor(args, kwargs)
        if hidden is not None and embedding.ndim == 2 and embedding.shape[0] != hidden.shape[0]:
            raise AdapterError(
                f"the domain embedding is for a batch of {embedding.shape[0]} images but the model runs "
                f"{hidden.shape[0]}: call set_domain_embedding with this batch's embeddings"
            )


class DomainReinMethod(AdapterMethod):
    name = "domain_rein"
    config_class = DomainReinConfig
    requires = ("rein",)

    def _rein(self, model: nn.Module) -> Rein:
        state = injection_state(model)
        container = getattr(model, "vfm_adapters", None)
        if state is None or "rein" not in state.configs or container is None or "rein" not in container:
            raise AdapterError(
                "domain_rein conditions Rein's tokens and needs Rein: call vfm_adapters.inject_rein(model) first"
            )
        if not isinstance(container["rein"], Rein):
            raise AdapterError(
                "domain_rein supports Rein on plain ViTs; this model's Rein is stage-wise "
                f"({type(container['rein']).__name__}, a hierarchical host), which it does not condition"
            )
        return container["rein"]

    def check(self, model: nn.Module, host: object, config: DomainReinConfig) -> None:
        rein = self._rein(model)
        if rein.token_shift is not None:
            raise AdapterError("this model's Rein already has a token shift installed; remove it first")

    def attach(self, model: nn.Module, host: object, config: DomainReinConfig, attachment: Attachment) -> None:
        rein = self._rein(model)
        shift = DomainReinShift(config.embed_dim, rein.embed_dim, config.mode, device=rein.token_to_feature.weight.device)
        attachment.module = shift
        # A bound method, not the module: Rein must not adopt the shift as a child module
        # (its parameters belong to, and are saved with, this method).
        rein.set_token_shift(shift.__call__)
        attachment.undo.append(_ClearTokenShift(rein))

        # Per-image tokens broadcast, so a batch mismatch (e.g. W of one image for a batch
        # of two) would silently pass: check the batch before the first refined block.
        blocks = rein_blocks(model)
        if blocks and host is not None:
            first = host.blocks(model)[blocks[0]]
            attachment.handles.append(first.register_forward_pre_hook(_BatchCheck(shift), with_kwargs=True))


register_method(DomainReinMethod())


def inject_domain_rein(
    model: nn.Module, *, embed_dim: int, mode: str = "sub", freeze_host: bool = True
) -> nn.Module:
    """Conditions the Rein of ``model`` on the domain embedding (an extension, off by default).

    Every Rein token of every layer is shifted per image by ``+ P W`` (``mode="add"``)
    or ``- P W`` (``"sub"``), ``P`` a learned ``Linear(d, c)`` initialised to zero so the
    model starts unchanged. This carries the paper's Domino-Add/Sub conditioning of the
    prompt pathway over to Rein's tokens; it is not in either paper. Call
    :func:`set_domain_embedding` with the batch's ``W`` before each forward pass.

    Args:
        model: A ViT with Rein injected (:func:`vfm_adapters.inject_rein`).
        embed_dim: Width ``d`` of the domain embedding.
        mode: ``"add"`` or ``"sub"``.
        freeze_host: Freeze every parameter that is not an adapter's.

    Returns:
        ``model``.

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=2,
        ...     embed_dim=64, num_heads=2, img_size=56), token_length=4, rank=2)
        >>> vit = va.inject_domain_rein(vit, embed_dim=16, mode="sub")
        >>> _ = va.set_domain_embedding(vit, torch.randn(2, 16))
        >>> vit.forward_features(torch.randn(2, 3, 56, 56)).shape
        torch.Size([2, 17, 64])
    """
    return inject(model, "domain_rein", DomainReinConfig(embed_dim=embed_dim, mode=mode), freeze_host=freeze_host)
