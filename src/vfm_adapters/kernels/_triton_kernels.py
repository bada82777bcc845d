"""Triton kernels of the fused Rein layer, their launch configurations and launchers.

Three kernels, each one pass over the big (N x c) activations (N = all patch tokens of the
batch, c channels, m <= 128 learnable tokens padded to ``M_PAD``, a power of two >= 16):

``rein_forward_kernel``
    One program owns ``BLOCK_N`` rows of f. It computes the logits ``f T^T`` (a GEMM
    against the m token columns), the softmax over the m tokens in registers, drops the
    sink column, and then, for every block of output columns, the restructured GEMM
    ``df = P U + f W_f^T + b_f`` with ``U = V W_f^T`` (computed by the wrapper, (m x c))
    and writes ``out = f + s * df``. D = P V is never materialised.

``rein_backward_rows_kernel``
    Row-parallel like the forward. Recomputes the logits and the softmax, computes
    ``dP/s = g U^T`` in the same pass over the rows, the softmax backward in registers, and
    writes ``grad_f = g + s * (g W_f + dZ T)``. It also stores two (N x M_PAD) side
    tensors, the scaled logit gradient ``dZ/s`` and the probabilities with the sink column
    replaced by ones, for the reductions over rows.

``rein_backward_reduce_kernel``
    Column-parallel reductions over the rows, one GEMM with the row index as its K
    dimension: ``g^T f`` (c x c, for dW_f and ds), ``(dZ/s)^T f`` (for dT) and
    ``P_aug^T g`` (``P^T g`` for dV, and, from the column of ones, the column sums of g
    for db_f). Split over rows into ``split`` chunks written to separate fp32 slices that
    the wrapper sums: deterministic, no atomics (the interpreter never races atomics and
    has no bf16 atomic_add, so atomics would have been tested less than they run).

Interpreter notes (``TRITON_INTERPRET=1``, Triton 3.9): a bf16 ``tl.dot`` returns wrong
values under the interpreter, so launches on the interpreter pass ``UPCAST_DOT=True`` and
both dot operands are converted to fp32 first (after the same rounding to bf16 that the
GPU sees, so only the summation order differs). On a GPU bf16/fp16 operands go to the
tensor cores with fp32 accumulation. CPU tensors always run through the interpreter (there
is no other way to run Triton on a CPU); CUDA tensors run compiled kernels unless
``TRITON_INTERPRET`` is set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

MAX_TOKENS = 128
CHANNEL_MULTIPLE = 16

# The kernels call only Triton builtins plus ``tl.reduce`` with the standard library's own
# combine functions (what ``tl.max`` / ``tl.sum`` use inside). ``tl.max``, ``tl.sum`` and
# ``tl.zeros`` are themselves ``@triton.jit`` functions, fixed as compiled or interpreted
# when triton is first imported; avoiding them lets the interpreted flavour below run even
# when triton was imported without TRITON_INTERPRET (e.g. by another test module), and the
# interpreter recognises these two combine functions and reduces with numpy directly.
_MAX_COMBINE = tl.standard._elementwise_max
_SUM_COMBINE = tl.standard._sum_combine


def _rein_forward_kernel(
    f_ptr,
    t_ptr,
    u_ptr,
    w_ptr,
    b_ptr,
    s_ptr,
    out_ptr,
    n_rows,
    rows_per_image,
    f_stride_image,
    f_stride_row,
    out_stride_image,
    out_stride_row,
    channels,
    n_tokens,
    softmax_scale,
    HAS_BIAS: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    # Row r is row (r mod n) of image (r div n): strided views such as hidden[:, prefix:]
    # are read and written where they lie, without a contiguous copy.
    # int32 division (row indices fit: n_rows is i32), then 64-bit offsets.
    image = rows // rows_per_image
    within = (rows - image * rows_per_image).to(tl.int64)
    image = image.to(tl.int64)
    row_offsets = image * f_stride_image + within * f_stride_row
    out_offsets = image * out_stride_image + within * out_stride_row
    toks = tl.arange(0, M_PAD)
    tok_mask = toks < n_tokens

    # Logits f T^T over the token columns (the first m columns of [T^T | W_f^T]).
    logits = tl.full((BLOCK_N, M_PAD), 0.0, tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < channels
        f_tile = tl.load(f_ptr + row_offsets[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        t_tile = tl.load(t_ptr + toks[None, :] * channels + ks[:, None], mask=tok_mask[None, :] & k_mask[:, None], other=0.0)
        # Operands go to the dot in DOT_DTYPE (fp32 activations under bf16 autocast are
        # rounded here, in registers); the accumulation stays fp32.
        f_tile = f_tile.to(DOT_DTYPE)
        t_tile = t_tile.to(DOT_DTYPE)
        if UPCAST_DOT:  # interpreter: bf16 tl.dot is wrong there, see the module docstring
            f_tile = f_tile.to(tl.float32)
            t_tile = t_tile.to(tl.float32)
        logits = tl.dot(f_tile, t_tile, logits, input_precision=DOT_PRECISION)

    # Softmax over the m real tokens (padding masked to -inf), computed in base 2.
    logits = tl.where(tok_mask[None, :], logits * (softmax_scale * 1.4426950408889634), float("-inf"))
    row_max = tl.reduce(logits, 1, _MAX_COMBINE)
    exps = tl.exp2(logits - row_max[:, None])
    probs = exps / tl.reduce(exps, 1, _SUM_COMBINE)[:, None]
    probs = tl.where(toks[None, :] >= 1, probs, 0.0)  # token 0 is the sink: in the softmax, not in D
    probs_op = probs.to(DOT_DTYPE)
    if UPCAST_DOT:
        probs_op = probs_op.to(tl.float32)

    scale = tl.load(s_ptr).to(tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < channels
        # P U: U's padded rows (and row 0) are zero in memory, so no token mask is needed.
        u_tile = tl.load(u_ptr + toks[:, None] * channels + cols[None, :], mask=col_mask[None, :], other=0.0).to(DOT_DTYPE)
        if UPCAST_DOT:
            u_tile = u_tile.to(tl.float32)
        acc = tl.dot(probs_op, u_tile, input_precision=DOT_PRECISION)
        # + f W_f^T (the remaining columns of [T^T | W_f^T]); W_f is (out, in) row-major.
        for k0 in range(0, channels, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < channels
            f_tile = tl.load(f_ptr + row_offsets[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(w_ptr + cols[None, :] * channels + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            f_tile = f_tile.to(DOT_DTYPE)
            w_tile = w_tile.to(DOT_DTYPE)
            if UPCAST_DOT:
                f_tile = f_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(f_tile, w_tile, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        io_mask = row_mask[:, None] & col_mask[None, :]
        f_cols = tl.load(f_ptr + row_offsets[:, None] + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        out = f_cols + scale * acc
        tl.store(out_ptr + out_offsets[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _rein_backward_rows_kernel(
    f_ptr,
    g_ptr,
    t_ptr,
    u_ptr,
    w_ptr,
    s_ptr,
    grad_f_ptr,
    side_ptr,
    n_rows,
    rows_per_image,
    f_stride_image,
    f_stride_row,
    g_stride_image,
    g_stride_row,
    grad_stride_image,
    grad_stride_row,
    channels,
    n_tokens,
    softmax_scale,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    # int32 division (row indices fit: n_rows is i32), then 64-bit offsets.
    image = rows // rows_per_image
    within = (rows - image * rows_per_image).to(tl.int64)
    image = image.to(tl.int64)
    row_offsets = image * f_stride_image + within * f_stride_row
    g_offsets = image * g_stride_image + within * g_stride_row
    grad_offsets = image * grad_stride_image + within * grad_stride_row
    toks = tl.arange(0, M_PAD)
    tok_mask = toks < n_tokens
    side_dtype = side_ptr.dtype.element_ty

    # One pass over the rows of f and g: logits f T^T and dP/s = g U^T (U row 0 and the
    # padded rows are zero, so the sink and padding columns of dP/s are zero).
    logits = tl.full((BLOCK_N, M_PAD), 0.0, tl.float32)
    dprobs = tl.full((BLOCK_N, M_PAD), 0.0, tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < channels
        tile_mask = row_mask[:, None] & k_mask[None, :]
        f_tile = tl.load(f_ptr + row_offsets[:, None] + ks[None, :], mask=tile_mask, other=0.0)
        g_tile = tl.load(g_ptr + g_offsets[:, None] + ks[None, :], mask=tile_mask, other=0.0).to(DOT_DTYPE)
        t_tile = tl.load(t_ptr + toks[None, :] * channels + ks[:, None], mask=tok_mask[None, :] & k_mask[:, None], other=0.0)
        u_tile = tl.load(u_ptr + toks[None, :] * channels + ks[:, None], mask=k_mask[:, None], other=0.0)
        f_tile = f_tile.to(DOT_DTYPE)
        t_tile = t_tile.to(DOT_DTYPE)
        u_tile = u_tile.to(DOT_DTYPE)
        if UPCAST_DOT:
            f_tile = f_tile.to(tl.float32)
            g_tile = g_tile.to(tl.float32)
            t_tile = t_tile.to(tl.float32)
            u_tile = u_tile.to(tl.float32)
        logits = tl.dot(f_tile, t_tile, logits, input_precision=DOT_PRECISION)
        dprobs = tl.dot(g_tile, u_tile, dprobs, input_precision=DOT_PRECISION)

    logits = tl.where(tok_mask[None, :], logits * (softmax_scale * 1.4426950408889634), float("-inf"))
    row_max = tl.reduce(logits, 1, _MAX_COMBINE)
    exps = tl.exp2(logits - row_max[:, None])
    probs = exps / tl.reduce(exps, 1, _SUM_COMBINE)[:, None]
    # Softmax backward: dZ = S * (dS - rowsum(S * dS)); here without the factor s (applied
    # in fp32 later) and with the 1/sqrt(c) of the logits folded in.
    dscores = probs * (dprobs - tl.reduce(probs * dprobs, 1, _SUM_COMBINE)[:, None]) * softmax_scale

    side_offsets = rows.to(tl.int64)[:, None] * (2 * M_PAD) + toks[None, :]
    side_mask = row_mask[:, None] & (toks[None, :] < M_PAD)
    tl.store(side_ptr + side_offsets, dscores.to(side_dtype), mask=side_mask)
    # P with the sink column set to one: its reduction against g gives P^T g and colsum(g).
    probs_aug = tl.where(toks[None, :] == 0, 1.0, probs)
    tl.store(side_ptr + side_offsets + M_PAD, probs_aug.to(side_dtype), mask=side_mask)

    # The (BLOCK_N x M_PAD) tiles die here: the column loop below reads dZ/s back from the
    # side tensor in TOKEN_CHUNK slices (L1/L2 hits) instead of keeping it in registers,
    # which would spill at M_PAD = 128. The barrier makes this CTA's stores visible to all
    # of its threads (a no-op under the interpreter, where programs run one at a time).
    tl.debug_barrier()
    TOKEN_CHUNK: tl.constexpr = BLOCK_K if BLOCK_K < M_PAD else M_PAD
    scale = tl.load(s_ptr).to(tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < channels
        acc = tl.full((BLOCK_N, BLOCK_C), 0.0, tl.float32)
        # dZ T / s (token 0 included: the sink's logit still has a gradient).
        for j0 in range(0, M_PAD, TOKEN_CHUNK):
            chunk = j0 + tl.arange(0, TOKEN_CHUNK)
            dz_tile = tl.load(side_ptr + rows.to(tl.int64)[:, None] * (2 * M_PAD) + chunk[None, :], mask=row_mask[:, None], other=0.0)
            t_tile = tl.load(t_ptr + chunk[:, None] * channels + cols[None, :], mask=(chunk[:, None] < n_tokens) & col_mask[None, :], other=0.0)
            dz_tile = dz_tile.to(DOT_DTYPE)
            t_tile = t_tile.to(DOT_DTYPE)
            if UPCAST_DOT:
                dz_tile = dz_tile.to(tl.float32)
                t_tile = t_tile.to(tl.float32)
            acc = tl.dot(dz_tile, t_tile, acc, input_precision=DOT_PRECISION)
        # + g W_f (W_f is (out, in): the K index runs over its rows).
        for k0 in range(0, channels, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < channels
            g_tile = tl.load(g_ptr + g_offsets[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(w_ptr + ks[:, None] * channels + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            g_tile = g_tile.to(DOT_DTYPE)
            w_tile = w_tile.to(DOT_DTYPE)
            if UPCAST_DOT:
                g_tile = g_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(g_tile, w_tile, acc, input_precision=DOT_PRECISION)
        io_mask = row_mask[:, None] & col_mask[None, :]
        g_cols = tl.load(g_ptr + g_offsets[:, None] + cols[None, :], mask=io_mask, other=0.0).to(tl.float32)
        grad = g_cols + scale * acc
        tl.store(grad_f_ptr + grad_offsets[:, None] + cols[None, :], grad.to(grad_f_ptr.dtype.element_ty), mask=io_mask)


def _rein_backward_reduce_kernel(
    f_ptr,
    g_ptr,
    side_ptr,
    out_ptr,
    n_rows,
    rows_per_image,
    f_stride_image,
    f_stride_row,
    g_stride_image,
    g_stride_row,
    channels,
    rows_per_split,
    out_rows,
    M_PAD: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """out[split, i, j] = sum over the split's rows of left[r, i] * right[r, j], where the
    i-blocks cover three regions: g^T f, (dZ/s)^T f and P_aug^T g.

    Each split writes its own fp32 slice instead of atomically adding into one: on a GPU
    that keeps the result deterministic, and under the interpreter atomics would never
    race (programs run one after another) and bf16 atomic_add does not exist, so an atomic
    version could not be tested the way it runs.
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_split = tl.program_id(2)
    channel_blocks = (channels + BLOCK_I - 1) // BLOCK_I
    TOKEN_BLOCKS: tl.constexpr = (M_PAD + BLOCK_I - 1) // BLOCK_I

    in_features = pid_i < channel_blocks
    in_dscores = (pid_i >= channel_blocks) & (pid_i < channel_blocks + TOKEN_BLOCKS)
    # Region-dependent operands, chosen with scalar selects (same element type everywhere:
    # the side tensor is kept in the activations' dtype).
    # Strides are selected as scalars too, so the row offsets stay one affine expression per
    # operand (the side tensor is contiguous: image stride n * 2 M_PAD, row stride 2 M_PAD).
    left_ptr = tl.where(in_features, g_ptr, tl.where(in_dscores, side_ptr, side_ptr + M_PAD))
    right_is_f = in_features | in_dscores
    right_ptr = tl.where(right_is_f, f_ptr, g_ptr)
    left_stride_image = tl.where(in_features, g_stride_image, rows_per_image * (2 * M_PAD)).to(tl.int64)
    left_stride_row = tl.where(in_features, g_stride_row, 2 * M_PAD).to(tl.int64)
    right_stride_image = tl.where(right_is_f, f_stride_image, g_stride_image).to(tl.int64)
    right_stride_row = tl.where(right_is_f, f_stride_row, g_stride_row).to(tl.int64)
    left_width = tl.where(in_features, channels, M_PAD)
    block_in_region = tl.where(
        in_features, pid_i, tl.where(in_dscores, pid_i - channel_blocks, pid_i - channel_blocks - TOKEN_BLOCKS)
    )
    left_cols = block_in_region * BLOCK_I + tl.arange(0, BLOCK_I)
    left_mask = left_cols < left_width
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    col_mask = cols < channels

    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.full((BLOCK_I, BLOCK_J), 0.0, tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < row_end
        image = rs // rows_per_image
        within = (rs - image * rows_per_image).to(tl.int64)
        image = image.to(tl.int64)
        left_offsets = image * left_stride_image + within * left_stride_row
        right_offsets = image * right_stride_image + within * right_stride_row
        left = tl.load(
            left_ptr + left_offsets[None, :] + left_cols[:, None], mask=left_mask[:, None] & r_mask[None, :], other=0.0
        ).to(DOT_DTYPE)
        right = tl.load(
            right_ptr + right_offsets[:, None] + cols[None, :], mask=r_mask[:, None] & col_mask[None, :], other=0.0
        ).to(DOT_DTYPE)
        if UPCAST_DOT:
            left = left.to(tl.float32)
            right = right.to(tl.float32)
        acc = tl.dot(left, right, acc, input_precision=DOT_PRECISION)

    out_row = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    out_offsets = (pid_split.to(tl.int64) * out_rows + out_row[:, None]) * channels + cols[None, :]
    tl.store(out_ptr + out_offsets, acc, mask=col_mask[None, :] & (out_row[:, None] < out_rows))


# Both flavours of every kernel exist side by side, so the choice does not depend on
# whether TRITON_INTERPRET was set before this module was first imported.
_COMPILED = {
    "forward": JITFunction(_rein_forward_kernel),
    "backward_rows": JITFunction(_rein_backward_rows_kernel),
    "backward_reduce": JITFunction(_rein_backward_reduce_kernel),
}
_INTERPRETED = {name: InterpretedFunction(fn.fn) for name, fn in _COMPILED.items()}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel.

    For the row kernels ``block_rows`` is BLOCK_N, ``block_cols`` BLOCK_C and ``block_k``
    BLOCK_K; for the reduction ``block_rows`` is BLOCK_I, ``block_cols`` BLOCK_J and
    ``block_k`` BLOCK_R (the rows of f and g reduced over).
    """

    block_rows: int
    block_cols: int
    block_k: int
    num_warps: int
    num_stages: int


# Shipped GPU configurations (sm_90), one per kernel and operand width. The row kernels
# hold (BLOCK_N x M_PAD) fp32 logits (and dP in the backward) in registers next to the
# (BLOCK_N x BLOCK_C) accumulator, which is what limits BLOCK_N; tests/test_kernels.py
# compiles every entry for sm_90 and checks registers, spills and shared memory.
GPU_CONFIGS: dict[str, dict[str, KernelConfig]] = {
    "16bit": {
        "forward": KernelConfig(64, 128, 64, num_warps=8, num_stages=3),
        "backward_rows": KernelConfig(64, 128, 64, num_warps=8, num_stages=2),
        "backward_reduce": KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    },
    "32bit": {
        "forward": KernelConfig(32, 64, 16, num_warps=4, num_stages=2),
        "backward_rows": KernelConfig(32, 64, 16, num_warps=8, num_stages=2),
        "backward_reduce": KernelConfig(64, 64, 32, num_warps=4, num_stages=2),
    },
    # fp32 activations with 16-bit dot operands (the fp32 residual stream under bf16/fp16
    # autocast): the 16-bit tiles, with the fp32 loads rounded in registers.
    "32bit_in_16bit_dot": {
        "forward": KernelConfig(64, 128, 64, num_warps=8, num_stages=3),
        "backward_rows": KernelConfig(64, 128, 64, num_warps=8, num_stages=2),
        "backward_reduce": KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
    },
}

# Interpreter configurations: small tiles, so that the small shapes of the tests (c 16-64,
# tens of rows) still run several row, column and K blocks with ragged tails, yet not the
# smallest ones: the interpreter's cost is mostly per operation, not per element.
INTERPRETER_CONFIGS: dict[str, KernelConfig] = {
    "forward": KernelConfig(32, 32, 32, num_warps=1, num_stages=1),
    "backward_rows": KernelConfig(32, 32, 32, num_warps=1, num_stages=1),
    "backward_reduce": KernelConfig(32, 32, 32, num_warps=1, num_stages=1),
}


def use_interpreter(device: torch.device) -> bool:
    """CPU tensors always go through Triton's interpreter; CUDA ones when TRITON_INTERPRET is set."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def config_key(io_dtype: torch.dtype, dot_dtype: torch.dtype) -> str:
    """Which entry of :data:`GPU_CONFIGS` a launch takes, from the activations' dtype and
    the dtype of the dot operands.

    Example:
        >>> config_key(torch.float32, torch.bfloat16)  # fp32 residual under bf16 autocast
        '32bit_in_16bit_dot'
        >>> config_key(torch.bfloat16, torch.bfloat16), config_key(torch.float32, torch.float32)
        ('16bit', '32bit')
    """
    if dot_dtype == torch.float32:
        return "32bit"
    return "32bit_in_16bit_dot" if io_dtype == torch.float32 else "16bit"


def pick_configs(io_dtype: torch.dtype, dot_dtype: torch.dtype, interpreted: bool) -> dict[str, KernelConfig]:
    """The configurations used for a launch (tests monkeypatch this to run the GPU ones)."""
    if interpreted:
        return INTERPRETER_CONFIGS
    return GPU_CONFIGS[config_key(io_dtype, dot_dtype)]


def padded_tokens(n_tokens: int) -> int:
    """Token tile width: a power of two, at least 16 (the smallest tl.dot dimension)."""
    return max(16, triton.next_power_of_2(n_tokens))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (IEEE fp32 unless TF32 is allowed)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_options(dot_dtype: torch.dtype, interpreted: bool) -> dict[str, object]:
    return {
        "UPCAST_DOT": interpreted and dot_dtype == torch.bfloat16,
        "DOT_PRECISION": dot_precision(dot_dtype),
        "DOT_DTYPE": _TL_DTYPE[dot_dtype],
    }


def _kernel(name: str, interpreted: bool):
    return (_INTERPRETED if interpreted else _COMPILED)[name]


def _row_strides(rows: Tensor) -> tuple[int, int]:
    """(image, row) strides of a (B, n, c) view whose channels are contiguous."""
    if rows.dim() != 3 or (rows.shape[-1] > 1 and rows.stride(-1) != 1):
        raise ValueError(f"expected a (B, n, c) view with unit channel stride, got shape {tuple(rows.shape)} "
                         f"and strides {rows.stride()}")
    return rows.stride(0), rows.stride(1)


def launch_forward(
    feats: Tensor,
    tokens: Tensor,
    token_update: Tensor,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    scale: Tensor,
    out: Tensor,
    dot_dtype: torch.dtype | None = None,
) -> Tensor:
    """Writes ``f + s * (P U + f W_f^T + b_f)`` into ``out``; returns ``out``.

    ``feats`` and ``out`` are (B, n, c) views with unit channel stride and any image and
    row strides (e.g. ``hidden[:, prefix:]`` and the matching slice of a preallocated
    output). ``tokens``, ``token_update`` (``U`` padded to (M_PAD, c), row 0 and the padding
    zero) and ``delta_weight`` are contiguous, in ``dot_dtype`` (default: ``feats``' dtype).
    """
    images, n, channels = feats.shape
    dot_dtype = dot_dtype or feats.dtype
    n_tokens = tokens.shape[0]
    if images * n == 0:
        return out
    interpreted = use_interpreter(feats.device)
    config = pick_configs(feats.dtype, dot_dtype, interpreted)["forward"]
    grid = (triton.cdiv(images * n, config.block_rows),)
    _kernel("forward", interpreted)[grid](
        feats,
        tokens,
        token_update,
        delta_weight,
        delta_bias if delta_bias is not None else delta_weight,
        scale,
        out,
        images * n,
        n,
        *_row_strides(feats),
        *_row_strides(out),
        channels,
        n_tokens,
        channels**-0.5,
        HAS_BIAS=delta_bias is not None,
        M_PAD=token_update.shape[0],
        BLOCK_N=config.block_rows,
        BLOCK_C=config.block_cols,
        BLOCK_K=config.block_k,
        **_dot_options(dot_dtype, interpreted),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def launch_backward_rows(
    feats: Tensor,
    grad_out: Tensor,
    tokens: Tensor,
    token_update: Tensor,
    delta_weight: Tensor,
    scale: Tensor,
    grad_feats: Tensor,
    dot_dtype: torch.dtype | None = None,
) -> Tensor:
    """Writes ``grad_f`` into ``grad_feats`` and returns the (N x 2 M_PAD) side tensor
    ``[dZ/s | P with a ones sink column]`` (contiguous, in ``feats``' dtype).

    ``feats``, ``grad_out`` and ``grad_feats`` are (B, n, c) views with unit channel stride.
    """
    images, n, channels = feats.shape
    dot_dtype = dot_dtype or feats.dtype
    m_pad = token_update.shape[0]
    side = torch.empty((images * n, 2 * m_pad), device=feats.device, dtype=feats.dtype)
    if images * n == 0:
        return side
    interpreted = use_interpreter(feats.device)
    config = pick_configs(feats.dtype, dot_dtype, interpreted)["backward_rows"]
    grid = (triton.cdiv(images * n, config.block_rows),)
    _kernel("backward_rows", interpreted)[grid](
        feats,
        grad_out,
        tokens,
        token_update,
        delta_weight,
        scale,
        grad_feats,
        side,
        images * n,
        n,
        *_row_strides(feats),
        *_row_strides(grad_out),
        *_row_strides(grad_feats),
        channels,
        tokens.shape[0],
        channels**-0.5,
        M_PAD=m_pad,
        BLOCK_N=config.block_rows,
        BLOCK_C=config.block_cols,
        BLOCK_K=config.block_k,
        **_dot_options(dot_dtype, interpreted),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return side


def reduction_split(n_rows: int, tiles: int, block_r: int, interpreted: bool) -> int:
    """How many row chunks the reduction is split into, to give the GPU enough programs.

    Example:
        >>> reduction_split(10_952, tiles=80, block_r=32, interpreted=True)  # 2 x tiles programs
        2
        >>> reduction_split(40, tiles=80, block_r=32, interpreted=True)  # too few rows to split
        1
    """
    if interpreted:
        target_programs, min_rows = 2 * tiles, block_r  # exercise the split path in tests
    else:
        sm_count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        target_programs, min_rows = 2 * sm_count, 8 * block_r
    split = max(1, math.ceil(target_programs / tiles))
    return max(1, min(split, n_rows // min_rows))


def launch_backward_reduce(
    feats: Tensor, grad_out: Tensor, side: Tensor, dot_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``g^T f`` (c x c), ``(dZ/s)^T f`` (M_PAD x c) and ``P_aug^T g`` (M_PAD x c).

    ``feats`` and ``grad_out`` are (B, n, c) views with unit channel stride.
    """
    images, n, channels = feats.shape
    n_rows = images * n
    dot_dtype = dot_dtype or feats.dtype
    m_pad = side.shape[1] // 2
    interpreted = use_interpreter(feats.device)
    config = pick_configs(feats.dtype, dot_dtype, interpreted)["backward_reduce"]
    block_i = config.block_rows
    channel_blocks = triton.cdiv(channels, block_i)
    token_blocks = triton.cdiv(m_pad, block_i)
    row_blocks = channel_blocks + 2 * token_blocks
    col_blocks = triton.cdiv(channels, config.block_cols)
    split = reduction_split(n_rows, row_blocks * col_blocks, config.block_k, interpreted)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, split), config.block_k) * config.block_k
    split = max(1, triton.cdiv(n_rows, rows_per_split))
    out_rows = row_blocks * block_i
    partial = torch.empty((split, out_rows, channels), device=feats.device, dtype=torch.float32)
    if n_rows == 0:
        partial.zero_()
    else:
        _kernel("backward_reduce", interpreted)[(row_blocks, col_blocks, split)](
            feats,
            grad_out,
            side,
            partial,
            n_rows,
            n,
            *_row_strides(feats),
            *_row_strides(grad_out),
            channels,
            rows_per_split,
            out_rows,
            M_PAD=m_pad,
            BLOCK_I=block_i,
            BLOCK_J=config.block_cols,
            BLOCK_R=config.block_k,
            **_dot_options(dot_dtype, interpreted),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    total = partial[0] if split == 1 else partial.sum(0)
    token_start = channel_blocks * block_i
    grad_product = total[:channels]
    dscores_features = total[token_start : token_start + m_pad]
    probs_grad = total[token_start + token_blocks * block_i : token_start + token_blocks * block_i + m_pad]
    return grad_product, dscores_features, probs_grad
