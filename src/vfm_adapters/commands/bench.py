"""``vfm-adapters bench``: a throughput and memory table of every method, on this machine.

For each method (the frozen host, Rein, LoRA, VPT, AdaptFormer, each with its defaults)
the table gives the trainable parameters, images/s for inference (``forward_features``
under ``torch.no_grad``) and for one training step (forward, a linear head on the mean
patch token, cross-entropy against random labels, backward, AdamW over the trainable
parameters), and the peak memory of the training step, each with its ratio to the frozen
host. The frozen host's step also backpropagates through every block (its input requires
grad), as a step with an adapter in every block must, so the ratios are the adapters' own
cost.

All methods live in one process and are measured interleaved: every round runs each
method once, in an order rotated by one per round, so slow drifts of a shared machine hit
all methods alike. The table shows the median over the rounds and the spread (half the
range between the fastest and the slowest round).

Peak memory: the most tensor memory a training step holds above what was allocated before
it. On CUDA ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated
before it. On a CPU, where torch keeps no such counter (and ``tracemalloc`` does not see
torch's C++ allocations, and the resident set does not grow once freed memory is reused),
the PyTorch profiler's memory events (``profile_memory=True``) of one extra, untimed step
per round: every allocation and free in order, the peak of their running sum.
"""

from __future__ import annotations

import argparse
import json

from ._common import add_threads_argument

NAME = "bench"
HELP = "images/s (inference, training step) and peak memory of every method vs the frozen host, on this machine"

METHODS = ("frozen", "rein", "lora", "vpt", "adaptformer")
MODELS = {
    # name: (timm model, timm kwargs). "vit-s" is a DINOv2 ViT-S/14 with random weights.
    "vit-s": ("vit_small_patch14_dinov2", {}),
    "vit-b": ("vit_base_patch14_dinov2", {}),
    "vit-l": ("vit_large_patch14_dinov2", {}),
    "tiny": ("vit_small_patch14_dinov2", {"depth": 2, "embed_dim": 64, "num_heads": 2}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="vit-s",
                        help="host (random weights; default vit-s: DINOv2 ViT-S/14)")
    parser.add_argument("--image-size", type=int, default=112, help="image side in pixels (default 112: 64 patches)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="float32, or bf16 autocast (CUDA)")
    parser.add_argument("--json", default=None, help="also write the rows (and the settings) to this JSON file")
    add_threads_argument(parser)


def _profiled_peak_bytes(step) -> float:
    """Peak of the running sum of allocations minus frees during ``step()`` (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = highest = 0
    for event in events:
        current += event.nbytes()
        highest = max(highest, current)
    return float(highest)


def _build(method: str, host, head_width: int, device):
    import copy

    import torch

    import vfm_adapters as va

    model = copy.deepcopy(host)
    injectors = {"rein": va.inject_rein, "lora": va.inject_lora, "vpt": va.inject_vpt, "adaptformer": va.inject_adaptformer}
    if method == "frozen":
        model.requires_grad_(False)
    else:
        model = injectors[method](model)
    trainable = va.trainable_parameters(model)
    head = torch.nn.Linear(head_width, 10).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    return model.to(device), head, torch.optim.AdamW(params, lr=1e-4), trainable


class _Workload:
    """The methods' models on one host and one fixed batch; runs, times and profiles their steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        import contextlib

        import timm
        import torch

        self.device = device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but no CUDA GPU is visible")
        name, kwargs = MODELS[args.model]
        torch.manual_seed(0)
        host = timm.create_model(name, pretrained=False, img_size=args.image_size, num_classes=0, **kwargs).eval()
        width = host.num_features
        self.built = {m: _build(m, host, width, device) for m in args.methods}
        self.images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
        self.labels = torch.randint(0, 10, (args.batch,), device=device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                         else contextlib.nullcontext())

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def infer(self, method: str) -> None:
        import torch

        model = self.built[method][0]
        with torch.no_grad(), self.autocast:
            model.forward_features(self.images)

    def train(self, method: str) -> None:
        import torch.nn.functional as F

        model, head, optimizer, _ = self.built[method]
        images = self.images
        inputs = images.requires_grad_(method == "frozen")  # the frozen host backpropagates too
        with self.autocast:
            tokens = model.forward_features(inputs)
            loss = F.cross_entropy(head(tokens[:, getattr(model, "num_prefix_tokens", 0):].float().mean(1)), self.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images.requires_grad_(False)
        images.grad = None

    def timed(self, fn, method: str) -> float:
        import time

        self.sync()
        start = time.perf_counter()
        fn(method)
        self.sync()
        return time.perf_counter() - start

    def peak(self, method: str) -> float | None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.train(method)
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - before)
        return _profiled_peak_bytes(lambda: self.train(method))


def _sample_rounds(work: _Workload, args: argparse.Namespace) -> dict[str, dict[str, list]]:
    """Per method, one images/s (inference, training) and one peak memory per round, after a warm-up."""
    for method in args.methods:  # warm-up: first-call costs, AdamW state
        work.infer(method)
        work.train(method)
    samples = {m: {"infer": [], "train": [], "peak": []} for m in args.methods}
    order = list(args.methods)
    for round_index in range(args.rounds):
        rotated = order[round_index % len(order):] + order[: round_index % len(order)]
        for method in rotated:
            samples[method]["infer"].append(args.batch / work.timed(work.infer, method))
            samples[method]["train"].append(args.batch / work.timed(work.train, method))
            samples[method]["peak"].append(work.peak(method))
    return samples


def _summary_row(method: str, trainable: int, s: dict[str, list]) -> dict:
    """One method's medians and spreads over the rounds (no ratios yet)."""
    import statistics

    peaks = [p for p in s["peak"] if p is not None]
    return {
        "method": method,
        "trainable": trainable,
        "infer_images_per_s": statistics.median(s["infer"]),
        "infer_spread": (max(s["infer"]) - min(s["infer"])) / 2,
        "train_images_per_s": statistics.median(s["train"]),
        "train_spread": (max(s["train"]) - min(s["train"])) / 2,
        "peak_mib": statistics.median(peaks) / 2**20 if peaks else None,
    }


def _add_ratios_to_frozen(rows: list[dict]) -> None:
    """Adds ``infer_vs_frozen``, ``train_vs_frozen`` and ``peak_vs_frozen`` (None without a frozen row)."""
    base = next((r for r in rows if r["method"] == "frozen"), None)
    for row in rows:
        for key in ("infer_images_per_s", "train_images_per_s", "peak_mib"):
            ok = base is not None and row[key] is not None and base[key]
            row[key.replace("_images_per_s", "").replace("_mib", "") + "_vs_frozen"] = row[key] / base[key] if ok else None


def measure(args: argparse.Namespace) -> list[dict]:
    """Runs the interleaved rounds; one row per method with medians, spreads and ratios."""
    work = _Workload(args)
    samples = _sample_rounds(work, args)
    rows = [_summary_row(method, work.built[method][3], samples[method]) for method in args.methods]
    _add_ratios_to_frozen(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (ratios are to the frozen host; +- is half the range over the rounds).

    Example:
        >>> print(format_table([{"method": "frozen", "trainable": 0, "infer_images_per_s": 10.0,
        ...     "infer_spread": 0.5, "train_images_per_s": 4.0, "train_spread": 0.1, "peak_mib": 100.0,
        ...     "infer_vs_frozen": 1.0, "train_vs_frozen": 1.0, "peak_vs_frozen": 1.0}]).splitlines()[2])
        | frozen | 0 | 10.0 +- 0.5 | 1.00 | 4.00 +- 0.10 | 1.00 | 100.0 | 1.00 |
    """
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "| method | trainable | inference img/s | x frozen | train step img/s | x frozen | peak MiB | x frozen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['infer_images_per_s']:.1f} +- {r['infer_spread']:.1f} | "
            f"{ratio(r['infer_vs_frozen'])} | {r['train_images_per_s']:.2f} +- {r['train_spread']:.2f} | "
            f"{ratio(r['train_vs_frozen'])} | {peak} | {ratio(r['peak_vs_frozen'])} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import os
    import time

    from ._common import torch_threads

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with torch_threads(args.threads) as threads:
        rows = measure(args)
    elapsed = time.perf_counter() - started
    settings = {k: v for k, v in vars(args).items() if k in ("device", "model", "image_size", "batch", "rounds", "dtype")}
    settings.update(threads=threads, seconds=round(elapsed, 1), load_average_before=load)
    print(f"vfm-adapters bench: {settings}")
    print(format_table(rows))
    if args.json:
        from vfm_adapters._io import write_atomically

        def write(path: str) -> None:
            with open(path, "w") as handle:
                json.dump({"settings": settings, "rows": rows}, handle, indent=2)

        write_atomically(args.json, write)
    return 0
