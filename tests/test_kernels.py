"""The fused Triton Rein layer held to the PyTorch reference, on CPU through Triton's interpreter.

CPU tensors always run the kernels through ``triton.runtime.interpreter`` (see
``vfm_adapters.kernels._triton_kernels``), whatever order the test modules import triton
in; TRITON_INTERPRET=1 is still set here, before anything imports triton from this module,
so that ``rein_update(kernel="triton")``'s availability check agrees, and
``test_cpu_launches_go_through_the_interpreter`` checks that the interpreter really runs.

Tolerances come from an error analysis, not from the examples seen. Every check compares
with the float64 reference on the same (already rounded) inputs; the error of a tensor is
its max |error| relative to the max |value| of the exact result, except for the gradient of
the scalar ``scale``, a sum over every element, Sum(g * df): a sum of terms of both signs can
cancel to almost nothing, so its error is taken relative to Sum |g * df| (the sum's
condition), the quantity a rounding-error bound is proportional to.

- fp32 (:func:`fp32_tolerance`): every value is a chain of fp32 dot products and sums with
  fp32 accumulation; the longest chain has K = c + m + rows terms (a dot over the width, one
  over the tokens, a reduction over the rows), and the standard bound of a K-term fp32 sum
  is gamma_K = K u / (1 - K u) ~ K u, u = 2**-24, relative to the sum of |terms|. The kernel
  must stay within K u. Measured over 150 random problems (tests/test_kernels.py's
  ``problems`` strategy, one run with ``max_examples=150``): at most 0.25 K u.
- bf16 / fp16 (:data:`HALF_TOLERANCE_UNITS` units of u = 2**-8 / 2**-11): the kernels round
  at most three intermediates (U = V W_f^T or P, then dZ or dP) to the input dtype before a
  tensor-core dot and round the result once, with fp32 accumulation in between (K u in fp32
  is below 1e-4 of a half-precision u). Each rounding adds at most u of its own magnitude,
  and for the test's input scales an intermediate is at most twice the result's magnitude:
  4 roundings x 2 = 8 u. Measured over 60 problems each: at most 2.9 u (bf16) and 1.5 u
  (fp16); PyTorch's own bf16/fp16 reference reaches 6.7 u and 6.2 u on the same inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vfm_adapters.kernels import rein_update  # noqa: E402
from vfm_adapters.kernels import _triton_kernels as kernels  # noqa: E402
from vfm_adapters.kernels.reference import rein_update_reference  # noqa: E402
from vfm_adapters.kernels.triton_rein import rein_update_triton  # noqa: E402

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF_TOLERANCE_UNITS = 8
INPUT_NAMES = ("feats", "tokens", "W_t", "b_t", "W_f", "b_f", "scale")


@dataclasses.dataclass(frozen=True)
class Problem:
    lead: tuple[int, ...]
    n: int
    channels: int
    n_tokens: int
    token_bias: bool
    delta_bias: bool
    scale: float
    token_magnitude: float
    seed: int

    def inputs(self) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """fp32 inputs (f, T, W_t, b_t, W_f, b_f, s) and an upstream gradient."""
        gen = torch.Generator().manual_seed(self.seed)
        c = self.channels

        def randn(*shape: int, magnitude: float = 1.0) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * magnitude

        values = [
            randn(*self.lead, self.n, c),
            randn(self.n_tokens, c, magnitude=self.token_magnitude),
            randn(c, c, magnitude=c**-0.5),
            randn(c) if self.token_bias else None,
            randn(c, c, magnitude=c**-0.5),
            randn(c) if self.delta_bias else None,
            torch.tensor(self.scale),
        ]
        return values, randn(*self.lead, self.n, c)


def fp32_tolerance(problem: Problem) -> float:
    """K u with K = c + m + rows, the longest fp32 accumulation chain (module docstring)."""
    rows = problem.n * math.prod(problem.lead)
    return (problem.channels + problem.n_tokens + rows) * UNIT_ROUNDOFF[torch.float32]


def tolerance(problem: Problem, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return fp32_tolerance(problem)
    return HALF_TOLERANCE_UNITS * UNIT_ROUNDOFF[dtype]


def scale_grad_condition(values: list[torch.Tensor | None], grad_out: torch.Tensor) -> float:
    """Sum |g * df| in float64, df = the layer's update before scaling (scale set to 1)."""
    leaves = [None if v is None else v.double() for v in values]
    leaves[6] = torch.ones((), dtype=torch.float64)
    df = rein_update_reference(*leaves) - leaves[0]
    return (grad_out.double() * df).abs().sum().item()


def forward_and_grads(fn, values, grad_out, dtypes) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Output and gradients of every (non-None) input, inputs cast to ``dtypes``."""
    leaves = [None if v is None else v.to(dt).requires_grad_() for v, dt in zip(values, dtypes)]
    out = fn(*leaves)
    present = [leaf for leaf in leaves if leaf is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype)))
    return out, [None if leaf is None else next(grads) for leaf in leaves]


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    return error / scale if scale > 0 else error


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str,
                   condition: float | None = None) -> None:
    """Max |error| relative to max |expected|, or to ``condition`` (the sum of |terms|) when given."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if condition is None:
        error, relative_to = max_relative_error(actual, expected), "max |value|"
    else:
        absolute = (actual.double() - expected.double()).abs().max().item()
        error, relative_to = (absolute / condition if condition > 0 else absolute), "sum |g * df|"
    assert error <= tolerance, f"{what}: max error {error:.3g} relative to {relative_to} > {tolerance:.3g}"


def assert_all_match(problem: Problem, dtype: torch.dtype, values, grad_out, out, grads, expected_out, expected_grads,
                     what: str = "") -> None:
    """Output and every gradient within :func:`tolerance`; ``scale``'s gradient against its condition."""
    limit = tolerance(problem, dtype)
    assert_matches(out, expected_out, limit, f"{what}{problem} output")
    for name, grad, expected, value in zip(INPUT_NAMES, grads, expected_grads, values):
        if value is None:
            assert grad is None
            continue
        assert grad.dtype == value.dtype, f"grad of {name} is {grad.dtype}, its input {value.dtype}"
        condition = scale_grad_condition(values, grad_out) if name == "scale" else None
        assert_matches(grad, expected, limit, f"{what}{problem} grad of {name}", condition)


def check_against_reference(problem: Problem, dtype: torch.dtype, parameter_dtype: torch.dtype | None = None) -> None:
    """Forward and every gradient of the Triton op against the float64 reference on the
    same rounded inputs, within the tolerances of the module docstring."""
    parameter_dtype = parameter_dtype or dtype
    values, grad_out = problem.inputs()
    dtypes = [dtype] + [parameter_dtype] * 6
    rounded = [None if v is None else v.to(dt) for v, dt in zip(values, dtypes)]
    grad_out = grad_out.to(dtype)
    out, grads = forward_and_grads(rein_update_triton, rounded, grad_out, dtypes)
    expected_out, expected_grads = forward_and_grads(rein_update_reference, rounded, grad_out, [torch.float64] * 7)
    assert out.dtype == dtype
    assert_all_match(problem, dtype, rounded, grad_out, out, grads, expected_out, expected_grads)


@st.composite
def problems(draw) -> Problem:
    return Problem(
        lead=draw(st.sampled_from([(), (2,), (2, 1)])),
        n=draw(st.integers(1, 80)),
        channels=draw(st.sampled_from([16, 32, 48, 64])),
        n_tokens=draw(st.sampled_from([1, 2, 17, 100])),
        token_bias=draw(st.booleans()),
        delta_bias=draw(st.booleans()),
        scale=draw(st.floats(-1.5, 1.5, allow_nan=False)),
        token_magnitude=draw(st.sampled_from([0.5, 4.0])),  # 4.0: peaked softmax, large logits
        seed=draw(st.integers(0, 2**16)),
    )


FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@FAST
@given(problem=problems())
@example(problem=Problem((2,), 37, 48, 100, False, False, 0.7, 4.0, 1))  # m = 100, no biases
@example(problem=Problem((2, 1), 21, 32, 1, True, True, -0.3, 1.0, 2))  # m = 1: no value tokens
def test_fp32_forward_and_all_gradients_match_reference(problem: Problem) -> None:
    check_against_reference(problem, torch.float32)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(problem=problems(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
@example(problem=Problem((2,), 45, 64, 100, True, True, 0.8, 4.0, 3), dtype=torch.bfloat16)
@example(problem=Problem((), 29, 48, 100, True, False, 0.8, 1.0, 4), dtype=torch.float16)
def test_half_precision_matches_float64_reference(problem: Problem, dtype: torch.dtype) -> None:
    check_against_reference(problem, dtype)


def test_mixed_dtypes_compute_in_feats_dtype_and_return_each_grad_in_its_own_dtype() -> None:
    # fp32 parameters with bf16 activations, as under autocast; both combinations of biases.
    for biases in (True, False):
        problem = Problem((2,), 33, 32, 100, biases, biases, 0.6, 1.0, 5)
        check_against_reference(problem, torch.bfloat16, parameter_dtype=torch.float32)
    values, _ = Problem((2,), 33, 32, 5, True, True, 0.6, 1.0, 5).inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rein_update_triton(values[0].bfloat16(), *values[1:])
    assert out.dtype == torch.bfloat16


def test_only_feats_needing_grad_skips_parameter_reductions_and_stays_correct() -> None:
    problem = Problem((), 50, 32, 100, True, True, 0.9, 1.0, 6)
    values, grad_out = problem.inputs()
    feats = values[0].clone().requires_grad_()
    (grad,) = torch.autograd.grad(rein_update_triton(feats, *values[1:]), feats, grad_out)
    expected_feats = values[0].clone().requires_grad_()
    (expected,) = torch.autograd.grad(rein_update_reference(expected_feats, *values[1:]), expected_feats, grad_out)
    assert_matches(grad, expected, 2 * fp32_tolerance(problem), "feats-only grad")  # both sides fp32: 2 K u


def _gpu_configs(io_dtype: torch.dtype, dot_dtype: torch.dtype) -> dict[str, kernels.KernelConfig]:
    return kernels.GPU_CONFIGS[kernels.config_key(io_dtype, dot_dtype)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shipped_gpu_tile_sizes_under_the_interpreter(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The GPU tiles (BLOCK_N 32-64, BLOCK_C 64-128, reduce 64-128) on ragged shapes: c=144
    is not a multiple of those tiles and 2 x 70 rows are split in two for the reduction."""
    monkeypatch.setattr(kernels, "pick_configs", lambda io_dt, dot_dt, interpreted: _gpu_configs(io_dt, dot_dt))
    check_against_reference(Problem((2,), 70, 144, 100, True, True, 0.7, 1.0, 7), dtype)


def test_cpu_launches_go_through_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    original = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", spy)
    values, grad_out = Problem((), 20, 16, 3, True, True, 0.5, 1.0, 8).inputs()
    rein_update_triton(*[v.requires_grad_() for v in values]).backward(grad_out)
    assert launched == ["_rein_forward_kernel", "_rein_backward_rows_kernel", "_rein_backward_reduce_kernel"]


def test_dispatch_through_rein_update_kernel_triton() -> None:
    problem = Problem((3,), 10, 32, 4, True, False, 0.5, 1.0, 9)
    values, _ = problem.inputs()
    out = rein_update(*values, kernel="triton")
    assert_matches(out, rein_update_reference(*values), 2 * fp32_tolerance(problem), "dispatch")  # both fp32: 2 K u


def test_triton_import_order_does_not_matter() -> None:
    """A fresh process that imports triton without TRITON_INTERPRET, and only then runs on CPU."""
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import triton, torch\n"
        "from vfm_adapters.kernels.triton_rein import rein_update_triton\n"
        "from vfm_adapters.kernels.reference import rein_update_reference\n"
        "f, t, w = torch.randn(2, 9, 16), torch.randn(5, 16), torch.randn(16, 16) / 4\n"
        "a = rein_update_triton(f, t, w, None, w, None, torch.tensor(0.5))\n"
        "b = rein_update_reference(f, t, w, None, w, None, torch.tensor(0.5))\n"
        "assert (a - b).abs().max() < 1e-5, (a - b).abs().max()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(kernels.__file__).resolve().parents[2])  # .../src
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda v: v.__setitem__(0, torch.randn(4, 24)), "multiple of 16"),
        (lambda v: v.__setitem__(1, torch.randn(0, 32)), "1 <= m <= 128"),
        (lambda v: v.__setitem__(1, torch.randn(129, 32)), "1 <= m <= 128"),
        (lambda v: v.__setitem__(4, torch.randn(32, 16)), "delta_weight"),
        (lambda v: v.__setitem__(3, torch.randn(31)), "token_to_feature_bias"),
        (lambda v: v.__setitem__(0, torch.zeros(4, 32, dtype=torch.int32)), "float32, float16 or bfloat16"),
        (lambda v: v.__setitem__(6, torch.ones(2)), "scale"),
    ],
)
def test_invalid_inputs_raise_clear_value_errors(mutate, message: str) -> None:
    values, _ = Problem((), 4, 32, 3, True, True, 0.5, 1.0, 10).inputs()
    mutate(values)
    with pytest.raises(ValueError, match=message):
        rein_update_triton(*values)


def test_opcheck_schema_fake_autograd_registration() -> None:
    values, grad_out = Problem((2,), 9, 16, 3, True, True, 0.5, 1.0, 11).inputs()
    args = [v.requires_grad_() for v in values]
    torch.library.opcheck(torch.ops.vfm_adapters.rein_update.default, tuple(args))
    no_bias = [v if i not in (3, 5) else None for i, v in enumerate(args)]
    torch.library.opcheck(torch.ops.vfm_adapters.rein_update.default, tuple(no_bias))
    # Prefix tokens and bf16 dots for fp32 activations (the autocast path).
    torch.library.opcheck(torch.ops.vfm_adapters.rein_update.default, (*args, 2, torch.bfloat16))
    backward_args = (grad_out, *[v.detach() for v in values], 0, None, True)
    torch.library.opcheck(
        torch.ops.vfm_adapters.rein_update_backward.default, backward_args, test_utils=("test_schema", "test_faketensor")
    )


def test_fake_tensor_mode_shapes_and_dtypes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        feats = torch.empty(2, 4096, 1024, dtype=torch.bfloat16)
        params = [torch.empty(100, 1024), torch.empty(1024, 1024), None, torch.empty(1024, 1024), torch.empty(1024), torch.empty(())]
        out = torch.ops.vfm_adapters.rein_update(feats, *params)
        grads = torch.ops.vfm_adapters.rein_update_backward(out, feats, *params, 0, torch.bfloat16, True)
    assert out.shape == feats.shape and out.dtype == torch.bfloat16
    assert [tuple(g.shape) for g in grads] == [(2, 4096, 1024), (100, 1024), (1024, 1024), (1024,), (1024, 1024), (1024,), ()]
    assert grads[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads[1:])


def test_torch_compile_fullgraph_forward_and_backward() -> None:
    """Dynamo must capture the op in one graph (fullgraph) and AOTAutograd trace its
    backward through the fake implementations. ``aot_eager`` runs that whole pipeline
    without inductor's C++ code generation, which would only add minutes of CPU compile."""
    torch._dynamo.reset()
    problem = Problem((2,), 19, 32, 7, True, True, 0.5, 1.0, 12)
    values, grad_out = problem.inputs()

    def layer_loss(*inputs):
        return (rein_update_triton(*inputs) * grad_out).sum()

    compiled = torch.compile(layer_loss, fullgraph=True, backend="aot_eager")
    leaves = [v.clone().requires_grad_() for v in values]
    compiled(*leaves).backward()
    expected = [v.double().requires_grad_() for v in values]
    (rein_update_reference(*expected) * grad_out.double()).sum().backward()
    for name, leaf, ref in zip(INPUT_NAMES, leaves, expected):
        condition = scale_grad_condition(values, grad_out) if name == "scale" else None
        assert_matches(leaf.grad, ref.grad, fp32_tolerance(problem), f"compiled grad of {name}", condition)


# --- sm_90 code generation -------------------------------------------------------------

SM90_CASES = [
    (kernel, dtype, m_pad)
    for dtype in ("bf16", "fp32")
    for kernel in ("forward", "backward_rows", "backward_reduce")
    for m_pad in ((16, 32, 64, 128) if kernel != "backward_reduce" else (16, 128))
] + [  # fp32 activations with bf16 dots (autocast): the smallest and the largest token tile
    (kernel, "fp32>bf16", m_pad)
    for kernel in ("forward", "backward_rows", "backward_reduce")
    for m_pad in ((16, 128) if kernel != "backward_reduce" else (128,))
]


def test_shipped_configs_compile_for_sm90_without_spills(monkeypatch: pytest.MonkeyPatch) -> None:
    """triton.compile for GPUTarget("cuda", 90, 32) needs no GPU: ptxas runs on the host.

    Register allocation is ptxas's and changes between Triton releases (under triton 3.8 the
    old fp32 forward tile, BLOCK_K 32, spilled 16 B at M_PAD 16 and 32): the shipped tiles
    were checked spill-free with triton 3.8.0 and 3.9.0, and the test reports the version
    it compiled with in every message.

    Compiled in worker processes started without TRITON_INTERPRET (the compiler cannot use
    triton's standard library once it was built for the interpreter), two at a time. fp16
    generates the same code as bf16 (checked once: identical registers and shared memory),
    so it is left out to keep CI fast; the row kernels' register use depends on M_PAD, so
    every padded token width is compiled.
    """
    import multiprocessing

    from vfm_adapters.kernels._triton_compile import SM90_MAX_SHARED_PER_BLOCK, compile_shipped_config

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # inherited by the spawned workers
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        reports = list(pool.map(compile_shipped_config, *zip(*SM90_CASES)))
    import triton

    version = f"triton {triton.__version__}"
    print(f"sm_90 code generation with {version}")
    for report in reports:
        print(
            f"{report['kernel']:16s} {report['dtype']} M_PAD={report['m_pad']:3d}: {report['registers']} registers, "
            f"spills {report['spill_stores']}/{report['spill_loads']} B, stack {report['stack_frame']} B, "
            f"shared {report['shared_bytes']} B"
        )
        what = f"{report['kernel']} {report['dtype']} M_PAD={report['m_pad']} ({version})"
        assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{what} spills registers: {report}"
        assert report["local_bytes"] == 0 and report["stack_frame"] == 0, f"{what} uses local memory: {report}"
        assert report["registers"] <= 255, what
        assert 0 < report["shared_bytes"] <= SM90_MAX_SHARED_PER_BLOCK, f"{what} needs too much shared memory"
    print(f"compiled {len(reports)} configurations in {time.perf_counter() - started:.1f} s")


def test_a_whole_model_with_prefix_tokens_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """inject_rein(kernel="triton") on a host with CLS + 4 registers, against kernel="torch"."""
    import copy

    import timm

    import vfm_adapters as va

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    host = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2, embed_dim=32,
                             num_heads=2, img_size=42).eval()
    assert va.describe_host(host).num_prefix_tokens == 5
    reference = va.inject_rein(copy.deepcopy(host), kernel="torch", token_length=7, rank=3)
    fused = va.inject_rein(copy.deepcopy(host), kernel="triton", token_length=7, rank=3)
    fused.vfm_adapters.load_state_dict(reference.vfm_adapters.state_dict())
    with torch.no_grad():
        for model in (reference, fused):
            model.vfm_adapters.rein.scale.fill_(0.5)
    images = torch.randn(2, 3, 42, 42)
    outputs = [model.forward_features(images) for model in (reference, fused)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for model, out in zip((reference, fused), outputs):
        out.square().mean().backward()
    for (name, expected), (_, got) in zip(reference.vfm_adapters.rein.named_parameters(),
                                          fused.vfm_adapters.rein.named_parameters()):
        if name.startswith(("transform", "merge")):
            continue  # the query link is not on the backbone's path
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- autocast: fp32 residual stream, 16-bit dot products ------------------------------

# fp32 activations under bf16 autocast, checked against float64 on the UNROUNDED fp32
# inputs. The kernel rounds the dot operands f, T and W_f to bf16 in registers (3 more
# roundings than the 16-bit analysis of the module docstring, whose 8 u already covers U,
# P, dZ/dP and the result, each at most twice the result's magnitude: 8 u + 3 x 2 u), and
# keeps the residual add and the output in fp32, so the error of out = f + s df is that of
# s df alone. Errors are therefore taken relative to max |out - f| (and max |grad_f - g|),
# which an output rounded to bf16 would miss when |s df| << |f| (scale 0.02 below).
# Measured on three problems (scales 0.02, 0.5, 1): at most 3.1 u over the output and every
# gradient; the same output rounded to bf16 would be 15.8 u off at scale 0.02.
AUTOCAST_TOLERANCE_UNITS = HALF_TOLERANCE_UNITS + 3 * 2


class LaunchSpy:
    """Records the kernel name, DOT_DTYPE, UPCAST_DOT and configuration key of every launch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gpu_configs: bool = False) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self.launches: list[dict] = []
        self.keys: list[str] = []
        original_run, original_pick = InterpretedFunction.run, kernels.pick_configs
        spy = self

        def run(self, *args, **kwargs):
            spy.launches.append({"kernel": self.fn.__name__, "args": args, **kwargs})
            return original_run(self, *args, **kwargs)

        def pick(io_dtype, dot_dtype, interpreted):
            spy.keys.append(kernels.config_key(io_dtype, dot_dtype))
            return _gpu_configs(io_dtype, dot_dtype) if gpu_configs else original_pick(io_dtype, dot_dtype, interpreted)

        monkeypatch.setattr(InterpretedFunction, "run", run)
        monkeypatch.setattr(kernels, "pick_configs", pick)


def relative_to_update(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> float:
    """max |actual - expected| / max |expected - base|: the error of the update part alone."""
    update = (expected.double() - base.double()).abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / update


def check_autocast_layer(problem: Problem, run, monkeypatch: pytest.MonkeyPatch, gpu_configs: bool = False) -> LaunchSpy:
    """Runs ``run(leaves)`` (fp32 leaves) under the spy and checks output and gradients against float64."""
    values, grad_out = problem.inputs()
    spy = LaunchSpy(monkeypatch, gpu_configs)
    leaves = [None if v is None else v.clone().requires_grad_() for v in values]
    out = run(leaves)
    assert out.dtype == torch.float32
    present = [leaf for leaf in leaves if leaf is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    grads = [None if leaf is None else next(grads) for leaf in leaves]
    expected_out, expected_grads = forward_and_grads(rein_update_reference, values, grad_out, [torch.float64] * 7)
    limit = AUTOCAST_TOLERANCE_UNITS * UNIT_ROUNDOFF[torch.bfloat16]
    error = relative_to_update(out, expected_out, values[0])
    assert error <= limit, f"{problem} output: error {error:.3g} relative to max |s df| > {limit:.3g}"
    for name, grad, expected, value in zip(INPUT_NAMES, grads, expected_grads, values):
        if value is None:
            continue
        assert grad.dtype == torch.float32, f"grad of {name} is {grad.dtype}"
        if name == "feats":
            error = relative_to_update(grad, expected, grad_out)
            assert error <= limit, f"{problem} grad of feats: error {error:.3g} relative to max |grad - g| > {limit:.3g}"
        else:
            condition = scale_grad_condition(values, grad_out) if name == "scale" else None
            assert_matches(grad, expected, limit, f"{problem} autocast grad of {name}", condition)
    return spy


def test_autocast_fp32_residual_runs_bf16_dots_with_fp32_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.autocast(bf16) fp32 activations take the 16-bit-dot configuration: every
    launch gets DOT_DTYPE=bf16 (upcast after rounding under the interpreter) and the
    "32bit_in_16bit_dot" tiles; the output and every gradient stay fp32."""
    problem = Problem((2,), 37, 48, 100, True, True, 0.02, 1.0, 21)

    def run(leaves):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rein_update_triton(*leaves)

    spy = check_autocast_layer(problem, run, monkeypatch)
    assert [launch["kernel"] for launch in spy.launches] == [
        "_rein_forward_kernel", "_rein_backward_rows_kernel", "_rein_backward_reduce_kernel"]
    assert all(launch["DOT_DTYPE"] == triton_language().bfloat16 for launch in spy.launches)
    assert all(launch["UPCAST_DOT"] for launch in spy.launches)
    assert spy.keys == ["32bit_in_16bit_dot"] * 3
    # The token-side operands are handed over in bf16, the activations stay fp32.
    forward = spy.launches[0]["args"]
    assert forward[0].dtype == torch.float32 and forward[6].dtype == torch.float32
    assert {forward[i].dtype for i in (1, 2, 3)} == {torch.bfloat16}


def triton_language():
    import triton.language as tl

    return tl


def test_cuda_autocast_decision_with_the_shipped_gpu_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA autocast region resolves to (compute_dtype=bf16, passed explicitly since
    CUDA autocast needs a GPU), run with the shipped GPU tiles of that configuration."""
    problem = Problem((2,), 70, 144, 100, True, True, 0.02, 1.0, 22)
    spy = check_autocast_layer(
        problem, lambda leaves: rein_update_triton(*leaves, compute_dtype=torch.bfloat16), monkeypatch, gpu_configs=True
    )
    assert spy.keys == ["32bit_in_16bit_dot"] * 3
    forward = spy.launches[0]
    assert forward["BLOCK_N"] == kernels.GPU_CONFIGS["32bit_in_16bit_dot"]["forward"].block_rows


def test_outside_autocast_and_for_half_inputs_the_dtype_is_the_inputs() -> None:
    from vfm_adapters.kernels.triton_rein import _dot_dtype, autocast_compute_dtype

    assert autocast_compute_dtype(torch.zeros(2, 16)) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_compute_dtype(torch.zeros(2, 16)) == torch.bfloat16
        assert autocast_compute_dtype(torch.zeros(2, 16, dtype=torch.float16)) == torch.float16
    assert _dot_dtype(torch.zeros(2, 16, dtype=torch.float16), torch.bfloat16) == torch.float16
    with pytest.raises(ValueError, match="compute_dtype"):
        _dot_dtype(torch.zeros(2, 16), torch.int8)


# --- strided rows and the output buffer ----------------------------------------------


def strided_views(batch: int, tokens: int, channels: int, seed: int) -> dict[str, torch.Tensor]:
    """The same kind of (B, N, c) hidden state laid out three ways, none of them a plain tensor."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "wider rows": torch.randn(batch, tokens, 2 * channels, generator=gen)[..., channels:],  # row stride 2c
        "token-major": torch.randn(tokens, batch, channels, generator=gen).transpose(0, 1),  # image stride c
        "contiguous": torch.randn(batch, tokens, channels, generator=gen),
    }


@pytest.mark.parametrize("layout", ["wider rows", "token-major", "contiguous"])
@pytest.mark.parametrize("prefix", [0, 5])
def test_strided_hidden_with_prefix_tokens_forward_and_backward(
    monkeypatch: pytest.MonkeyPatch, layout: str, prefix: int
) -> None:
    """The whole hidden state goes in; the kernels read hidden[:, prefix:] where it lies
    (the pointer and strides they receive are the view's, no copy) and write the patch rows
    into the output buffer that already holds the prefix tokens; the feats gradient is
    written the same way. Checked against float64 with the fp32 tolerance K u."""
    batch, n_all, channels = 2, 5 + 29, 32
    problem = Problem((batch,), n_all - prefix, channels, 17, True, True, 0.7, 1.0, 23)
    values, _ = problem.inputs()
    hidden = strided_views(batch, n_all, channels, 24)[layout]
    grad_out = torch.randn(batch, n_all, channels, generator=torch.Generator().manual_seed(25))
    spy = LaunchSpy(monkeypatch)
    leaf = hidden.requires_grad_()
    params = [None if v is None else v.clone().requires_grad_() for v in values[1:]]
    out = rein_update_triton(leaf, *params, num_prefix_tokens=prefix)
    out.backward(grad_out)

    forward, rows, reduce = spy.launches
    patches = hidden[:, prefix:]
    for launch, position in ((forward, 0), (rows, 0), (reduce, 0)):
        given = launch["args"][position]
        assert given.data_ptr() == patches.data_ptr() and given.stride() == patches.stride(), launch["kernel"]
    written = forward["args"][6]
    assert written.data_ptr() == out[:, prefix:].data_ptr(), "the forward wrote somewhere else than the output"
    assert torch.equal(out[:, :prefix], hidden[:, :prefix].detach()), "prefix tokens changed"
    assert torch.equal(leaf.grad[:, :prefix], grad_out[:, :prefix]), "prefix gradient changed"

    expected_leaves = [hidden.detach().double().requires_grad_()] + [
        None if v is None else v.double().requires_grad_() for v in values[1:]]
    reference_out = torch.cat([expected_leaves[0][:, :prefix],
                               rein_update_reference(expected_leaves[0][:, prefix:], *expected_leaves[1:])], dim=1)
    reference_out.backward(grad_out.double())
    limit = fp32_tolerance(problem)
    assert_matches(out, reference_out, limit, f"{layout} prefix={prefix} output")
    assert_matches(leaf.grad, expected_leaves[0].grad, limit, f"{layout} prefix={prefix} grad of hidden")
    for name, param, expected in zip(INPUT_NAMES[1:], params, expected_leaves[1:]):
        if param is None:
            continue
        condition = scale_grad_condition([hidden[:, prefix:].detach(), *values[1:]], grad_out[:, prefix:]) \
            if name == "scale" else None
        assert_matches(param.grad, expected.grad, limit, f"{layout} prefix={prefix} grad of {name}", condition)


def test_prefix_tokens_dispatch_and_torch_path_agree() -> None:
    problem = Problem((3,), 12, 32, 4, True, False, 0.5, 1.0, 26)
    values, _ = problem.inputs()
    torch_out = rein_update(*values, kernel="torch", num_prefix_tokens=2)
    triton_out = rein_update(*values, kernel="triton", num_prefix_tokens=2)
    assert torch.equal(torch_out[:, :2], values[0][:, :2])
    assert_matches(triton_out, torch_out, 2 * fp32_tolerance(problem), "prefix dispatch")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        rein_update_triton(*values, num_prefix_tokens=13)
