"""Rein ("Stronger, Fewer, & Superior", CVPR 2024): learnable tokens refine each block's output.

After block ``i`` the patch tokens ``f`` attend to ``m`` learnable tokens
``T_i = A_i B_i`` (the low-rank "LoRA-Rein" variant behind every number in the paper),
and the result updates the features::

    S = softmax(f T_i^T / sqrt(c)); V = T_i[1:] W_t^T + b_t        (token 0 is a sink)
    f <- f + s * ((S[:, 1:] V + f) W_f^T + b_f)

``W_t, b_t, W_f, b_f`` and the scalar ``s`` (initialised to 1e-3) are shared by all
layers. Prefix tokens (CLS, registers) pass through unchanged. The tokens also produce
the object queries of a Mask2Former head (:meth:`Rein.queries`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..hosts import HostSpec
from ..kernels import check_kernel, rein_update, resolve_kernel
from .base import AdapterError, MethodConfig, injection_state


@dataclass
class ReinConfig(MethodConfig):
    """Rein's options; the defaults are the paper's (2,990,081 parameters on a ViT-L).

    Attributes:
        token_length: Learnable tokens per layer, ``m`` (100; equals the number of queries).
        rank: Rank ``r`` of ``T = A B``; ``None`` stores full-rank tokens ``T`` (m x c).
        layers: Block indices to refine; ``None`` means every block, ``"global"`` the
            global-attention blocks of a windowed host (SAM's released setup).
        query_dim: Width of the object queries produced for a decode head (256).
        link_queries: Create the ``transform``/``merge`` layers that make the queries.
        scale_init: Initial value of the learnable scale ``s`` (1e-3; 0.01 hurts).
        zero_init_delta: The variant that zero-initialises ``W_f, b_f`` and fixes ``s = 1``.
        patch_size: Patch size in the init bound; ``None`` takes the host's.
        kernel: ``"auto"`` (Triton only where a recorded GPU measurement shows it faster;
            none yet, so PyTorch), ``"torch"`` or ``"triton"`` (opt-in).
    """

    token_length: int = 100
    rank: int | None = 16
    layers: Sequence[int] | str | None = None
    query_dim: int = 256
    link_queries: bool = True
    scale_init: float = 1e-3
    zero_init_delta: bool = False
    patch_size: int | None = None
    kernel: str = "auto"

    runtime_fields: ClassVar[tuple[str, ...]] = ("kernel",)

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReinConfig.{name} must be a positive integer, got {value!r}")

        positive_int("token_length", self.token_length)
        positive_int("query_dim", self.query_dim)
        if self.rank is not None:
            positive_int("rank", self.rank)
        if self.patch_size is not None:
            positive_int("patch_size", self.patch_size)
        if not math.isfinite(self.scale_init):
            raise ValueError(f"ReinConfig.scale_init must be finite, got {self.scale_init!r}")
        if isinstance(self.layers, str):
            if self.layers != "global":
                raise ValueError(f"ReinConfig.layers must be None, 'global' or a list of block indices, got {self.layers!r}")
        elif self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ValueError(f"ReinConfig.layers must be a non-empty list of block indices, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"ReinConfig.layers has repeated blocks: {list(layers)}")
            self.layers = layers
        check_kernel(self.kernel)

    def block_indices(self, host: HostSpec) -> list[int]:
        """The host blocks this config refines, validated against the host."""
        if self.layers is None:
            return list(range(host.depth))
        if self.layers == "global":
            if not host.global_blocks:
                raise AdapterError(f"layers='global' needs a windowed host such as SAM; {host.family} has no global blocks")
            return list(host.global_blocks)
        try:
            return host.resolve_blocks(self.layers, "ReinConfig.layers")
        except ValueError as error:
            raise AdapterError(str(error)) from None


def rein_init_bound(patch_size: int, embed_dim: int, rank: int | None) -> float:
    """The uniform init bound of Rein's tokens (the Rein authors' released code).

    Example:
        >>> round(rein_init_bound(16, 1024, 16), 4)
        0.0818
    """
    fan = embed_dim if rank is None else math.sqrt(embed_dim * rank)
    return math.sqrt(6.0 / (3 * patch_size * patch_size + fan))


class Rein(nn.Module):
    """The Rein parameters of one model: per-layer tokens and the shared layers.

    Args:
        num_layers: Number of refined blocks ``L``.
        embed_dim: Token width ``c``.
        config: The options (see :class:`ReinConfig`).
        patch_size: Patch size used by the init bound.

    Example:
        >>> rein = Rein(num_layers=24, embed_dim=1024, config=ReinConfig(), patch_size=16,
        ...             device="meta")
        >>> sum(p.numel() for p in rein.parameters())
        2990081
    """

    def __init__(
        self,
        num_layers: int,
        embed_dim: int,
        config: ReinConfig,
        patch_size: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_layers, self.embed_dim, self.config = num_layers, embed_dim, config
        m, r, c = config.token_length, config.rank, embed_dim
        if r is None:
            self.tokens = nn.Parameter(torch.empty(num_layers, m, c, device=device))
        else:
            self.tokens_a = nn.Parameter(torch.empty(num_layers, m, r, device=device))
            self.tokens_b = nn.Parameter(torch.empty(num_layers, r, c, device=device))
        self.token_to_feature = nn.Linear(c, c, device=device)
        self.delta_feature = nn.Linear(c, c, device=device)
        if config.zero_init_delta:
            self.register_buffer("scale", torch.ones((), device=device))
        else:
            self.scale = nn.Parameter(torch.full((), float(config.scale_init), device=device))
        if config.link_queries:
            q = config.query_dim
            self.transform = nn.Linear(c, q, device=device)
            self.merge = nn.Linear(3 * q, q, device=device)
        self._init_tokens(patch_size)
        # An optional callable (layer -> (B, 1 or m, c) offset) that shifts the tokens per
        # image, e.g. by a projection of a domain embedding. Kept out of the module tree
        # so the method that sets it owns (and saves) its parameters.
        self._token_shift: Callable[[int], Tensor] | None = None

    @property
    def token_shift(self) -> Callable[[int], Tensor] | None:
        """The installed per-image token offset (see :meth:`set_token_shift`), or ``None``."""
        return self._token_shift

    def set_token_shift(self, shift: Callable[[int], Tensor] | None) -> None:
        """Installs (or, with ``None``, removes) a per-image offset of the tokens.

        This is the hook through which another method conditions Rein (``domain_rein``
        adds a projection of the domain embedding). ``shift(layer)`` returns an offset
        that broadcasts against ``(B, m, c)`` (e.g. ``(B, 1, c)``) and is added to the
        tokens ``T_layer`` of refined layer ``layer`` (0-based among refined layers)
        before the update. Rein does not adopt ``shift`` as a child module: its owner
        keeps and saves its parameters. A new shift replaces the installed one; a method
        that installs one should first check :attr:`token_shift` is ``None``.

        Example:
            >>> rein = Rein(2, 8, ReinConfig(token_length=4, rank=2), patch_size=4)
            >>> x = torch.randn(2, 9, 8)
            >>> rein.set_token_shift(lambda layer: torch.zeros(2, 1, 8))
            >>> rein.token_shift is not None, torch.equal(rein(x, layer=0), rein.refine(x, 0))
            (True, True)
            >>> rein.set_token_shift(None); rein.token_shift is None
            True
        """
        if shift is not None and not callable(shift):
            raise AdapterError(f"a token shift must be a callable layer -> offset, got {type(shift).__name__}")
        self._token_shift = shift

    def _init_tokens(self, patch_size: int) -> None:
        bound = rein_init_bound(patch_size, self.embed_dim, self.config.rank)
        for tensor in (self.tokens,) if self.config.rank is None else (self.tokens_a, self.tokens_b):
            nn.init.uniform_(tensor, -bound, bound)
        if self.config.zero_init_delta:
            nn.init.zeros_(self.delta_feature.weight)
            nn.init.zeros_(self.delta_feature.bias)

    def all_tokens(self) -> Tensor:
        """The tokens of every layer, (L, m, c)."""
        return self.tokens if self.config.rank is None else self.tokens_a @ self.tokens_b

    def layer_tokens(self, layer: int) -> Tensor:
        """The tokens ``T_layer`` (m, c) of one refined layer (0-based among refined layers)."""
        if self.config.rank is None:
            return self.tokens[layer]
        return self.tokens_a[layer] @ self.tokens_b[layer]

    def kernel_for(self, features: Tensor) -> str:
        """The implementation ``config.kernel`` resolves to for features like these.

        Decided once per (kernel option, device, dtype) and cached: ``"auto"``'s capability check does not
        run on every call of every block. Resolved at injection for the host's parameters.
        """
        cache = self.__dict__.setdefault("_kernel_cache", {})
        key = (self.config.kernel, features.device, features.dtype)
        if key not in cache:
            probe = features.new_empty((1, self.embed_dim))
            tokens = probe.new_empty((self.config.token_length, self.embed_dim))
            cache[key] = resolve_kernel(self.config.kernel, probe, tokens)
        return cache[key]

    def refine(self, patches: Tensor, layer: int, num_prefix_tokens: int = 0) -> Tensor:
        """Applies layer ``layer``'s update to tokens (..., n, c); the first
        ``num_prefix_tokens`` of them (CLS, registers) pass through unchanged.

        The parameters go to the op as they are (fp32 master weights); the op owns the
        casts (see :mod:`vfm_adapters.kernels`)."""
        tokens = self.layer_tokens(layer)
        if self._token_shift is not None:
            tokens = tokens + self._token_shift(layer)
        return rein_update(
            patches,
            tokens,
            self.token_to_feature.weight,
            self.token_to_feature.bias,
            self.delta_feature.weight,
            self.delta_feature.bias,
            self.scale,
            kernel=self.kernel_for(patches),
            num_prefix_tokens=num_prefix_tokens,
        )

    def forward(self, hidden: Tensor, layer: int, num_prefix_tokens: int = 0) -> Tensor:
        """Refines a block's output: (B, N, C) with prefix tokens first, or (B, H, W, C).

        Example:
            >>> rein = Rein(2, 8, ReinConfig(token_length=4, rank=2), patch_size=4)
            >>> rein(torch.randn(3, 1 + 9, 8), layer=0, num_prefix_tokens=1).shape
            torch.Size([3, 10, 8])
        """
        if hidden.shape[-1] != self.embed_dim:
            raise RuntimeError(f"Rein expected features of width {self.embed_dim}, got shape {tuple(hidden.shape)}")
        if hidden.ndim == 4:
            batch, height, width, channels = hidden.shape
            return self.refine(hidden.reshape(batch, height * width, channels), layer).reshape(hidden.shape)
        if hidden.ndim != 3:
            raise RuntimeError(f"Rein expected (B, N, C) or (B, H, W, C) features, got shape {tuple(hidden.shape)}")
        # The prefix goes to the op with the patches: the Triton kernels read the patch
        # rows in place and write one output (no contiguous copy, no torch.cat).
        return self.refine(hidden, layer, num_prefix_tokens)

    def queries(self) -> Tensor:
        """Object queries (m, query_dim) for a Mask2Former head, linked to the tokens.

        For every token: ``merge([max_l, mean_l, last_l] of transform(T_l))``.

        Example:
            >>> rein = Rein(3, 8, ReinConfig(token_length=5, rank=2, query_dim=6), patch_size=4)
            >>> rein.queries().shape
            torch.Size([5, 6])
        """
        if not self.config.link_queries:
            raise AdapterError("this Rein was created with link_queries=False and makes no queries")
        per_layer = self.transform(self.all_tokens())  # (L, m, q)
        stacked = torch.cat([per_layer.max(dim=0).values, per_layer.mean(dim=0), per_layer[-1]], dim=-1)
        return self.merge(stacked)

    def extra_repr(self) -> str:
        c = self.config
        return f"layers={self.num_layers}, width={self.embed_dim}, tokens={c.token_length}, rank={c.rank}"


class _ReinBlockHook:
    """The forward hook on one block.

    An object rather than a closure: ``copy.deepcopy(model)`` copies functions by
    reference, so a closure would make a copied model (an EMA teacher, say) call the
    original model's Rein. Deep-copying this object maps ``rein`` to the copy's Rein.
    """

    def __init__(self, rein: Rein, layer: int, num_prefix_tokens: int) -> None:
        self.rein, self.layer, self.num_prefix_tokens = rein, layer, num_prefix_tokens

    def __call__(self, module: nn.Module, args: tuple, output):
        # transformers layers return a tensor or a tuple whose first item is the hidden state.
        if isinstance(output, tuple):
            return (self.rein(output[0], self.layer, self.num_prefix_tokens), *output[1:])
        return self.rein(output, self.layer, self.num_prefix_tokens)


def rein_blocks(model: nn.Module) -> list[int]:
    """Indices (into the host's blocks) of the blocks refined by the Rein injected into ``model``.

    For a hierarchical host (one Rein per stage) every block is refined.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=3, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> rein_blocks(va.inject_rein(vit, layers=[0, -1]))
        [0, 2]
    """
    state = injection_state(model)
    if state is None or "rein" not in state.attachments:
        raise AdapterError("this model has no Rein injected; call vfm_adapters.inject_rein(model) first")
    return list(state.attachments["rein"].extra["blocks"])


def rein_queries(model: nn.Module) -> Tensor:
    """The (m, 256) object queries of the Rein injected into ``model``, for a decode head.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> va.rein_queries(va.inject_rein(vit)).shape
        torch.Size([100, 256])
    """
    container = getattr(model, "vfm_adapters", None)
    if container is None or "rein" not in container:
        raise AdapterError("this model has no Rein injected; call vfm_adapters.inject_rein(model) first")
    return container["rein"].queries()
