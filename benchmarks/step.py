"""Rein's overhead on one training step of a ViT-L: Triton kernels vs PyTorch vs no adapter.

One step = forward of a frozen ``vit_large_patch14_dinov2`` (timm, random init, 512 px,
batch 8, bf16 autocast), a tiny linear head on the patch tokens, cross-entropy against
random labels, backward, and an AdamW step over the trainable parameters. Configurations:

* ``frozen``: no adapter, only the head trains; the input images require grad so that the
  backward runs through the whole backbone, as it must with Rein (whose tokens sit in
  every block). This is the baseline Rein's overhead is measured against.
* ``frozen_head_only``: the same without input gradients (the backward stops at the head),
  for reference: the cost of a frozen backbone when nothing inside it trains.
* ``rein_torch`` / ``rein_triton``: ``va.inject_rein(model, kernel=...)`` (freezes the host,
  adds Rein after all 24 blocks, the paper's defaults), plus the same head.

Overhead = ``(step_rein - step_frozen) / step_frozen``. All configurations are built side
by side and timed interleaved (step i of each before step i + 1 of any, order rotated each
round). Time per step is the median of ``--steps`` steps timed with CUDA events after
``--warmup`` untimed ones; peak memory is ``torch.cuda.max_memory_allocated`` during a step
minus the memory allocated before it, the largest over the timed steps. Before any update
the loss of every configuration is recorded on the same weights and batch; ``rein_torch``
and ``rein_triton`` must agree (``SAME_LOSS_RELATIVE``) or the script exits with status 1.

Usage::

    python benchmarks/step.py            # on a CUDA GPU; writes results/step.{json,png}
    python benchmarks/step.py --dry-run  # CPU, tiny ViT, Triton interpreter: proves the script

Without a CUDA GPU (and without ``--dry-run``) it prints ``skipped: no CUDA GPU`` and exits
with status 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("frozen_head_only", "frozen", "rein_torch", "rein_triton")


def build(config: str, args: argparse.Namespace, device: str):
    import timm

    import vfm_adapters as va

    if args.dry_run:
        model = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=args.image_size
        )
    else:
        model = timm.create_model(args.model, pretrained=False, img_size=args.image_size)
    model = model.to(device)
    if config.startswith("rein"):
        va.inject_rein(model, kernel=config.removeprefix("rein_"))
    else:
        model.requires_grad_(False)
    head = torch.nn.Linear(model.embed_dim, args.classes, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    return model, head, torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05), sum(p.numel() for p in trainable)


class Config:
    """One configuration's model, optimiser, inputs and training step."""

    def __init__(self, config: str, args: argparse.Namespace, device: str) -> None:
        torch.manual_seed(0)  # the same host, Rein and head weights in every configuration
        self.name, self.device = config, device
        self.model, self.head, self.optimizer, self.trainable = build(config, args, device)
        gen = torch.Generator(device="cpu").manual_seed(1)  # the same batch everywhere
        self.images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
        self.images.requires_grad_(config != "frozen_head_only")
        self.prefix = self.model.num_prefix_tokens
        side = args.image_size // self.model.patch_embed.patch_size[0]
        self.labels = torch.randint(0, args.classes, (args.batch, side * side), generator=gen).to(device)

    def loss(self) -> torch.Tensor:
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16):
            tokens = self.model.forward_features(self.images)[:, self.prefix:]
            return F.cross_entropy(self.head(tokens).flatten(0, 1).float(), self.labels.flatten())

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.images.grad = None
        self.loss().backward()
        self.optimizer.step()


def time_configs(args: argparse.Namespace, device: str) -> list[dict]:
    """All configurations built side by side, warmed up, then timed interleaved: step i of
    every configuration runs before step i + 1 of any (order rotated each round), so a
    drift of the machine (clocks, other jobs) hits every configuration alike."""
    configs = [Config(name, args, device) for name in args.configs]
    first_loss = {}
    for config in configs:
        with torch.no_grad():
            first_loss[config.name] = config.loss().item()  # before any update: comparable across configs
        for _ in range(args.warmup):
            config.step()
    times = {c.name: [] for c in configs}
    peaks = {c.name: 0 for c in configs}
    for round_index in range(args.steps):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            if device == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                config.step()
                end.record()
                torch.cuda.synchronize()
                times[config.name].append(start.elapsed_time(end))
                peaks[config.name] = max(peaks[config.name], torch.cuda.max_memory_allocated() - before)
            else:
                began = time.perf_counter()
                config.step()
                times[config.name].append((time.perf_counter() - began) * 1e3)
    return [
        {
            "config": c.name,
            "step_ms": statistics.median(times[c.name]),
            "step_ms_all": times[c.name],
            "trainable_parameters": c.trainable,
            "peak_memory_bytes": peaks[c.name] if device == "cuda" else None,
            "first_loss": first_loss[c.name],
        }
        for c in configs
    ]


# The torch and Triton runs must compute the same model: their first losses (same weights,
# same batch, before any update) may differ by the bf16 rounding of the layer outputs,
# bounded per layer by 14 u of bf16 relative to the update (tests/test_kernels.py); the
# loss is checked within 8 u = 3% relative, far below what a wrong kernel gives.
SAME_LOSS_RELATIVE = 8 * 2.0**-8


def plot(result: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["config"] for r in rows]
    bars = ax.bar(names, [r["step_ms"] for r in rows], color=["#999999", "#666666", "#1f77b4", "#2ca02c"][: len(rows)])
    for bar, row in zip(bars, rows):
        overhead = row.get("overhead_vs_frozen")
        text = f"{row['step_ms']:.1f} ms" + (f"\n{overhead:+.1%}" if overhead is not None else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per training step")
    ax.set_title(f"{result['model']} {result['image_size']}px batch {result['batch']} bf16 ({result['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny ViT on CPU, Triton through the interpreter")
    parser.add_argument("--model", default="vit_large_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=None, help="default 512 (dry run 28)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (dry run 2)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, dry run 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5, dry run 1)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--output-dir", type=Path, default=None, help="default benchmarks/results (a temp dir for --dry-run)")
    args = parser.parse_args(argv)

    if args.dry_run:
        device = "cpu"
        args.model = "vit_small_patch14_dinov2 (depth 2, width 64)"
        defaults = {"image_size": 28, "batch": 2, "steps": 1, "warmup": 1}
        output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="rein_step_dry_run_"))
    else:
        if not torch.cuda.is_available():
            print("skipped: no CUDA GPU (run with --dry-run to exercise the script on CPU)")
            return 0
        device = "cuda"
        defaults = {"image_size": 512, "batch": 8, "steps": 20, "warmup": 5}
        output_dir = args.output_dir or RESULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    rows = time_configs(args, device)
    for row in rows:
        print(f"{row['config']:18s} {row['step_ms']:9.2f} ms/step  trainable {row['trainable_parameters']:>10,d}"
              f"  first loss {row['first_loss']:.5f}"
              + (f"  peak {row['peak_memory_bytes'] / 2**30:.2f} GiB" if row["peak_memory_bytes"] else ""), flush=True)
    losses = {r["config"]: r["first_loss"] for r in rows}
    same_loss = None
    if "rein_torch" in losses and "rein_triton" in losses:
        difference = abs(losses["rein_triton"] - losses["rein_torch"]) / abs(losses["rein_torch"])
        same_loss = difference <= SAME_LOSS_RELATIVE
        print(f"same loss check: rein_triton vs rein_torch relative difference {difference:.2e} "
              f"(bound {SAME_LOSS_RELATIVE:.2e}): {'ok' if same_loss else 'FAILED'}")
    baseline = next((r["step_ms"] for r in rows if r["config"] == "frozen"), None)
    for row in rows:
        row["overhead_vs_frozen"] = None if baseline is None else row["step_ms"] / baseline - 1
        if row["config"].startswith("rein") and baseline is not None:
            print(f"{row['config']}: Rein overhead {row['overhead_vs_frozen']:+.1%} over the frozen backbone")
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "dtype": "bfloat16 autocast",
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "interleaved": True,
        "same_loss": same_loss,
        "rows": rows,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output_dir / "step.json", output_dir / "step.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 1 if same_loss is False else 0


if __name__ == "__main__":
    sys.exit(main())
