"""The fused Triton Rein layer as a ``torch.library`` custom op (forward and backward).

Same contract as :func:`vfm_adapters.kernels.reference.rein_update_reference`::

    S  = softmax(f T^T / sqrt(c));  V = T[1:] W_t^T + b_t
    out = f + s * ((S[:, 1:] V + f) W_f^T + b_f)

but computed as ``df = P U + f W_f^T + b_f`` with ``U = V W_f^T`` (a small (m-1) x c
product done here in fp32), so that one pass over f does the whole layer; see
``docs/kernels.md`` and :mod:`vfm_adapters.kernels._triton_kernels` for the kernels.

The op is ``torch.ops.vfm_adapters.rein_update`` with a fake (meta) implementation and an
autograd formula whose backward is a second custom op, so it runs in eager mode and
under ``torch.compile(fullgraph=True)``. Computation happens in ``feats``' dtype (fp32,
fp16 or bf16) with fp32 accumulation; every gradient comes back in its input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_kernels import (
    CHANNEL_MULTIPLE,
    MAX_TOKENS,
    launch_backward_reduce,
    launch_backward_rows,
    launch_forward,
    padded_tokens,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate_rein_inputs(
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
) -> None:
    """Raises ``ValueError`` for inputs the kernels cannot take, naming the offending one.

    Example:
        >>> import torch
        >>> f, t, w = torch.zeros(3, 24), torch.zeros(2, 24), torch.zeros(24, 24)
        >>> validate_rein_inputs(f, t, w, None, w, None, torch.tensor(1.0))
        Traceback (most recent call last):
        ...
        ValueError: rein_update_triton needs the channel count c to be a multiple of 16, got c=24
    """
    if feats.dim() < 2:
        raise ValueError(f"feats must have shape (..., n, c), got {tuple(feats.shape)}")
    channels = feats.shape[-1]
    if channels % CHANNEL_MULTIPLE != 0 or channels == 0:
        raise ValueError(
            f"rein_update_triton needs the channel count c to be a multiple of {CHANNEL_MULTIPLE}, got c={channels}"
        )
    if feats.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"feats must be float32, float16 or bfloat16, got {feats.dtype}")
    if tokens.dim() != 2 or tokens.shape[1] != channels or not 1 <= tokens.shape[0] <= MAX_TOKENS:
        raise ValueError(
            f"tokens must have shape (m, {channels}) with 1 <= m <= {MAX_TOKENS}, got {tuple(tokens.shape)}"
        )
    for name, weight in (("token_to_feature_weight", token_to_feature_weight), ("delta_weight", delta_weight)):
        if tuple(weight.shape) != (channels, channels):
            raise ValueError(f"{name} must have shape ({channels}, {channels}), got {tuple(weight.shape)}")
    for name, bias in (("token_to_feature_bias", token_to_feature_bias), ("delta_bias", delta_bias)):
        if bias is not None and tuple(bias.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) or be None, got {tuple(bias.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one value, got shape {tuple(scale.shape)}")
    tensors = [feats, tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias, scale]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    for tensor in tensors:
        if tensor is not None and not tensor.is_floating_point():
            raise ValueError(f"all inputs must be floating point, got {tensor.dtype}")


def _token_update(
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    m_pad: int,
) -> tuple[Tensor, Tensor]:
    """fp32 values ``V = T[1:] W_t^T + b_t`` and ``U = V W_f^T`` padded to (M_PAD, c), row 0 zero."""
    values = tokens[1:].float() @ token_to_feature_weight.float().t()
    if token_to_feature_bias is not None:
        values = values + token_to_feature_bias.float()
    padded = torch.zeros((m_pad, tokens.shape[1]), device=tokens.device, dtype=torch.float32)
    padded[1 : tokens.shape[0]] = values @ delta_weight.float().t()
    return values, padded


def autocast_compute_dtype(feats: Tensor) -> torch.dtype:
    """The dtype the dot products run in: the autocast dtype for fp32 activations inside an
    autocast region of their device type, else the activations' own dtype.

    Example:
        >>> import torch
        >>> autocast_compute_dtype(torch.zeros(2, 16))
        torch.float32
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_compute_dtype(torch.zeros(2, 16))
        torch.bfloat16
    """
    device_type = feats.device.type
    if feats.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return feats.dtype


def _dot_dtype(feats: Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """Only fp32 activations are computed in a narrower dtype; 16-bit ones compute in their own."""
    if compute_dtype is None or feats.dtype != torch.float32:
        return feats.dtype
    if compute_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
    return compute_dtype


def _as_images(x: Tensor) -> Tensor:
    """A (B, n, c) view of (..., n, c) activations with unit channel stride (a copy only
    when no such view exists)."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() > 3:
        x = x.reshape(-1, *x.shape[-2:])
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _check_prefix(feats: Tensor, num_prefix_tokens: int) -> None:
    if feats.dim() >= 2 and not 0 <= num_prefix_tokens <= feats.shape[-2]:
        raise ValueError(
            f"num_prefix_tokens must be in [0, {feats.shape[-2]}] for feats of shape {tuple(feats.shape)}, "
            f"got {num_prefix_tokens}"
        )


@torch.library.custom_op("vfm_adapters::rein_update", mutates_args=())
def rein_update_op(
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    num_prefix_tokens: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Forward of the fused Rein layer (see the module docstring)."""
    validate_rein_inputs(
        feats, tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias, scale
    )
    _check_prefix(feats, num_prefix_tokens)
    dot_dtype = _dot_dtype(feats, compute_dtype)
    prefix = num_prefix_tokens
    # The op may be called inside an autocast region: keep the small fp32 products fp32.
    with torch.autocast(device_type=feats.device.type, enabled=False):
        m_pad = padded_tokens(tokens.shape[0])
        _, token_update = _token_update(tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, m_pad)
        hidden = _as_images(feats)
        out = torch.empty(hidden.shape, device=feats.device, dtype=feats.dtype)
        if prefix:
            out[:, :prefix].copy_(hidden[:, :prefix])  # prefix tokens pass through
        launch_forward(
            hidden[:, prefix:],
            tokens.to(dot_dtype).contiguous(),
            token_update.to(dot_dtype),
            delta_weight.to(dot_dtype).contiguous(),
            None if delta_bias is None else delta_bias.contiguous(),
            scale.reshape(1).float(),
            out[:, prefix:],
            dot_dtype,
        )
    return out.view(feats.shape)


@rein_update_op.register_fake
def _rein_update_fake(
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    num_prefix_tokens: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    validate_rein_inputs(
        feats, tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias, scale
    )
    _check_prefix(feats, num_prefix_tokens)
    return torch.empty_like(feats, memory_format=torch.contiguous_format)


@torch.library.custom_op("vfm_adapters::rein_update_backward", mutates_args=())
def rein_update_backward_op(
    grad_out: Tensor,
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    num_prefix_tokens: int,
    compute_dtype: torch.dtype | None,
    need_parameter_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (feats, tokens, W_t, b_t, W_f, b_f, scale), each in its input's dtype.

    Bias gradients are returned (as sums over rows) even for a ``None`` bias; the autograd
    formula drops them. With ``need_parameter_grads=False`` only the feats gradient is
    computed (the others are zeros) and the reduction kernel is skipped. The feats gradient
    of the prefix tokens is the upstream gradient (they pass through unchanged).

    Derivation, with g = dL/dout, X = D + f, P = S[:, 1:], A = P^T g, K = g^T X:
        grad_f = g + s g W_f + dZ T / sqrt(c),  dZ = S * (dS - rowsum(S * dS)), dS[:, 1:] = s g U^T
        dW_f = s K = s (g^T f + A^T V),  db_f = s colsum(g),  ds = <K, W_f> + <colsum(g), b_f>
        dV = s A W_f,  dW_t = dV^T T[1:],  db_t = colsum(dV),  dT = dZ^T f / sqrt(c) + [0; dV W_t]
    """
    dtype = feats.dtype
    dot_dtype = _dot_dtype(feats, compute_dtype)
    channels = feats.shape[-1]
    n_tokens = tokens.shape[0]
    prefix = num_prefix_tokens
    with torch.autocast(device_type=feats.device.type, enabled=False):
        m_pad = padded_tokens(n_tokens)
        values, token_update = _token_update(tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, m_pad)
        hidden = _as_images(feats)
        grad_hidden = _as_images(grad_out.to(dtype))
        grad_feats = torch.empty(hidden.shape, device=feats.device, dtype=dtype)
        if prefix:
            grad_feats[:, :prefix].copy_(grad_hidden[:, :prefix])
        patches, grad_patches = hidden[:, prefix:], grad_hidden[:, prefix:]
        tokens_c = tokens.to(dot_dtype).contiguous()
        scale_f32 = scale.reshape(1).float()
        side = launch_backward_rows(
            patches, grad_patches, tokens_c, token_update.to(dot_dtype), delta_weight.to(dot_dtype).contiguous(),
            scale_f32, grad_feats[:, prefix:], dot_dtype,
        )
        grad_feats = grad_feats.view(feats.shape)
        if not need_parameter_grads:
            zeros = [torch.zeros_like(t) for t in (tokens, token_to_feature_weight, delta_weight, scale)]
            bias_zeros = [feats.new_zeros(channels, dtype=b.dtype if b is not None else w.dtype)
                          for b, w in ((token_to_feature_bias, token_to_feature_weight), (delta_bias, delta_weight))]
            return grad_feats, zeros[0], zeros[1], bias_zeros[0], zeros[2], bias_zeros[1], zeros[3]

        grad_feature_product, dscores_features, probs_grad = launch_backward_reduce(
            patches, grad_patches, side, dot_dtype
        )
        s = scale_f32[0]
        grad_colsum = probs_grad[0]  # from the ones in the sink column
        attended_grad = probs_grad[1:n_tokens]  # A = P^T g, ((m-1) x c)
        w_f = delta_weight.float()
        w_t = token_to_feature_weight.float()
        # K = g^T (D + f) = g^T f + A^T V
        grad_product = grad_feature_product + attended_grad.t() @ values
        grad_delta_weight = s * grad_product
        grad_delta_bias = s * grad_colsum
        grad_scale = (grad_product * w_f).sum()
        if delta_bias is not None:
            grad_scale = grad_scale + grad_colsum @ delta_bias.float()
        grad_values = s * (attended_grad @ w_f)  # dV = s A W_f
        grad_tt_weight = grad_values.t() @ tokens[1:].float()
        grad_tt_bias = grad_values.sum(0)
        grad_tokens = s * dscores_features[:n_tokens]
        grad_tokens[1:] += grad_values @ w_t

    def like(grad: Tensor, reference: Tensor | None, fallback: Tensor) -> Tensor:
        return grad.to((reference if reference is not None else fallback).dtype)

    return (
        grad_feats,
        grad_tokens.to(tokens.dtype),
        grad_tt_weight.to(token_to_feature_weight.dtype),
        like(grad_tt_bias, token_to_feature_bias, token_to_feature_weight),
        grad_delta_weight.to(delta_weight.dtype),
        like(grad_delta_bias, delta_bias, delta_weight),
        grad_scale.reshape(scale.shape).to(scale.dtype),
    )


@rein_update_backward_op.register_fake
def _rein_update_backward_fake(
    grad_out: Tensor,
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    num_prefix_tokens: int,
    compute_dtype: torch.dtype | None,
    need_parameter_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    channels = feats.shape[-1]
    tt_bias_dtype = (token_to_feature_bias if token_to_feature_bias is not None else token_to_feature_weight).dtype
    delta_bias_dtype = (delta_bias if delta_bias is not None else delta_weight).dtype
    return (
        torch.empty_like(feats, memory_format=torch.contiguous_format),
        torch.empty_like(tokens),
        torch.empty_like(token_to_feature_weight),
        feats.new_empty(channels, dtype=tt_bias_dtype),
        torch.empty_like(delta_weight),
        feats.new_empty(channels, dtype=delta_bias_dtype),
        torch.empty_like(scale),
    )


def _setup_context(ctx, inputs, output) -> None:
    feats, tokens, tt_weight, tt_bias, delta_weight, delta_bias, scale, num_prefix_tokens, compute_dtype = inputs
    ctx.num_prefix_tokens, ctx.compute_dtype = num_prefix_tokens, compute_dtype
    ctx.has_tt_bias = tt_bias is not None
    ctx.has_delta_bias = delta_bias is not None
    ctx.save_for_backward(feats, tokens, tt_weight, tt_bias, delta_weight, delta_bias, scale)


def _backward(ctx, grad_out: Tensor):
    feats, tokens, tt_weight, tt_bias, delta_weight, delta_bias, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = torch.ops.vfm_adapters.rein_update_backward(
        grad_out, feats, tokens, tt_weight, tt_bias, delta_weight, delta_bias, scale,
        ctx.num_prefix_tokens, ctx.compute_dtype, any(needs[1:7])
    )
    grads = list(grads)
    if not ctx.has_tt_bias:
        grads[3] = None
    if not ctx.has_delta_bias:
        grads[5] = None
    return (*(grad if need else None for grad, need in zip(grads, needs)), None, None)


rein_update_op.register_autograd(_backward, setup_context=_setup_context)


def rein_update_triton(
    feats: Tensor,
    tokens: Tensor,
    token_to_feature_weight: Tensor,
    token_to_feature_bias: Tensor | None,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    num_prefix_tokens: int = 0,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """One Rein layer ``f + s * df`` with the fused Triton kernels, differentiable.

    Drop-in for :func:`~vfm_adapters.kernels.reference.rein_update_reference`: same
    arguments, result and output dtype (``feats``' dtype). Parameters may be in another
    dtype than ``feats`` (e.g. fp32 parameters with bf16 activations under autocast): the
    layer is computed in ``feats``' dtype with fp32 accumulation. Needs c % 16 == 0 and
    1 <= m <= 128. CUDA tensors run compiled kernels; CPU tensors run Triton's interpreter
    (slow, for tests).

    ``num_prefix_tokens`` rows at the start of dim -2 (CLS, registers) pass through
    unchanged: the kernels read the patch rows of ``feats`` where they lie (any image and
    row stride) and write them into the output next to the copied prefix, so a caller
    passes the whole hidden state, not a contiguous copy of ``hidden[:, prefix:]``.

    ``compute_dtype`` is the dtype of the dot products for fp32 ``feats``; ``None`` takes
    the autocast dtype inside an autocast region of ``feats``' device type (bf16 or fp16:
    operands rounded in registers, fp32 accumulation, the residual add and the output in
    fp32) and fp32 outside one. 16-bit ``feats`` always compute in their own dtype.

    Example:
        >>> import torch
        >>> f, t, w = torch.randn(2, 5, 16), torch.randn(3, 16), torch.randn(16, 16) / 4
        >>> out = rein_update_triton(f, t, w, None, w, None, torch.tensor(0.5))
        >>> from vfm_adapters.kernels.reference import rein_update_reference
        >>> torch.allclose(out, rein_update_reference(f, t, w, None, w, None, torch.tensor(0.5)), atol=1e-5)
        True
    """
    if compute_dtype is None:
        compute_dtype = autocast_compute_dtype(feats)
    return torch.ops.vfm_adapters.rein_update(
        feats, tokens, token_to_feature_weight, token_to_feature_bias, delta_weight, delta_bias, scale,
        num_prefix_tokens, compute_dtype,
    )


__all__ = ["autocast_compute_dtype", "rein_update_triton", "validate_rein_inputs", "SUPPORTED_DTYPES"]
