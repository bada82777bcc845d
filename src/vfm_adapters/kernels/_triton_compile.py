"""Ahead-of-time compilation of the shipped Triton configurations for a GPU target.

Compiling needs no GPU (Triton lowers to PTX and runs ``ptxas`` on the host), so a CPU
machine can still check what the GPU would get: registers per thread, register spills and
shared memory per block. ``tests/test_kernels.py`` asserts these for sm_90 (H100/H200).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._triton_kernels import _COMPILED, _TL_DTYPE, GPU_CONFIGS, KernelConfig, config_key, dot_precision

# H100 / H200 (sm_90): 228 KB shared memory per SM, at most 227 KB for one block.
SM90_MAX_SHARED_PER_BLOCK = 227 * 1024

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class CompiledResources:
    """What ptxas reports for one compiled kernel configuration."""

    kernel: str
    dtype: str
    m_pad: int
    config: KernelConfig
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    local_bytes: int  # per-thread local memory: where spills go
    shared_bytes: int  # dynamic (Triton-managed) + static shared memory per block

    def as_dict(self) -> dict:
        return asdict(self)


def _signature(kernel: str, dtype: torch.dtype, dot_dtype: torch.dtype) -> tuple[dict[str, str], list[str]]:
    """Argument types of one kernel and the arguments Triton would mark 16-divisible.

    Activations (f, g, outputs, side tensor) are in ``dtype``; the token-side operands
    (T, U, W_f) in ``dot_dtype``. Strides are i32 as Triton types them at the target shapes
    (the kernels widen them to int64), and multiples of c, so of 16.
    """
    ptr, dot_ptr = "*" + _TRITON_DTYPE[dtype], "*" + _TRITON_DTYPE[dot_dtype]
    strides = lambda *names: {f"{n}_stride_image": "i32" for n in names} | {f"{n}_stride_row": "i32" for n in names}  # noqa: E731
    if kernel == "forward":
        pointers = {"f_ptr": ptr, "t_ptr": dot_ptr, "u_ptr": dot_ptr, "w_ptr": dot_ptr, "b_ptr": "*fp32", "s_ptr": "*fp32",
                    "out_ptr": ptr}
        stride_args = strides("f", "out")
        scalars = {"n_rows": "i32", "rows_per_image": "i32", **stride_args, "channels": "i32", "n_tokens": "i32",
                   "softmax_scale": "fp32"}
    elif kernel == "backward_rows":
        pointers = {"f_ptr": ptr, "g_ptr": ptr, "t_ptr": dot_ptr, "u_ptr": dot_ptr, "w_ptr": dot_ptr, "s_ptr": "*fp32",
                    "grad_f_ptr": ptr, "side_ptr": ptr}
        stride_args = strides("f", "g", "grad")
        scalars = {"n_rows": "i32", "rows_per_image": "i32", **stride_args, "channels": "i32", "n_tokens": "i32",
                   "softmax_scale": "fp32"}
    elif kernel == "backward_reduce":
        pointers = {"f_ptr": ptr, "g_ptr": ptr, "side_ptr": ptr, "out_ptr": "*fp32"}
        stride_args = strides("f", "g")
        scalars = {"n_rows": "i32", "rows_per_image": "i32", **stride_args, "channels": "i32", "rows_per_split": "i32",
                   "out_rows": "i32"}
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return {**pointers, **scalars}, [*pointers, *stride_args, "channels"]


def _constexprs(kernel: str, dtype: torch.dtype, m_pad: int, config: KernelConfig) -> dict[str, object]:
    common = {"M_PAD": m_pad, "UPCAST_DOT": False, "DOT_PRECISION": dot_precision(dtype), "DOT_DTYPE": _TL_DTYPE[dtype]}
    if kernel == "backward_reduce":
        return {**common, "BLOCK_I": config.block_rows, "BLOCK_J": config.block_cols, "BLOCK_R": config.block_k}
    blocks = {"BLOCK_N": config.block_rows, "BLOCK_C": config.block_cols, "BLOCK_K": config.block_k}
    if kernel == "forward":
        blocks["HAS_BIAS"] = True
    return {**common, **blocks}


def _resource_report(cubin: bytes, ptx: str, arch: int) -> dict[str, int]:
    """Registers, local memory and static shared memory of the real cubin (``cuobjdump``),
    and spill bytes from Triton's own ptxas re-run on the PTX with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        binary, source = Path(tmp) / "kernel.cubin", Path(tmp) / "kernel.ptx"
        binary.write_bytes(cubin)
        source.write_text(ptx)
        usage = subprocess.run([cuobjdump, "-res-usage", str(binary)], capture_output=True, text=True, check=True).stdout
        # The same flags as triton/backends/nvidia/compiler.py make_cubin.
        ptxas = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
             str(source), "-o", str(Path(tmp) / "again.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = ptxas.stdout + ptxas.stderr

    def number(pattern: str, text: str) -> int:
        match = re.search(pattern, text)
        if match is None:
            raise RuntimeError(f"could not find {pattern!r} in:\n{text}")
        return int(match.group(1))

    return {
        "registers": number(r"REG:(\d+)", usage),
        "stack_frame": number(r"STACK:(\d+)", usage),
        "local_bytes": number(r"LOCAL:(\d+)", usage),
        "static_shared": number(r"SHARED:(\d+)", usage),
        "spill_stores": number(r"(\d+) bytes spill stores", log),
        "spill_loads": number(r"(\d+) bytes spill loads", log),
    }


def compile_config(
    kernel: str, dtype: torch.dtype, m_pad: int, config: KernelConfig, arch: int = 90,
    dot_dtype: torch.dtype | None = None,
) -> CompiledResources:
    """Compiles one kernel configuration for ``sm_<arch>`` and reads its resource usage.

    Example:
        >>> import torch
        >>> from vfm_adapters.kernels._triton_kernels import GPU_CONFIGS
        >>> r = compile_config("forward", torch.bfloat16, 128, GPU_CONFIGS["16bit"]["forward"])  # doctest: +SKIP
        >>> r.spill_stores  # doctest: +SKIP
        0
    """
    dot_dtype = dot_dtype or dtype
    signature, divisible = _signature(kernel, dtype, dot_dtype)
    constexprs = _constexprs(kernel, dot_dtype, m_pad, config)
    fn = _COMPILED[kernel]
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    report = _resource_report(compiled.asm["cubin"], compiled.asm["ptx"], arch)
    return CompiledResources(
        kernel=kernel,
        dtype=_TRITON_DTYPE[dtype] if dot_dtype == dtype else f"{_TRITON_DTYPE[dtype]}>{_TRITON_DTYPE[dot_dtype]}",
        m_pad=m_pad,
        config=config,
        registers=report["registers"],
        spill_stores=report["spill_stores"],
        spill_loads=report["spill_loads"],
        stack_frame=report["stack_frame"],
        local_bytes=report["local_bytes"],
        shared_bytes=int(compiled.metadata.shared) + report["static_shared"],
    )


def shipped_configurations(m_pads: tuple[int, ...] = (128,)) -> list[tuple[str, torch.dtype, int, KernelConfig]]:
    """Every (kernel, dtype, M_PAD, config) the GPU path launches, at the given token widths."""
    entries = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        configs = GPU_CONFIGS["32bit" if dtype == torch.float32 else "16bit"]
        for kernel, config in configs.items():
            entries.extend((kernel, dtype, m_pad, config) for m_pad in m_pads)
    return entries


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_shipped_config(kernel: str, dtype_name: str, m_pad: int, arch: int = 90) -> dict:
    """Picklable entry point for worker processes: compiles the shipped config of one kernel.

    Run it in a process where triton was imported without ``TRITON_INTERPRET``: with the
    interpreter on, triton's standard library is built as interpreted functions and the
    compiler cannot use them.

    ``dtype_name`` is the activations' dtype ("bf16", "fp16", "fp32"), or "fp32>bf16" /
    "fp32>fp16" for fp32 activations with 16-bit dot operands (autocast).
    """
    io_name, _, dot_name = dtype_name.partition(">")
    dtype, dot_dtype = _DTYPES[io_name], _DTYPES[dot_name or io_name]
    config = GPU_CONFIGS[config_key(dtype, dot_dtype)][kernel]
    return compile_config(kernel, dtype, m_pad, config, arch, dot_dtype=dot_dtype).as_dict()
