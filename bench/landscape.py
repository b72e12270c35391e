"""What a loss-landscape slice costs on the CPU GPT of bench/workloads.py: forwards per
point, time per point against a plain evaluation of the same batches, and extra memory.

    python bench/landscape.py                                  # GPT 3.7M, 2 batches of 8 x 128 tokens, 5x5 points
    python bench/landscape.py --directions 1 --points 21
    python bench/landscape.py --gpt2-small --directions 1 --points 3 --batches 1 --repeats 1   # 124M, 1 x 1024

Memory: pairs of fresh processes, one evaluating the batches (as many forwards as the slice
has), one evaluating and then slicing; the difference of their peak RSS is what the slice
adds. They run with glibc mapping every block over 64 KiB on its own and unmapping it when
freed, so that peak RSS follows the peak of live tensors, not the allocator's caching.
Time: a third process, with the usual allocator, alternates evaluation and slice; the
fastest round of each counts (the box is shared: the fastest is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from workloads import GPT2_SMALL, GPT_SMALL, GPT_TINY, gpt_workload

from gradwatch.probe.landscape import landscape

SIZES = {"small": (GPT_SMALL, 8), "tiny": (GPT_TINY, 4), "gpt2-small": (GPT2_SMALL, 1)}
ROUNDS = 3  # alternated evaluation / slice rounds in the timing process


def measure(condition: str, size: str, directions: int, points: int, batches: int) -> dict[str, Any]:
    """One fresh process: "evaluate" or "landscape" (memory), or "timing"."""
    torch.manual_seed(0)
    cfg, batch = SIZES[size]
    workload = gpt_workload("gpt", cfg, batch, torch.device("cpu"))
    model, data = workload.model, workload.batches[:batches]
    grid = points**directions
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    model.eval()

    def evaluate() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(grid):
                float(torch.stack([model(*b) for b in data]).mean())
        return (time.perf_counter() - started) / grid

    def sliced() -> float:
        forwards[0] = 0
        started = time.perf_counter()
        landscape(model, data, directions=directions, points=points)
        return (time.perf_counter() - started) / grid

    with torch.no_grad():
        model(*data[0])  # the first forward's one-off set-up is no condition's cost
    if condition != "timing":
        evaluate()
        if condition == "landscape":
            sliced()
        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    rounds = [(evaluate(), sliced()) for _ in range(ROUNDS)]
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "largest_tensor_bytes": max(p.numel() * p.element_size() for p in params),
        "forwards_per_point": forwards[0] / grid,
        "evaluate_seconds": min(e for e, _ in rounds),
        "landscape_seconds": min(s for _, s in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny GPT")
    parser.add_argument("--gpt2-small", action="store_true", help="GPT-2 small (124M), batches of 1 x 1024 tokens")
    parser.add_argument("--directions", type=int, default=2)
    parser.add_argument("--points", type=int, default=5, help="per direction (default 5: 25 points for 2)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="times each process runs (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    parser.add_argument("--condition", choices=["evaluate", "landscape", "timing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "gpt2-small" if args.gpt2_small else "tiny" if args.quick else "small"
    torch.set_num_threads(args.threads)
    if args.condition:
        print(json.dumps(measure(args.condition, size, args.directions, args.points, args.batches)))
        return

    def run(condition: str, env: dict[str, str]) -> dict[str, Any]:
        command = [sys.executable, __file__, "--condition", condition, "--directions", str(args.directions),
                   "--points", str(args.points), "--batches", str(args.batches), "--threads", str(args.threads),
                   *(["--quick"] * args.quick), *(["--gpt2-small"] * args.gpt2_small)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **env})
        return json.loads(done.stdout)

    mapped = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    extra, timings = [], []
    for _ in range(args.repeats):
        extra.append(run("landscape", mapped)["peak_rss_bytes"] - run("evaluate", mapped)["peak_rss_bytes"])
        timings.append(run("timing", {}))
    first, mib = timings[0], 2**20
    evaluate = min(t["evaluate_seconds"] for t in timings)
    sliced = min(t["landscape_seconds"] for t in timings)
    print(f"GPT {first['params'] / 1e6:.2f}M params ({first['weight_bytes'] / mib:.1f} MiB, largest tensor "
          f"{first['largest_tensor_bytes'] / mib:.1f} MiB), {args.batches} batches, "
          f"{args.points}^{args.directions} points, {args.threads} threads")
    print(f"forwards per point: {first['forwards_per_point']:g}")
    print(f"time per point: {sliced * 1e3:.0f} ms, plain evaluation of the same batches {evaluate * 1e3:.0f} ms "
          f"(x{sliced / evaluate:.2f}; fastest of {ROUNDS * args.repeats})")
    print(f"extra peak RSS: {', '.join(f'{x / mib:.1f}' for x in extra)} MiB "
          f"(the copy of the weights: {first['weight_bytes'] / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
