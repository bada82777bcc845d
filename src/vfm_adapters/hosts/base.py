"""What a method needs to know about a host model, independent of any method.

A *host* is a model family (timm ``VisionTransformer``, transformers ``Dinov2Model`` ...).
A :class:`HostSpec` names where the blocks are, how many prefix tokens lead the token
sequence, how tokens are laid out, and which sub-modules of a block other methods attach
to. Methods read a ``HostSpec``; they never import timm or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

TokenLayout = Literal["BNC", "BHWC", "NCHW"]


class UnsupportedModelError(TypeError):
    """Raised when a module is not a model this library can attach to."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of a hierarchical backbone: consecutive blocks of one width and stride.

    Attributes:
        block_names: Qualified names of the stage's blocks, in order.
        width: Channels of every block output in the stage.
        stride: Input pixels per feature-map cell at this stage (4, 8, 16, 32).
    """

    block_names: tuple[str, ...]
    width: int
    stride: int

    @property
    def depth(self) -> int:
        return len(self.block_names)


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
        direct_weight_reads: The projections (``"qkv"``, ``"q"``, ``"k"``, ``"v"``) whose
            ``weight`` the attention reads itself (``F.linear(x, self.qkv.weight, bias)``,
            timm EVA02 with fused qkv and q/v biases) instead of calling the layer: a
            wrapper's ``forward`` never runs there, so a method that wraps the layer
            (LoRA) must act through its ``weight``.
    """

    mlp: str | None = None
    mlp_input: str | None = None
    qkv: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    attention: str | None = None
    direct_weight_reads: tuple[str, ...] = ()


@dataclass
class HostSpec:
    """A description of one model instance, produced by a :class:`HostFamily`.

    Attributes:
        family: Registry name of the family, e.g. ``"timm.VisionTransformer"``.
        block_names: Qualified names (``model.get_submodule``) of the blocks, in order.
        embed_dim: Token width ``c``.
        num_prefix_tokens: Tokens before the patch tokens (CLS, registers, distillation).
        patch_size: Patch size in pixels (Rein's init uses it).
        layout: ``"BNC"`` for a token sequence, ``"BHWC"`` for spatial blocks (SAM,
            Swin, SAM 2's Hiera), ``"NCHW"`` for convolutional blocks (ResNet, ConvNeXt).
        parts: Names of the parts of a block other methods need.
        global_blocks: Indices of global-attention blocks for windowed hosts (SAM).
        discovered: True when the description was inferred, not registered.
        stages: For a hierarchical (multi-stage) backbone, its stages in order; then
            ``block_names`` is every stage's blocks concatenated, ``embed_dim`` the last
            stage's width and ``patch_size`` the first stage's stride. ``None`` for a
            plain ViT whose blocks all share one width.
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
    stages: tuple[StageSpec, ...] | None = None

    @property
    def depth(self) -> int:
        return len(self.block_names)

    @property
    def hierarchical(self) -> bool:
        """True for a multi-stage backbone (widths change between stages)."""
        return self.stages is not None

    def block_widths(self) -> list[int]:
        """The output width of every block, in ``block_names`` order."""
        if self.stages is None:
            return [self.embed_dim] * self.depth
        return [stage.width for stage in self.stages for _ in stage.block_names]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(name) for name in self.block_names]

    def resolve_blocks(self, indices: Sequence[int], what: str = "block indices") -> list[int]:
        """Block indices with negative ones counted from the end (``-1`` is the last block).

        The one place block indices given by a user (Rein's ``layers``, the feature
        layers of a segmentor) are range-checked, as timm's ``feature_take_indices``.

        Raises:
            ValueError: an index is outside ``-depth..depth - 1``; ``what`` names the option.

        Example:
            >>> spec = HostSpec("toy", [f"blocks.{i}" for i in range(4)], 8, 1, 14)
            >>> spec.resolve_blocks([0, -1])
            [0, 3]
            >>> spec.resolve_blocks([4], "layers")
            Traceback (most recent call last):
            ...
            ValueError: layers [4] out of range: the host has 4 blocks (0..3, or -4..-1 from the end)
        """
        resolved = [i + self.depth if i < 0 else i for i in indices]
        bad = [i for i, j in zip(indices, resolved) if not 0 <= j < self.depth]
        if bad:
            raise ValueError(
                f"{what} {bad} out of range: the host has {self.depth} blocks "
                f"(0..{self.depth - 1}, or -{self.depth}..-1 from the end)"
            )
        return resolved

    def split_prefix(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``(prefix, patches)`` of a (B, N, C) token sequence: CLS/register tokens, then the rest.

        Example:
            >>> spec = HostSpec("toy", ["b"], 8, 2, 14)
            >>> prefix, patches = spec.split_prefix(torch.zeros(3, 2 + 16, 8))
            >>> tuple(prefix.shape), tuple(patches.shape)
            ((3, 2, 8), (3, 16, 8))
        """
        if self.layout != "BNC" or hidden.ndim != 3:
            raise ValueError(
                f"split_prefix takes a (B, N, C) token sequence of a host with layout 'BNC'; host {self.family!r} "
                f"has layout {self.layout!r} and the tensor has shape {tuple(hidden.shape)}"
            )
        return hidden[:, : self.num_prefix_tokens], hidden[:, self.num_prefix_tokens :]

    def join_prefix(self, prefix: Tensor, patches: Tensor) -> Tensor:
        """The inverse of :meth:`split_prefix`: ``prefix`` tokens, then ``patches``, along dim 1.

        Example:
            >>> spec = HostSpec("toy", ["b"], 8, 1, 14)
            >>> hidden = torch.randn(2, 1 + 4, 8)
            >>> torch.equal(spec.join_prefix(*spec.split_prefix(hidden)), hidden)
            True
        """
        if prefix.shape[1] != self.num_prefix_tokens:
            raise ValueError(
                f"host {self.family!r} has {self.num_prefix_tokens} prefix tokens; got {prefix.shape[1]}"
            )
        return torch.cat([prefix, patches], dim=1)

    def block_part(self, block: nn.Module, part: str) -> nn.Module:
        """Returns the named part of ``block``, or raises a clear error if the host has none."""
        path = getattr(self.parts, part)
        if path is None:
            raise UnsupportedModelError(
                f"host family {self.family!r} does not expose a block part {part!r}; "
                f"it exposes: {', '.join(k for k, v in vars(self.parts).items() if isinstance(v, str))}"
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
            **({"stages": [[s.depth, s.width, s.stride] for s in self.stages]} if self.stages else {}),
        }


@dataclass(frozen=True)
class HostFamily:
    """A registered model family: how to recognise an instance and describe it."""

    name: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module], HostSpec]
    example: str = ""


def stage_spec(
    family: str,
    stages: list[tuple[list[str], int, int]],
    layout: TokenLayout,
    parts: BlockParts | None = None,
) -> HostSpec:
    """Builds the :class:`HostSpec` of a hierarchical backbone from ``(block names, width, stride)`` per stage.

    Example:
        >>> spec = stage_spec("toy", [(["a.0", "a.1"], 8, 4), (["b.0"], 16, 8)], "NCHW")
        >>> spec.depth, spec.embed_dim, spec.patch_size, spec.block_widths()
        (3, 16, 4, [8, 8, 16])
    """
    described = tuple(StageSpec(tuple(names), int(width), int(stride)) for names, width, stride in stages)
    if not described or any(stage.depth == 0 for stage in described):
        raise UnsupportedModelError(f"{family}: every stage needs at least one block")
    return HostSpec(
        family=family,
        block_names=[name for stage in described for name in stage.block_names],
        embed_dim=described[-1].width,
        num_prefix_tokens=0,
        patch_size=described[0].stride,
        layout=layout,
        parts=parts or BlockParts(),
        stages=described,
    )


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

