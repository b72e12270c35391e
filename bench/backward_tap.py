"""What reading the loss from `backward()` costs: forward + backward of a tiny model (so that
the fixed cost per call shows, not the model's), bare and with a run attached (no
optimizer step, so only the forward hook and the backward tap run). The difference is the
probe's fixed cost per forward + backward on the training thread.

    python bench/backward_tap.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradwatch


def per_call_us(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        model(x).sum().backward()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="forward + backward calls per timing (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per condition; the fastest counts (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x = nn.Linear(4, 1), torch.randn(2, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    bare = min(per_call_us(model, x, args.calls) for _ in range(args.repeats))
    with (
        tempfile.TemporaryDirectory() as tmp,
        gradwatch.attach(model, optimizer, url=f"file:{Path(tmp) / 'spool.jsonl'}", name="backward-tap"),
    ):
        attached = min(per_call_us(model, x, args.calls) for _ in range(args.repeats))
    print(f"forward + backward of nn.Linear(4, 1): {bare:.1f} us bare, {attached:.1f} us attached: "
          f"+{attached - bare:.1f} us per call (forward hook and backward tap)")


if __name__ == "__main__":
    main()
