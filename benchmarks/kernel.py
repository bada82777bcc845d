"""Time one Rein layer: eager PyTorch, torch.compile of the reference, and the Triton kernels.

Shapes: ViT-L (c=1024, patch 14) and SAM-H (c=1280, patch 16) at 512 and 1024 px, batch
1, 4 and 8, m=100 tokens, all tensors bf16, every input requiring grad (feats too: the
gradient flows on to the earlier Rein layers). Patch tokens per image are
``round(image / patch) ** 2``: 1369 and 5329 for ViT-L (DINOv2 pads or resizes to a
multiple of the patch), 1024 and 4096 for SAM-H.

For each path: forward (inputs requiring grad, as in training), backward alone (the
forward runs untimed before each repetition) and forward+backward. Each repetition is
timed with CUDA events after the L2 cache is flushed; the median is reported. Against the
GPU's peak (detected by name: H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H200 4.8 TB/s;
989 TFLOP/s dense bf16 for H100 SXM and H200, 756 for H100 PCIe; override with
``--peak-bandwidth`` / ``--peak-tflops``) it reports achieved bandwidth and FLOP rate as
fractions of peak, the lower bound ``max(bytes / bandwidth, flops / peak)``, and the
speed-up over eager. The byte and FLOP model, for N rows, c channels, m tokens, b bytes
per element (2 for bf16):

* forward: bytes ``2 N c b`` (read f, write out) + weights; FLOPs
  ``2 N c (m + (m - 1) + c)`` (logits, P U, f W_f^T) + ``4 (m - 1) c^2`` (V, U).
* backward: bytes ``3 N c b`` (read f and dout, write df) + weights and their grads;
  FLOPs twice the forward's (each GEMM has an input and a weight gradient).
* forward+backward: the sum (f is read in both passes).

Correctness first: at every shape the forward and every gradient of each path are checked
against a float64 reference on the same bf16-rounded inputs, within the error bound the
tests derive (tests/test_kernels.py: 8 u of bf16 for the roundings to bf16, plus K u of
fp32 with K = c + m + rows for the fp32 accumulations; the scale's gradient relative to
sum |g df|). A path outside it is reported and makes the script exit with status 1.

Besides the bare op on bf16 tensors it times the call as it happens inside a model
(``*_in_model``): an fp32 hidden state with a CLS token in front, fp32 parameters, under
``torch.autocast(bf16)``: eager slices the patches and concatenates the CLS back, the
Triton op takes the whole hidden state (``num_prefix_tokens=1``) and runs bf16 dots on the
fp32 residual. On a GPU ``torch.compile(mode="max-autotune")`` of the reference is timed
too (``compiled_max_autotune``).

Usage::

    python benchmarks/kernel.py                  # on a CUDA GPU; writes results/kernel.{json,png}
    python benchmarks/kernel.py --dry-run        # CPU, Triton interpreter, one tiny shape

Without a CUDA GPU (and without ``--dry-run``) it prints ``skipped: no CUDA GPU`` and exits
with status 0, so CI can call it unconditionally. The dry run proves the script end to end
(all three paths, JSON and plot, written to a temporary directory unless ``--output-dir``
is given); its times are CPU interpreter times and mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vfm_adapters.kernels.reference import rein_update_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("eager", "compiled", "triton")  # + "compiled_max_autotune" on a GPU
IN_MODEL_PATHS = ("eager_in_model", "triton_in_model")
INPUT_NAMES = ("feats", "tokens", "W_t", "b_t", "W_f", "b_f", "scale")
PASSES = ("forward", "backward", "forward+backward")
MODELS = {"vit_l": {"channels": 1024, "patch": 14}, "sam_h": {"channels": 1280, "patch": 16}}

# name fragment -> (bytes/s, dense bf16 FLOP/s); first match wins.
GPU_PEAKS = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
)


@dataclass(frozen=True)
class Shape:
    model: str
    image: int
    batch: int
    channels: int
    tokens_per_image: int
    n_tokens: int = 100

    @property
    def rows(self) -> int:
        return self.batch * self.tokens_per_image

    @property
    def label(self) -> str:
        return f"{self.model} {self.image}px b{self.batch}"


def benchmark_shapes() -> list[Shape]:
    shapes = []
    for model, spec in MODELS.items():
        for image in (512, 1024):
            side = round(image / spec["patch"])
            for batch in (1, 4, 8):
                shapes.append(Shape(model, image, batch, spec["channels"], side * side))
    return shapes


def work(shape: Shape, element_bytes: int) -> dict[str, dict[str, float]]:
    """Bytes moved and FLOPs of one pass at the minimum (see the module docstring)."""
    n, c, m = shape.rows, shape.channels, shape.n_tokens
    weights = (2 * c * c + m * c + 2 * c) * element_bytes
    forward_flops = 2 * n * c * (m + (m - 1) + c) + 4 * (m - 1) * c * c
    forward_bytes = 2 * n * c * element_bytes + weights
    backward_bytes = 3 * n * c * element_bytes + 2 * weights
    return {
        "forward": {"bytes": forward_bytes, "flops": forward_flops},
        "backward": {"bytes": backward_bytes, "flops": 2 * forward_flops},
        "forward+backward": {"bytes": forward_bytes + backward_bytes, "flops": 3 * forward_flops},
    }


def make_inputs(shape: Shape, dtype: torch.dtype, device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    c = shape.channels
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size: int, magnitude: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * magnitude).to(device=device, dtype=dtype).requires_grad_()

    inputs = [
        rand(shape.batch, shape.tokens_per_image, c),
        rand(shape.n_tokens, c, magnitude=0.08),
        rand(c, c, magnitude=c**-0.5),
        rand(c, magnitude=0.02),
        rand(c, c, magnitude=c**-0.5),
        rand(c, magnitude=0.02),
        torch.tensor(1e-3, device=device, dtype=dtype).requires_grad_(),
    ]
    grad_out = torch.randn(inputs[0].shape, generator=gen).to(device=device, dtype=dtype)
    return inputs, grad_out


def layer_functions(compile_backend: str, max_autotune: bool) -> dict[str, Callable]:
    from vfm_adapters.kernels.triton_rein import rein_update_triton

    functions = {
        "eager": rein_update_reference,
        "compiled": torch.compile(rein_update_reference, backend=compile_backend),
        "triton": rein_update_triton,
    }
    if max_autotune:
        functions["compiled_max_autotune"] = torch.compile(rein_update_reference, mode="max-autotune")
    return functions


def in_model_functions(device: str) -> dict[str, Callable]:
    """The layer as Rein calls it in a model: fp32 hidden state with a CLS token, bf16 autocast."""
    from vfm_adapters.kernels.triton_rein import rein_update_triton

    def eager(hidden, *params):
        with torch.autocast(device, dtype=torch.bfloat16):
            return torch.cat([hidden[:, :1], rein_update_reference(hidden[:, 1:], *params)], dim=1)

    def triton(hidden, *params):
        with torch.autocast(device, dtype=torch.bfloat16):
            return rein_update_triton(hidden, *params, num_prefix_tokens=1)

    return {"eager_in_model": eager, "triton_in_model": triton}


def in_model_inputs(shape: Shape, device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    inputs, grad_out = make_inputs(dataclass_replace(shape, tokens_per_image=shape.tokens_per_image + 1), torch.float32, device)
    return inputs, grad_out


def dataclass_replace(shape: Shape, **changes) -> Shape:
    from dataclasses import replace

    return replace(shape, **changes)


def bf16_tolerance(shape: Shape, units: int = 8) -> float:
    """``units`` u (bf16) + K u (fp32), K = c + m + rows: the tests' derived bound (module
    docstring). 8 u for bf16 inputs; 14 u for fp32 inputs under autocast, whose dot
    operands f, T and W_f are rounded too (tests/test_kernels.py, AUTOCAST_TOLERANCE_UNITS)."""
    return units * 2.0**-8 + (shape.channels + shape.n_tokens + shape.rows) * 2.0**-24


def reference_with_cls(hidden, *params):
    """The in-model layer in float64: the CLS row passes through."""
    return torch.cat([hidden[:, :1], rein_update_reference(hidden[:, 1:], *params)], dim=1)


def check_against_float64(shape: Shape, layer: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor,
                          units: int = 8, reference: Callable = rein_update_reference) -> dict:
    """Max error of the output and of every gradient against float64 (``reference``) on the same inputs."""
    def output_and_grads(fn, leaves):
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))

    out, grads = output_and_grads(layer, inputs)
    exact_leaves = [t.detach().double().requires_grad_() for t in inputs]
    exact_out, exact_grads = output_and_grads(reference, exact_leaves)
    errors = {"output": max_error(out, exact_out)}
    with torch.no_grad():
        ones = [t.detach().double() for t in inputs]
        ones[6] = torch.ones_like(ones[6])
        df = reference(*ones) - ones[0]
        condition = (grad_out.double() * df).abs().sum().item()
    for name, grad, exact in zip(INPUT_NAMES, grads, exact_grads):
        if name == "scale":
            errors[name] = (grad.double() - exact).abs().max().item() / max(condition, 1e-30)
        else:
            errors[name] = max_error(grad, exact)
    limit = bf16_tolerance(shape, units)
    return {"errors": errors, "tolerance": limit, "within": all(e <= limit for e in errors.values())}


class Timer:
    """Median time (ms) of ``fn`` after an untimed ``setup``, with the L2 flushed on a GPU."""

    def __init__(self, device: str, repetitions: int, warmup: int) -> None:
        self.device, self.repetitions, self.warmup = device, repetitions, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device == "cuda" else None

    def __call__(self, fn: Callable[[object], object], setup: Callable[[], object] = lambda: None) -> float:
        for _ in range(self.warmup):
            fn(setup())
        times = []
        if self.device == "cuda":
            events = []
            for _ in range(self.repetitions):
                state = setup()
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(state)
                end.record()
                events.append((start, end))
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in events]
        else:
            for _ in range(self.repetitions):
                state = setup()
                began = time.perf_counter()
                fn(state)
                times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)


def measure(shape: Shape, layer: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor, timer: Timer) -> dict[str, float]:
    def forward(_state=None):
        return layer(*inputs)

    def backward(out):
        torch.autograd.grad(out, inputs, grad_out)

    def forward_backward(_state=None):
        torch.autograd.grad(layer(*inputs), inputs, grad_out)

    return {
        "forward": timer(forward),
        "backward": timer(backward, setup=forward),
        "forward+backward": timer(forward_backward),
    }


def gpu_peaks(args: argparse.Namespace) -> tuple[str, float | None, float | None]:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    bandwidth, flops = None, None
    for fragment, peak_bandwidth, peak_flops in GPU_PEAKS:
        if fragment in name:
            bandwidth, flops = peak_bandwidth, peak_flops
            break
    if args.peak_bandwidth:
        bandwidth = args.peak_bandwidth * 1e12
    if args.peak_tflops:
        flops = args.peak_tflops * 1e12
    return name, bandwidth, flops


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def run(shapes: list[Shape], device: str, args: argparse.Namespace) -> dict:
    dtype = torch.bfloat16
    name, bandwidth, peak_flops = gpu_peaks(args)
    functions = layer_functions(args.compile_backend, max_autotune=not args.dry_run)
    in_model = in_model_functions(device)
    paths = [*functions, *in_model]
    timer = Timer(device, args.repetitions, args.warmup)
    rows, checks = [], []
    for shape in shapes:
        inputs, grad_out = make_inputs(shape, dtype, device)
        model_inputs, model_grad = in_model_inputs(shape, device)
        for path in paths:
            check = check_against_float64(shape, {**functions, **in_model}[path],
                                          model_inputs if path in in_model else inputs,
                                          model_grad if path in in_model else grad_out,
                                          units=14 if path in in_model else 8,
                                          reference=reference_with_cls if path in in_model else rein_update_reference)
            checks.append({"shape": shape.label, "path": path, **check})
            status = "ok" if check["within"] else "OUTSIDE THE BOUND"
            worst = max(check["errors"], key=check["errors"].get)
            print(f"{shape.label} {path}: max error {check['errors'][worst]:.2e} ({worst}) vs bound "
                  f"{check['tolerance']:.2e}: {status}")
        triton_error = next(c for c in checks if c["shape"] == shape.label and c["path"] == "triton")["errors"]["output"]
        model = work(shape, element_bytes=2)
        times = {path: measure(shape, functions[path], inputs, grad_out, timer) for path in functions}
        times.update({path: measure(shape, in_model[path], model_inputs, model_grad, timer) for path in in_model})
        for pass_name in PASSES:
            bytes_moved, flops = model[pass_name]["bytes"], model[pass_name]["flops"]
            bound = None
            if bandwidth and peak_flops:
                bound = max(bytes_moved / bandwidth, flops / peak_flops) * 1e3
            for path in paths:
                ms = times[path][pass_name]
                rows.append({
                    **asdict(shape),
                    "rows": shape.rows,
                    "path": path,
                    "pass": pass_name,
                    "ms": ms,
                    "bytes": bytes_moved,
                    "flops": flops,
                    "bandwidth_TBps": bytes_moved / ms / 1e9,
                    "TFLOPps": flops / ms / 1e9,
                    "bandwidth_fraction": bytes_moved / ms / 1e-3 / bandwidth if bandwidth else None,
                    "flops_fraction": flops / ms / 1e-3 / peak_flops if peak_flops else None,
                    "lower_bound_ms": bound,
                    "speedup_vs_eager": times["eager_in_model" if path in in_model else "eager"][pass_name] / ms,
                    "triton_forward_max_rel_error": triton_error,
                })
        print_rows([r for r in rows if r["model"] == shape.model and r["image"] == shape.image and r["batch"] == shape.batch])
        del inputs, grad_out, model_inputs, model_grad
    return {
        "checks": checks,
        "device": name,
        "peak_bandwidth_Bps": bandwidth,
        "peak_flops": peak_flops,
        "dtype": "bfloat16",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "compile_backend": args.compile_backend,
        "repetitions": args.repetitions,
        "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"{r['model']:6s} {r['image']:5d}px b{r['batch']} n={r['rows']:6d}  {r['pass']:16s} {r['path']:8s} "
            f"{r['ms']:9.4f} ms  {r['bandwidth_TBps']:6.2f} TB/s ({fmt(r['bandwidth_fraction'], '5.1%')})  "
            f"{r['TFLOPps']:7.1f} TFLOP/s ({fmt(r['flops_fraction'], '5.1%')})  "
            f"bound {fmt(r['lower_bound_ms'], '.4f')} ms  x{r['speedup_vs_eager']:.2f} vs eager",
            flush=True,
        )


def plot(result: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = list(dict.fromkeys(f"{r['model']} {r['image']}px b{r['batch']}" for r in rows))
    fig, axes = plt.subplots(len(PASSES), 1, figsize=(max(8, 0.9 * len(labels) + 3), 3.2 * len(PASSES)), squeeze=False)
    paths = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / len(paths)
    for ax, pass_name in zip(axes[:, 0], PASSES):
        for i, layer_path in enumerate(paths):
            ms = [next(r["ms"] for r in rows if r["pass"] == pass_name and r["path"] == layer_path
                       and f"{r['model']} {r['image']}px b{r['batch']}" == label) for label in labels]
            ax.bar([x + (i - (len(paths) - 1) / 2) * width for x in range(len(labels))], ms, width, label=layer_path)
        bounds = [next(r["lower_bound_ms"] for r in rows if r["pass"] == pass_name
                       and f"{r['model']} {r['image']}px b{r['batch']}" == label) for label in labels]
        if all(b is not None for b in bounds):
            ax.scatter(range(len(labels)), bounds, marker="_", s=400, color="black", label="lower bound", zorder=3)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        token_counts = sorted({r["n_tokens"] for r in rows})
        ax.set_title(f"Rein layer {pass_name}, bf16, m={'/'.join(map(str, token_counts))} ({result['device']})")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="one tiny shape on CPU through the Triton interpreter")
    parser.add_argument("--output-dir", type=Path, default=None, help="default benchmarks/results (a temp dir for --dry-run)")
    parser.add_argument("--repetitions", type=int, default=None, help="timed repetitions (default 50, dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions (default 10, dry run 1)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the reference")
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="TB/s, overrides the detected GPU's")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s, overrides the detected GPU's")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shapes", nargs="+", default=None, metavar="MODEL:IMAGE:BATCH",
                        help="only these shapes, e.g. vit_l:512:8 sam_h:1024:1 (default: all)")
    args = parser.parse_args(argv)

    if args.dry_run:
        device = "cpu"
        shapes = [Shape("tiny", 64, 2, 32, 37, n_tokens=5)]
        args.repetitions = args.repetitions or 2
        args.warmup = args.warmup if args.warmup is not None else 1
        output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="rein_kernel_dry_run_"))
    else:
        if not torch.cuda.is_available():
            print("skipped: no CUDA GPU (run with --dry-run to exercise the script on CPU)")
            return 0
        device = "cuda"
        shapes = [s for s in benchmark_shapes() if s.model in args.models]
        if args.shapes:
            wanted = set(args.shapes)
            shapes = [s for s in shapes if f"{s.model}:{s.image}:{s.batch}" in wanted]
            if not shapes:
                parser.error(f"--shapes {args.shapes} matched none of the benchmark shapes")
        args.repetitions = args.repetitions or 50
        args.warmup = args.warmup if args.warmup is not None else 10
        output_dir = args.output_dir or RESULTS
    torch.manual_seed(0)
    result = run(shapes, device, args)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output_dir / "kernel.json", output_dir / "kernel.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")
    failed = [f"{c['shape']} {c['path']}" for c in result["checks"] if not c["within"]]
    if failed:
        print(f"correctness check failed (outside the derived bf16 bound): {', '.join(failed)}")
        return 1
    if not args.dry_run and result["peak_bandwidth_Bps"] is None:
        print(f"note: unknown GPU {result['device']!r}: pass --peak-bandwidth/--peak-tflops for the fractions of peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
