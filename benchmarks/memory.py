"""Peak memory and time of one training step, per fine-tuning method and backbone size.

For every backbone (a ViT-B and a ViT-L sized DINOv2 from timm, random init) and every
method (Full fine-tuning, Freeze = head only, Rein, LoRA, VPT, AdaptFormer, each with the
paper's defaults) one training step is: forward, a linear head on the patch tokens,
cross-entropy against random labels, backward, and an AdamW step over the trainable
parameters (host, adapters and head as the method dictates).

How memory is measured:

* **CPU**: each configuration runs in its own subprocess, and the number reported is the
  process's peak resident set size (``resource.getrusage(...).ru_maxrss``, the kernel's
  high-water mark, so no sampling gap can miss a peak) minus the RSS measured right
  after ``import torch, timm, vfm_adapters`` and before the model is built. It therefore
  counts what training holds at its peak: weights, gradients, AdamW's two state tensors
  per trainable parameter, and the activations kept for backward. ``tracemalloc`` is not
  used because it does not see torch's allocations (they are made in C++), and torch has
  no CPU counterpart of ``cuda.max_memory_allocated``; the profiler's ``profile_memory``
  would see them but slows the step it is timing. RSS includes allocator slack (freed
  memory glibc has not returned), so it is an upper bound on tensor memory, the same
  for every method. A fresh process per configuration keeps runs from sharing that slack.
* **CUDA** (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the steps, minus
  the allocation before the model is built.

Time is the median wall time of the timed steps after ``--warmup`` untimed ones (the
first step also allocates AdamW's state). On a shared CPU the wall time depends on what
else runs, so the process CPU time of the step (all threads, ``time.process_time``) and
the 1-minute load average before and after the steps are recorded too.

Run (this machine: 2-core CPU, no GPU; a few minutes)::

    python benchmarks/memory.py --device cpu --image-size 224 --batch 2

Writes ``benchmarks/results/memory_<device>.json`` and ``memory_<device>.png`` and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"ViT-B": "vit_base_patch14_dinov2", "ViT-L": "vit_large_patch14_dinov2"}
METHODS = ["full", "freeze", "rein", "lora", "vpt", "adaptformer"]
LABELS = {"full": "Full", "freeze": "Freeze", "rein": "Rein", "lora": "LoRA", "vpt": "VPT", "adaptformer": "AdaptFormer"}
RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> dict:
    """One configuration, in this process; returns its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    import timm
    import torch.nn.functional as F

    import vfm_adapters as va

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _rss_bytes()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.image_size, num_classes=0).to(device)
    inject = {
        "rein": va.inject_rein,
        "lora": va.inject_lora,
        "vpt": va.inject_vpt,
        "adaptformer": va.inject_adaptformer,
    }
    if args.method == "freeze":
        model.requires_grad_(False)
    elif args.method in inject:
        inject[args.method](model)
    elif args.method != "full":
        raise SystemExit(f"unknown method {args.method}")
    model.train()
    npt = model.num_prefix_tokens
    head = torch.nn.Linear(model.embed_dim, args.classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(device)
    grid = args.image_size // model.patch_embed.patch_size[0]
    labels = torch.randint(0, args.classes, (args.batch, grid * grid), generator=generator).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        tokens = model.forward_features(images)[:, npt:]
        loss = F.cross_entropy(head(tokens).flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()

    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    for index in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _peak_rss_bytes() - baseline
    trainable_host = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": args.model,
        "method": args.method,
        "device": args.device,
        "image_size": args.image_size,
        "batch": args.batch,
        "trainable_backbone_params": trainable_host,
        "head_params": sum(p.numel() for p in head.parameters()),
        "peak_memory_mib": peak / 2**20,
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "step_cpu_time_s": statistics.median(cpu_times),
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }


def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, no GPU used"


def _chart(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.38
    for offset, (size, name) in enumerate(MODELS.items()):
        sub = {r["method"]: r for r in rows if r["model"] == name}
        xs = [i + (offset - 0.5) * width for i in range(len(METHODS))]
        mem = [sub[m]["peak_memory_mib"] / 1024 if m in sub else 0 for m in METHODS]
        sec = [sub[m]["step_time_s"] if m in sub else 0 for m in METHODS]
        axes[0].bar(xs, mem, width, label=size)
        axes[1].bar(xs, sec, width, label=size)
    for ax, title in zip(axes, ("peak memory of a training step (GiB)", "time of a training step (s)")):
        ax.set_xticks(range(len(METHODS)), [LABELS[m] for m in METHODS])
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    any_row = rows[0]
    fig.suptitle(f"{device.upper()}: batch {any_row['batch']}, {any_row['image_size']}x{any_row['image_size']}, AdamW")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    rows = []
    print(f"{'backbone':<8} {'method':<12} {'trainable':>12} {'peak MiB':>10} {'step s':>8} {'cpu s':>8} {'load':>5}", flush=True)
    for size in args.models:
        for method in args.methods:
            command = [
                sys.executable, __file__, "--worker", "--model", MODELS[size], "--method", method,
                "--device", args.device, "--image-size", str(args.image_size), "--batch", str(args.batch),
                "--classes", str(args.classes), "--warmup", str(args.warmup), "--steps", str(args.steps),
                "--threads", str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{size} {method} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["backbone"] = size
            rows.append(row)
            print(
                f"{size:<8} {LABELS[method]:<12} {row['trainable_backbone_params']:>12,} "
                f"{row['peak_memory_mib']:>10.0f} {row['step_time_s']:>8.2f} {row['step_cpu_time_s']:>8.2f} "
                f"{row['load_average_1min'][1]:>5.1f}",
                flush=True,
            )
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": args.device,
        "machine": _machine(args.device),
        "torch": torch.__version__,
        "threads": args.threads,
        "memory_measure": "peak RSS minus RSS after imports (CPU)" if args.device == "cpu"
        else "torch.cuda.max_memory_allocated minus allocation before the model (CUDA)",
        "rows": rows,
    }
    (args.out / f"memory_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    _chart(rows, args.out / f"memory_{args.device}.png", args.device)
    print(f"wrote {args.out / f'memory_{args.device}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
