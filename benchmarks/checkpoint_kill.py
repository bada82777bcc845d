"""Kills ``save_adapters`` with SIGKILL at random moments and checks what is left on disk.

A child process (forked, so no import per trial) saves two different adapter sets
(Rein with 5 and with 7 tokens) into one directory in a loop; the parent kills it after
a random delay, then loads the directory into a fresh model. A trial passes when the
checkpoint loads and equals one of the two sets bit-exactly.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/checkpoint_kill.py --trials 200
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import time

import timm
import torch

import vfm_adapters as va


def make_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=64, num_heads=2, img_size=56).eval()


def adapted(token_length: int, seed: int) -> torch.nn.Module:
    model = va.inject_rein(make_vit(), token_length=token_length, rank=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in va.adapter_parameters(model):
            param.add_(torch.randn(param.shape, generator=generator))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(args.seed)
    models = [adapted(5, 1), adapted(7, 2)]
    expected = [{k: v.detach().clone() for k, v in va.adapter_state_dict(m).items()} for m in models]

    directory = tempfile.mkdtemp()
    va.save_adapters(models[0], directory)
    start = time.perf_counter()
    for _ in range(20):
        va.save_adapters(models[1], directory)
    one_save = (time.perf_counter() - start) / 20

    outcomes = {"old or new, whole": 0, "failed to load": 0, "loaded something else": 0}
    errors: list[str] = []
    for _ in range(args.trials):
        pid = os.fork()
        if pid == 0:  # child: save forever
            index = 0
            while True:
                va.save_adapters(models[index % 2], directory)
                index += 1
        time.sleep(random.uniform(0, 4 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            values = va.adapter_state_dict(va.load_adapters(make_vit(), directory))
        except Exception as error:  # noqa: BLE001 - counting failures is the point
            outcomes["failed to load"] += 1
            errors.append(f"{type(error).__name__}: {str(error)[:160]}")
            continue
        whole = any(
            values.keys() == e.keys() and all(values[k].shape == e[k].shape and torch.equal(values[k], e[k]) for k in e)
            for e in expected
        )
        outcomes["old or new, whole" if whole else "loaded something else"] += 1
    print(f"one save: {one_save * 1000:.1f} ms; {args.trials} kills at uniform(0, {4 * one_save * 1000:.0f} ms)")
    for name, count in outcomes.items():
        print(f"  {name}: {count}")
    for error in sorted(set(errors))[:3]:
        print(f"  e.g. {error}")


if __name__ == "__main__":
    main()
