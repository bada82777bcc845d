"""What a method needs to know about a host model, independent of any method.

A *host* is a model family (timm ``VisionTransformer``, transformers ``Dinov2Model`` ...).
A :class:`HostSpec` names where the blocks are, how many prefix tokens lead the token
sequence, how tokens are laid out, and which sub-modules of a block other methods attach
to. Methods read a ``HostSpec``; they never import timm or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

TokenLayout = Literal["BNC", "BHWC"]


class UnsupportedModelError(TypeError):
    """Raised when a module is not a ViT this library can attach to."""


@dataclass(frozen=True)
class BlockParts:
    """Dotted names, relative to one block, of the parts that methods attach to.

    Attributes:
        mlp: The module whose output is the MLP branch (AdaptFormer adds to it).
        mlp_input: The module whose *input* is the residual stream after attention
            (usually the block's second norm).
        qkv: A fused query/key/value ``nn.Linear``, or ``None``.
        q: Separate query projection, or ``None`` (likewise ``k`` and ``v``).
        attention: The attention module (holds ``qkv`` or ``q``/``k``/``v``).
    """

    mlp: str | None = None
    mlp_input: str | None = None
    qkv: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    attention: str | None = None


@dataclass
class HostSpec:
    """A description of one model instance, produced by a :class:`HostFamily`.

    Attributes:
        family: Registry name of the family, e.g. ``"timm.VisionTransformer"``.
        block_names: Qualified names (``model.get_submodule``) of the blocks, in order.
        embed_dim: Token width ``c``.
        num_prefix_tokens: Tokens before the patch tokens (CLS, registers, distillation).
        patch_size: Patch size in pixels (Rein's init uses it).
        layout: ``"BNC"`` for a token sequence, ``"BHWC"`` for spatial blocks (SAM).
        parts: Names of the parts of a block other methods need.
        global_blocks: Indices of global-attention blocks for windowed hosts (SAM).
        discovered: True when the description was inferred, not registered.
    """

    family: str
    block_names: list[str]
    embed_dim: int
    num_prefix_tokens: int
    patch_size: int
    layout: TokenLayout = "BNC"
    parts: BlockParts = field(default_factory=BlockParts)
    global_blocks: tuple[int, ...] | None = None
    discovered: bool = False

    @property
    def depth(self) -> int:
        return len(self.block_names)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(name) for name in self.block_names]

    def block_part(self, block: nn.Module, part: str) -> nn.Module:
        """Returns the named part of ``block``, or raises a clear error if the host has none."""
        path = getattr(self.parts, part)
        if path is None:
            raise UnsupportedModelError(
                f"host family {self.family!r} does not expose a block part {part!r}; "
                f"it exposes: {', '.join(k for k, v in vars(self.parts).items() if v)}"
            )
        return block.get_submodule(path)

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "depth": self.depth,
            "embed_dim": self.embed_dim,
            "num_prefix_tokens": self.num_prefix_tokens,
            "patch_size": self.patch_size,
            "layout": self.layout,
        }


@dataclass(frozen=True)
class HostFamily:
    """A registered model family: how to recognise an instance and describe it."""

    name: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module], HostSpec]
    example: str = ""


def patch_size_of(value: int | tuple[int, ...] | list[int]) -> int:
    """Normalises a patch size given as an int or a (h, w) pair; non-square is refused."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"non-square patches {tuple(value)} are not supported")
        return int(value[0])
    return int(value)


def module_names(model: nn.Module, container: nn.Module) -> list[str]:
    """Qualified names of the children of ``container`` inside ``model``."""
    prefix = next(name for name, module in model.named_modules() if module is container)
    return [f"{prefix}.{child}" if prefix else child for child, _ in container.named_children()]


def first_parameter(model: nn.Module) -> torch.Tensor:
    try:
        return next(model.parameters())
    except StopIteration as error:
        raise UnsupportedModelError(f"{type(model).__name__} has no parameters") from error
