"""VPT (Jia et al., "Visual Prompt Tuning", ECCV 2022): learnable prompt tokens in the sequence.

Deep VPT (the default, the Rein paper's baseline): before each block, ``m`` learnable
prompt tokens of that block are inserted after the prefix tokens (CLS, registers,
distillation token), ``[prefix, prompts, patches]``; after the block the prompt positions
are dropped again, so every block's output has the host's own length and layout
(``forward_intermediates``, decode heads and other methods see no difference in shape).
Shallow VPT (``deep=False``): one set of prompts is inserted before the first block, kept
through every block and dropped after the last one.

The attachment is a forward pre-hook (with kwargs, as transformers layers take
``hidden_states`` positionally or by name) and a forward hook on each block.

Hosts that apply rotary position embeddings (RoPE) to the tokens after their prefix
(timm EVA02: ``EvaAttention`` rotates ``q[:, :, num_prefix_tokens:]``) would otherwise
rotate the prompts with the patch positions: while a block holds prompts, its
attention's own ``num_prefix_tokens`` is raised by ``m``, so RoPE still meets exactly the
patch tokens, and restored after the block (also if the block raises).

Spatial hosts (SAM: ``(B, H, W, C)`` blocks) have no token sequence to extend; VPT
refuses them before changing anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..hosts import HostSpec, UnsupportedModelError
from .base import AdapterMethod, Attachment, MethodConfig, inject, register_method


@dataclass
class VPTConfig(MethodConfig):
    """VPT's options; the defaults are the Rein paper's VPT baseline (3,686,400 on DINOv2-L).

    Attributes:
        num_tokens: Prompt tokens per block (deep) or in total (shallow), ``m`` (150).
        deep: New prompts before every block (True) or one set before the first (False).
        patch_size: Patch size in the init bound; ``None`` takes the host's.
    """

    num_tokens: int = 150
    deep: bool = True
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"VPTConfig.num_tokens must be a positive integer (e.g. 10, 50, 150), got {self.num_tokens!r}")
        if not isinstance(self.deep, bool):
            raise ValueError(f"VPTConfig.deep must be True (prompts before every block) or False (shallow), got {self.deep!r}")
        if self.patch_size is not None and (
            isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) or self.patch_size < 1
        ):
            raise ValueError(f"VPTConfig.patch_size must be None or a positive integer, got {self.patch_size!r}")


def vpt_init_bound(patch_size: int, embed_dim: int) -> float:
    """VPT's uniform init bound ``sqrt(6 / (3 p^2 + c))``.

    Jia et al., "Visual Prompt Tuning" (ECCV 2022), Sec. 3 / appendix: prompts are
    initialised with Xavier uniform over the patch-embedding fan-in ``3 * p * p`` (RGB
    patch) and fan-out ``c``.

    Example:
        >>> round(vpt_init_bound(14, 1024), 4)
        0.061
    """
    return math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))


class VisualPrompts(nn.Module):
    """The prompt tokens of one model: ``(L, m, c)`` for deep VPT, ``(1, m, c)`` shallow.

    Example:
        >>> prompts = VisualPrompts(24, 1024, VPTConfig(), patch_size=14, device="meta")
        >>> sum(p.numel() for p in prompts.parameters())
        3686400
    """

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        config: VPTConfig,
        patch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config, self.embed_dim = config, embed_dim
        sets = num_layers if config.deep else 1
        self.prompts = nn.Parameter(torch.empty(sets, config.num_tokens, embed_dim, device=device, dtype=dtype))
        bound = vpt_init_bound(patch_size, embed_dim)
        nn.init.uniform_(self.prompts, -bound, bound)

    def insert(self, hidden: Tensor, index: int, num_prefix_tokens: int) -> Tensor:
        """``[prefix, prompts[index], rest]`` for a (B, N, C) sequence."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.embed_dim:
            raise RuntimeError(
                f"VPT expected a (B, N, {self.embed_dim}) token sequence at the block input, got shape {tuple(hidden.shape)}"
            )
        prompts = self.prompts[index].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return torch.cat([hidden[:, :num_prefix_tokens], prompts, hidden[:, num_prefix_tokens:]], dim=1)

    def drop(self, hidden: Tensor, num_prefix_tokens: int) -> Tensor:
        """Removes the prompt positions again."""
        m = self.config.num_tokens
        return torch.cat([hidden[:, :num_prefix_tokens], hidden[:, num_prefix_tokens + m :]], dim=1)

    def extra_repr(self) -> str:
        return f"sets={self.prompts.shape[0]}, tokens={self.config.num_tokens}, width={self.embed_dim}, deep={self.config.deep}"


_HIDDEN_NAMES = ("hidden_states", "x", "hidden_state")


def _check_no_mask(args: tuple, kwargs: dict) -> None:
    masks = [v for k, v in kwargs.items() if "mask" in k and isinstance(v, Tensor)]
    masks += [v for v in args[1:] if isinstance(v, Tensor)]
    if masks:
        raise RuntimeError(
            "VPT cannot extend an attention mask passed to a block; run the model without one "
            "(vision transformers need none)"
        )


def _replace_hidden(args: tuple, kwargs: dict, update) -> tuple[tuple, dict]:
    if args:
        return (update(args[0]), *args[1:]), kwargs
    for name in _HIDDEN_NAMES:
        if name in kwargs:
            return args, {**kwargs, name: update(kwargs[name])}
    raise RuntimeError(f"VPT found no hidden states among the block's arguments (kwargs: {sorted(kwargs)})")


def _map_output(output: Any, update) -> Any:
    # transformers layers may return a tuple whose first item is the hidden state.
    if isinstance(output, tuple):
        return (update(output[0]), *output[1:])
    return update(output)


# Hooks are objects rather than closures, so ``copy.deepcopy(model)`` (an EMA teacher)
# maps them to the copy's prompts and attention modules instead of the original's.


class _InsertPrompts:
    """Forward pre-hook on a block: ``[prefix, prompts[index], rest]``."""

    def __init__(self, prompts: VisualPrompts, index: int, num_prefix_tokens: int) -> None:
        self.prompts, self.index, self.num_prefix_tokens = prompts, index, num_prefix_tokens

    def _insert(self, hidden: Tensor) -> Tensor:
        return self.prompts.insert(hidden, self.index, self.num_prefix_tokens)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        _check_no_mask(args, kwargs)
        return _replace_hidden(args, kwargs, self._insert)


class _DropPrompts:
    """Forward hook on a block: removes the prompt positions from its output."""

    def __init__(self, prompts: VisualPrompts, num_prefix_tokens: int) -> None:
        self.prompts, self.num_prefix_tokens = prompts, num_prefix_tokens

    def _drop(self, hidden: Tensor) -> Tensor:
        return self.prompts.drop(hidden, self.num_prefix_tokens)

    def __call__(self, module: nn.Module, args: tuple, output: Any):
        return _map_output(output, self._drop)


def _rope_prefix_attention(host: HostSpec, block: nn.Module) -> nn.Module | None:
    """The block's attention if it keeps its own prefix count (RoPE skips those tokens)."""
    if host.parts.attention is None:
        return None
    attention = block.get_submodule(host.parts.attention)
    value = getattr(attention, "num_prefix_tokens", None)
    return attention if isinstance(value, int) and not isinstance(value, bool) else None


class _PrefixCount:
    """Sets an attention's ``num_prefix_tokens``: raised while a block holds prompts.

    Used as the block's forward pre-hook (``raise_``), its always-called forward hook and
    the undo step (``restore``).
    """

    def __init__(self, attention: nn.Module, extra: int) -> None:
        self.attention, self.original, self.extra = attention, attention.num_prefix_tokens, extra

    def raise_(self, module: nn.Module, args: tuple) -> None:
        self.attention.num_prefix_tokens = self.original + self.extra

    def restore(self, *unused: Any) -> None:
        self.attention.num_prefix_tokens = self.original


class VPTMethod(AdapterMethod):
    name = "vpt"
    config_class = VPTConfig

    def check(self, model: nn.Module, host: HostSpec, config: VPTConfig) -> None:
        if host.hierarchical:
            raise UnsupportedModelError(
                f"VPT inserts prompt tokens into one token sequence of fixed width, but host family {host.family!r} is "
                f"hierarchical: its stages change width ({', '.join(str(s.width) for s in host.stages or ())}) and run "
                f"on {'(B, C, H, W)' if host.layout == 'NCHW' else '(B, H, W, C)'} maps, which have no sequence to "
                "extend. Use Rein on this host (or LoRA/AdaptFormer where its blocks have attention/an MLP)."
            )
        if host.layout != "BNC":
            raise UnsupportedModelError(
                f"VPT inserts prompt tokens into a token sequence (B, N, C), but host family {host.family!r} runs its "
                f"blocks on spatial (B, H, W, C) feature maps (layout {host.layout!r}, e.g. SAM), which have no sequence "
                "to extend. Use Rein, LoRA or AdaptFormer on this host."
            )

    def attach(self, model: nn.Module, host: HostSpec, config: VPTConfig, attachment: Attachment) -> None:
        reference = next(model.parameters())
        prompts = VisualPrompts(
            num_layers=host.depth,
            embed_dim=host.embed_dim,
            config=config,
            patch_size=config.patch_size or host.patch_size,
            device=reference.device,
            dtype=reference.dtype if reference.is_floating_point() else None,
        )
        attachment.module = prompts
        npt = host.num_prefix_tokens
        blocks = host.blocks(model)
        rope_blocks = []
        for index, block in enumerate(blocks):
            attention = _rope_prefix_attention(host, block)
            if attention is not None:
                # Registered first, so the count is raised before the block runs and restored
                # after it even when the block raises (always_call).
                count = _PrefixCount(attention, config.num_tokens)
                attachment.undo.append(count.restore)
                attachment.handles.append(block.register_forward_pre_hook(count.raise_))
                attachment.handles.append(block.register_forward_hook(count.restore, always_call=True))
                rope_blocks.append(index)
            if config.deep or index == 0:
                hook = _InsertPrompts(prompts, index if config.deep else 0, npt)
                attachment.handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
            if config.deep or index == len(blocks) - 1:
                attachment.handles.append(block.register_forward_hook(_DropPrompts(prompts, npt)))
        attachment.extra["prefix_raised_blocks"] = rope_blocks


register_method(VPTMethod())


def inject_vpt(
    model: nn.Module,
    *,
    num_tokens: int = 150,
    deep: bool = True,
    patch_size: int | None = None,
    freeze_host: bool = True,
    trainable: Sequence[str] | str | None = None,
) -> nn.Module:
    """Adds VPT prompt tokens to a ViT, in place, and freezes the host.

    The defaults are the Rein paper's VPT baseline: deep prompts, 150 per block, inserted
    after the prefix tokens before each block and dropped after it (3,686,400 trainable
    parameters on DINOv2-L). Prompts start uniform in ``+-sqrt(6 / (3 p^2 + c))`` (VPT's
    Xavier init). The model's outputs keep their shapes.

    Args:
        model: A supported ViT with a token sequence (not SAM's spatial blocks).
        num_tokens: Prompt tokens per block (deep) or in total (shallow).
        deep: Prompts before every block (True), or one set before the first block (False).
        patch_size: Patch size for the init bound; default the host's.
        freeze_host: Freeze every parameter that is not an adapter's.
        trainable: Module-name prefixes that stay trainable when the host is frozen
            (e.g. ``["head"]``; see :func:`vfm_adapters.methods.base.inject`).

    Returns:
        ``model``, now carrying VPT.

    Raises:
        ValueError: An invalid option (e.g. ``num_tokens=0``).
        UnsupportedModelError: A host without a token sequence (SAM), or not a ViT.

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> vit = va.inject_vpt(vit, num_tokens=10)
        >>> va.trainable_parameters(vit), vit.forward_features(torch.randn(1, 3, 56, 56)).shape
        (1280, torch.Size([1, 17, 64]))
        >>> with torch.device("meta"):
        ...     big = timm.create_model("vit_large_patch14_dinov2")
        >>> va.trainable_parameters(va.inject_vpt(big))
        3686400
    """
    config = VPTConfig(num_tokens=num_tokens, deep=deep, patch_size=patch_size)
    return inject(model, "vpt", config, freeze_host=freeze_host, trainable=trainable)
