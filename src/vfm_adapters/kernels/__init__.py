"""Rein's token-feature attention: the PyTorch reference and the dispatch between kernels.

``kernel="torch"`` runs :func:`rein_update_reference`; ``"triton"`` the fused Triton
kernels (:mod:`vfm_adapters.kernels.triton_rein`); ``"auto"`` picks Triton only where a GPU
measurement recorded here (:data:`TRITON_MEASURED_FASTER`) shows it faster than eager
PyTorch for that GPU family, dtype, width and token count. None is recorded yet (the
kernels have not run on a GPU), so ``"auto"`` means PyTorch and Triton is opt-in.

Dtype policy: Rein keeps its parameters in fp32 (master weights) and passes them to the
op as they are; the op casts. The PyTorch path casts them to the activations' dtype when
they differ and autocast is off (under autocast the matmuls cast themselves); the Triton
op reads ``W_t`` and the biases in fp32, and hands ``T``, ``U = V W_f^T`` and ``W_f`` to the
kernels in the dtype of the dot products (the activations' dtype, or the autocast dtype
for fp32 activations).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from .reference import rein_delta_reference, rein_update_reference

KERNELS = ("auto", "torch", "triton")

# (GPU name as torch.cuda.get_device_name reports it, dtype, width c, token count m) for
# which benchmarks/kernel.py measured the fused layer (forward + backward) faster than
# eager PyTorch. Empty: no GPU measurement exists yet.
TRITON_MEASURED_FASTER: frozenset[tuple[str, torch.dtype, int, int]] = frozenset()

_CHANNEL_MULTIPLE, _MAX_TOKENS = 16, 128  # the fused kernels' limits (checked by triton_rein too)


def unsupported_reason(width: int, tokens: int) -> str | None:
    """Why the fused kernels cannot take this width and token count, or ``None`` if they can.

    Example:
        >>> unsupported_reason(1024, 100) is None
        True
        >>> unsupported_reason(24, 100)
        'the width must be a multiple of 16, got 24'
    """
    if width < 1 or width % _CHANNEL_MULTIPLE:
        return f"the width must be a multiple of {_CHANNEL_MULTIPLE}, got {width}"
    if not 1 <= tokens <= _MAX_TOKENS:
        return f"at most {_MAX_TOKENS} tokens (and at least 1), got {tokens}"
    return None


def supports(width: int, tokens: int) -> bool:
    """Whether the fused Triton kernels accept a Rein layer of this width and token count.

    The public capability query (the kernels' own limits: width % 16 == 0, 1 <= m <= 128);
    it says nothing about whether Triton can run on this machine (see :func:`triton_can_run`).

    Example:
        >>> supports(1024, 100), supports(1024, 129), supports(1000, 100)
        (True, False, False)
    """
    return unsupported_reason(width, tokens) is None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and if not, why."""
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install triton)"
    if torch.cuda.is_available() or triton_interpreter_enabled():
        return True, ""
    return False, "no CUDA GPU is visible and the Triton interpreter is off (set TRITON_INTERPRET=1 to run on CPU)"


def check_kernel(kernel: str) -> str:
    """Validates a ``kernel=`` option; raises a clear error for one that cannot run here.

    Example:
        >>> check_kernel("torch")
        'torch'
        >>> check_kernel("cuda")
        Traceback (most recent call last):
        ...
        ValueError: kernel='cuda' is not one of 'auto', 'torch', 'triton'
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(repr(k) for k in KERNELS)}")
    if kernel == "triton":
        able, why = triton_can_run()
        if not able:
            raise RuntimeError(f"kernel='triton' cannot run on this machine: {why}; use kernel='torch' or 'auto'")
    return kernel


def triton_takes(feats: Tensor, tokens: Tensor) -> bool:
    """Whether the fused kernels accept these shapes and dtypes (c % 16 == 0, m <= 128, one token set)."""
    return (
        feats.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and tokens.ndim == 2
        and supports(feats.shape[-1], tokens.shape[0])
    )


def triton_measured_faster(device: torch.device, dtype: torch.dtype, width: int, tokens: int) -> bool:
    """Whether a recorded GPU measurement (:data:`TRITON_MEASURED_FASTER`) covers this case."""
    if device.type != "cuda" or not TRITON_MEASURED_FASTER:
        return False
    name = torch.cuda.get_device_name(device)
    return (name, dtype, width, tokens) in TRITON_MEASURED_FASTER


def resolve_kernel(kernel: str, feats: Tensor, tokens: Tensor | None = None) -> str:
    """The implementation that runs for these inputs.

    ``"auto"`` takes Triton only on CUDA, for shapes the kernels accept, and where a GPU
    measurement shows it faster (none recorded yet: PyTorch). Callers that run many layers
    resolve once per device and dtype (``Rein`` caches the answer) rather than per call.

    Example:
        >>> import torch
        >>> resolve_kernel("auto", torch.zeros(2, 5, 32), torch.zeros(3, 32))
        'torch'
    """
    if kernel == "auto":
        if not (feats.is_cuda and triton_can_run()[0]):
            return "torch"
        if tokens is not None and not triton_takes(feats, tokens):
            return "torch"
        m = tokens.shape[-2] if tokens is not None else 0
        return "triton" if triton_measured_faster(feats.device, feats.dtype, feats.shape[-1], m) else "torch"
    return kernel


def rein_update(
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    kernel: str = "torch",
    num_prefix_tokens: int = 0,
) -> Tensor:
    """One Rein layer update, ``f + s * df``, with the chosen implementation.

    The first ``num_prefix_tokens`` rows of dim -2 (CLS, registers) pass through
    unchanged; the Triton kernels read the patch rows in place and write the whole
    output in one buffer (no contiguous copy of the patches, no concatenation).

    Example:
        >>> import torch
        >>> f, t, w = torch.randn(2, 5, 8), torch.randn(3, 8), torch.randn(8, 8)
        >>> a = rein_update(f, t, w, None, w, None, torch.tensor(0.1), kernel="torch")
        >>> torch.allclose(a, rein_update_reference(f, t, w, None, w, None, torch.tensor(0.1)))
        True
    """
    # The fused kernels take one token set (m, c); per-image tokens (B, m, c) use PyTorch.
    if tokens.ndim == 2 and resolve_kernel(kernel, feats, tokens) == "triton":
        from .triton_rein import rein_update_triton

        return rein_update_triton(
            feats, tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias, scale,
            num_prefix_tokens=num_prefix_tokens,
        )
    params = (tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias)
    if not torch.is_autocast_enabled(feats.device.type):  # the op owns the casts (module docstring)
        params = tuple(None if p is None else p.to(feats.dtype) for p in params)
        scale = scale.to(feats.dtype)
    if num_prefix_tokens == 0:
        return rein_update_reference(feats, *params, scale)
    return rein_update_with_prefix(feats, *params, scale, num_prefix_tokens)


def rein_update_with_prefix(
    hidden: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    num_prefix_tokens: int,
) -> Tensor:
    """The PyTorch path with prefix tokens, without slicing: the update is computed for all
    rows and the prefix rows get a scale of zero, ``hidden + df * (s * [row >= prefix])``.

    Slicing ``hidden[:, prefix:]`` would copy the strided patches for the first matmul,
    allocate ``s * df`` and ``f + s * df`` and then a concatenated output, and in the
    backward pass materialise a zero-padded full-size gradient (``slice_backward``) for
    every use of the slice; the prefix rows here cost at most prefix / N extra work.

    Example:
        >>> import torch
        >>> h, t, w = torch.randn(2, 6, 8), torch.randn(3, 8), torch.randn(8, 8)
        >>> out = rein_update_with_prefix(h, t, w, None, w, None, torch.tensor(0.3), 2)
        >>> torch.equal(out[:, :2], h[:, :2])
        True
        >>> torch.allclose(out[:, 2:], rein_update_reference(h[:, 2:], t, w, None, w, None, torch.tensor(0.3)), atol=1e-5)
        True
    """
    rows = hidden.shape[-2]
    if not 0 <= num_prefix_tokens <= rows:
        raise ValueError(f"num_prefix_tokens must be in [0, {rows}] for hidden of shape {tuple(hidden.shape)}, "
                         f"got {num_prefix_tokens}")
    delta = rein_delta_reference(hidden, tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias)
    keep = (torch.arange(rows, device=hidden.device) >= num_prefix_tokens).to(hidden.dtype).unsqueeze(-1)
    return torch.addcmul(hidden, delta.to(hidden.dtype), scale.to(hidden.dtype) * keep)


__all__ = ["KERNELS", "TRITON_MEASURED_FASTER", "check_kernel", "supports", "unsupported_reason", "triton_measured_faster", "rein_delta_reference", "rein_update", "rein_update_reference",
           "rein_update_with_prefix", "resolve_kernel", "triton_can_run", "triton_takes"]
