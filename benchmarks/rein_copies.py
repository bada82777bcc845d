"""Bytes allocated and host time per Rein call, before and after the copy-free layer update.

One Rein layer on a (B, N, c) hidden state with prefix tokens (CLS + 4 registers, as
DINOv2-reg), forward and forward + backward, three ways:

* ``slice+cat``: what ``Rein.forward`` did before: ``hidden[:, prefix:]`` sliced, the
  reference update on the slice, ``torch.cat`` with the prefix (the old torch path).
* ``torch``: ``rein_update(kernel="torch", num_prefix_tokens=prefix)``: the update over all
  rows with the prefix rows' scale set to zero (no slice, no cat, no slice_backward).
* ``triton`` (``--triton``, CPU through Triton's interpreter, slow): the fused op, which
  reads the patch rows in place and writes one output buffer. Only the bytes of torch's
  own allocations count (the profiler does not see the interpreter's numpy buffers).

Bytes come from the PyTorch profiler (``profile_memory=True``): the sum of the sizes of all
allocations made during one call (``[memory]`` events with a positive size), i.e. the
traffic of new buffers, not the peak. Time is the median host time of ``--repeats`` calls
without the profiler, after a warm-up, in one thread.

Run (2-core CPU, about a minute)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/rein_copies.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from vfm_adapters.kernels import rein_update
from vfm_adapters.kernels.reference import rein_update_reference


def parameters(channels: int, n_tokens: int, gen: torch.Generator) -> list[torch.Tensor]:
    c = channels
    return [
        (torch.randn(n_tokens, c, generator=gen) * 0.5).requires_grad_(),
        (torch.randn(c, c, generator=gen) * c**-0.5).requires_grad_(),
        torch.zeros(c).requires_grad_(),
        (torch.randn(c, c, generator=gen) * c**-0.5).requires_grad_(),
        torch.zeros(c).requires_grad_(),
        torch.tensor(1e-3).requires_grad_(),
    ]


def slice_and_cat(hidden: torch.Tensor, params: list[torch.Tensor], prefix: int) -> torch.Tensor:
    return torch.cat([hidden[:, :prefix], rein_update_reference(hidden[:, prefix:], *params)], dim=1)


def ways(include_triton: bool) -> dict:
    result = {
        "slice+cat": slice_and_cat,
        "torch": lambda h, p, prefix: rein_update(h, *p, kernel="torch", num_prefix_tokens=prefix),
    }
    if include_triton:
        from vfm_adapters.kernels.triton_rein import rein_update_triton

        result["triton"] = lambda h, p, prefix: rein_update_triton(h, *p, num_prefix_tokens=prefix)
    return result


def bytes_allocated(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free is a "[memory]" event of the raw (kineto) trace, with a
    # positive or negative byte count; the summary tables attribute them net per op instead.
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=5)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--triton", action="store_true", help="also the fused op (interpreter on CPU: slow)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rein_copies_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = parameters(args.channels, args.tokens, gen)
    rows = args.prefix + args.patches
    hidden = torch.randn(args.batch, rows, args.channels, generator=gen).requires_grad_()
    grad = torch.randn(args.batch, rows, args.channels, generator=gen)
    activation = args.batch * args.patches * args.channels * 4
    records = []
    for name, fn in ways(args.triton).items():
        def forward():
            with torch.no_grad():
                fn(hidden, params, args.prefix)

        def step():
            fn(hidden, params, args.prefix).backward(grad)

        repeats = 2 if name == "triton" else args.repeats
        record = {
            "way": name,
            "forward_bytes": bytes_allocated(forward),
            "forward_backward_bytes": bytes_allocated(step),
            "forward_ms": 1e3 * median_time(forward, repeats),
            "forward_backward_ms": 1e3 * median_time(step, repeats),
        }
        records.append(record)
    print(f"B={args.batch} N={rows} (prefix {args.prefix}) c={args.channels} m={args.tokens}, fp32, 1 thread; "
          f"one patch activation = {activation / 2**20:.2f} MiB")
    print("| way | forward MiB allocated | fwd+bwd MiB allocated | forward ms | fwd+bwd ms |")
    print("|---|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['way']} | {r['forward_bytes'] / 2**20:.2f} | {r['forward_backward_bytes'] / 2**20:.2f} | "
              f"{r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "records": records}, indent=2))


if __name__ == "__main__":
    main()
