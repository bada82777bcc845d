"""Smoke run of the DINOv2-L + Rein + Mask2Former paper config: iterations/s and peak memory.

Trains the model of ``examples/configs/paper/gtav_dinov2_l_rein.yaml`` (random weights:
speed and memory do not depend on them) on synthetic 512x512 batches for a few hundred
iterations on CUDA, with the config's batch size, AdamW and bf16 autocast, and writes
``benchmarks/results/smoke_mask2former.json``.

    python benchmarks/smoke_mask2former.py                 # CUDA, 300 timed iterations
    python benchmarks/smoke_mask2former.py --cpu-tiny      # a tiny model, 3 iterations on CPU

Without CUDA (and without ``--cpu-tiny``) it prints a message and exits with status 0.
``--cpu-tiny`` only proves that the script runs end to end; its numbers say nothing
about the real model's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "configs" / "paper" / "gtav_dinov2_l_rein.yaml"
RESULTS = ROOT / "benchmarks" / "results"

#: A tiny stand-in for the CPU check: same builder, same head code, small sizes.
TINY_MODEL = {
    "backbone": "vit_small_patch14_dinov2",
    "backbone_kwargs": {"img_size": 64, "patch_size": 16, "depth": 4, "embed_dim": 64, "num_heads": 2},
    "pretrained": False,
    "method_options": {"rein": {"link_queries": True, "token_length": 8, "query_dim": 32}},
    "layers": None,
}
TINY_HEAD = {"num_decoder_layers": 2, "num_heads": 2, "ffn_dim": 64, "hidden_dim": 32, "pixel_decoder_layers": 1,
             "pixel_decoder_ffn_dim": 64, "num_points": 256}


def synthetic_batches(count: int, batch: int, size: int, num_classes: int, device: torch.device,
                      seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised random images and blocky label maps (8x8 cells of random classes, some ignored)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=generator)
        cells = torch.randint(0, num_classes, (batch, 8, 8), generator=generator)
        cells[torch.rand(batch, 8, 8, generator=generator) < 0.1] = 255
        labels = torch.nn.functional.interpolate(cells[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        batches.append((images.to(device), labels.to(device)))
    return batches


def run(args: argparse.Namespace) -> dict:
    from vfm_adapters.seg.mask2former import build_mask2former_segmentor
    from vfm_adapters.seg.config import load_config
    from vfm_adapters.seg.optim import parameter_groups

    config = load_config(args.config)
    model_config = dict(config["model"], pretrained=False)
    head_options: dict = {}
    if args.cpu_tiny:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny ops: extra threads only contend
        model_config.update(TINY_MODEL)
        head_options = dict(TINY_HEAD)
        size, batch, iterations, warmup = 64, 2, args.iters or 3, 1
        autocast = torch.autocast("cpu", enabled=False)
    else:
        device = torch.device("cuda")
        size, batch = args.size or int(config["data"]["crop_size"][0]), args.batch_size or int(config["train"]["batch_size"])
        iterations, warmup = args.iters or 300, args.warmup
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = build_mask2former_segmentor(model_config, **head_options).to(device).train()
    optim = config["optim"]
    groups = parameter_groups(model, optim["lr"], optim["weight_decay"], optim["backbone_lr_mult"])
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=optim["lr"])
    batches = synthetic_batches(4, batch, size, int(model_config["num_classes"]), device)

    def step(i: int) -> float:
        images, labels = batches[i % len(batches)]
        with autocast:
            loss = model(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step(i) for i in range(warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(iterations):
        losses.append(step(warmup + i))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "mode": "cpu-tiny (checks the script only; not a performance number)" if args.cpu_tiny else "cuda",
        "config": str(Path(args.config).resolve().relative_to(ROOT)) if Path(args.config).resolve().is_relative_to(ROOT) else str(args.config),
        "backbone": model_config["backbone"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "image_size": size,
        "batch_size": batch,
        "warmup_iterations": warmup,
        "timed_iterations": iterations,
        "seconds": round(seconds, 3),
        "iterations_per_second": round(iterations / seconds, 4),
        "images_per_second": round(iterations * batch / seconds, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "trainable_parameters": trainable,
        "rein_query_link": model.head.link_rein_queries,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "losses_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (paper DINOv2-L Rein by default)")
    parser.add_argument("--iters", type=int, default=0, help="timed iterations (default 300; 3 with --cpu-tiny)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed iterations first (CUDA)")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the config's train.batch_size")
    parser.add_argument("--size", type=int, default=0, help="crop size; default: the config's data.crop_size")
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny model on CPU, a few iterations: checks the script")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/smoke_mask2former[_cpu_tiny].json)")
    args = parser.parse_args(argv)
    if not args.cpu_tiny and not torch.cuda.is_available():
        print("smoke_mask2former: CUDA is not available; nothing measured. "
              "Run on a GPU machine, or use --cpu-tiny to check the script on CPU.")
        return 0
    result = run(args)
    output = Path(args.output) if args.output else RESULTS / ("smoke_mask2former_cpu_tiny.json" if args.cpu_tiny else "smoke_mask2former.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
