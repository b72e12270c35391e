"""What the probe's background thread costs per step record.

    python bench/record_cost.py                  # both parts at the CPU GPT (~1.5 min)
    python bench/record_cost.py --quick          # tiny GPT, a few seconds each (CI)
    python bench/record_cost.py --only path      # the micro-benchmark alone
    python bench/record_cost.py --only thread --sink file   # a file spool, no collector

1. path: one record's way through the background thread, in isolation (warm caches):
   reading the packed vector (`Handoff.read`), writing the record (`build_record`), the
   outbox (`add`, `next_frame`, `sent`) and the frame's text; us per record without and
   with per-layer detail, at the GPT's layout (its layers and param groups), and amortised
   at every=10.
2. thread: the GPT trains with a probe at defaults (every=10) against a real collector
   subprocess (or a file spool); per optimizer step: the CPU time of the probe's thread (from
   its CPU clock, split by wake-up: what it does per record and per frame), the websockets
   client's receiving thread, its wake-ups and frames. Only the GIL is shared with the
   training thread, so its CPU time bounds what it can take from the step (on a machine
   with a core to spare); here it runs cold, after the step has flushed the caches, at
   several times the warm cost of part 1.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from overhead import print_table
from workloads import GPT_SMALL, GPT_TINY, gpt_workload

from gradwatch.collector.ready import wait_for_ready_file
from gradwatch.probe.outbox import Outbox, encode_frame
from gradwatch.probe.record import StepMeta, build_record
from gradwatch.probe.run import Run

BATCH = 20  # records per frame in part 1 (a frame holds what a wake-up finds: 1 to 200 records)


def best_of(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    """Seconds per call, the best of `repeat` timings of `number` calls (gc off)."""
    times = []
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - start) / number)
    finally:
        gc.enable()
    return min(times)


# ---- 1. the path of one record ----------------------------------------------------------------


def path_costs(run: Run, number: int) -> dict[str, dict[str, float]]:
    """us per record of each stage, for a record without and with per-layer detail."""
    layers = len(run._layers)
    vec = run._measure.new_vector()
    vec.copy_(torch.rand_like(vec))
    out = {}
    for detail in (False, True):
        meta = run._recorder.new_meta(detail, detail, run._layers.frozen if detail else (), run.optimizer)
        meta.present, meta.has_loss = set(range(layers)), True
        out["detail" if detail else "scalars"] = stage_costs(run, meta, vec, number)
    return out


def stage_costs(run: Run, meta: StepMeta, vec: torch.Tensor, number: int) -> dict[str, float]:
    layout = run._measure.layout
    pending = run._handoff.put(vec)
    assert pending is not None
    values = run._handoff.read(pending)
    record = build_record(meta, list(values), layout)
    box = Outbox(max_records=BATCH, max_detail_records=BATCH, batch_records=BATCH)

    def through_outbox() -> None:  # a batch of BATCH records in and out
        for _ in range(BATCH):
            box.add(record)
        frame = box.next_frame()
        assert frame is not None
        box.sent(frame, confirmed=True)

    for _ in range(BATCH):
        box.add(record)
    frame = box.next_frame()
    assert frame is not None
    return {
        "read": best_of(lambda: run._handoff.read(pending), number) * 1e6,
        "build": best_of(lambda: build_record(meta, list(values), layout), number) * 1e6,
        "outbox": best_of(through_outbox, number // BATCH) * 1e6 / BATCH,
        "frame text": best_of(lambda: encode_frame(frame), number // BATCH) * 1e6 / BATCH,
    }


def report_path(costs: dict[str, dict[str, float]], layers: int, groups: int) -> None:
    stages = list(costs["scalars"])
    print(f"\n== path: us per record, warm, {layers} layers, {groups} param groups")
    rows = [[kind, *(f"{v:.2f}" for v in c.values()), f"{sum(c.values()):.2f}"] for kind, c in costs.items()]
    amortised = [(9 * costs["scalars"][s] + costs["detail"][s]) / 10 for s in stages]
    rows.append(["every=10", *(f"{v:.2f}" for v in amortised), f"{sum(amortised):.2f}"])
    print_table(["record", *stages, "total"], rows)


# ---- 2. the thread, in a training run --------------------------------------------------------


class ThreadClock:
    """CPU seconds of a thread so far, from its own CPU clock (Linux)."""

    def __init__(self, thread: threading.Thread) -> None:
        assert thread.ident is not None
        self.clock = time.pthread_getcpuclockid(thread.ident)
        self.name = thread.name

    def seconds(self) -> float:
        return time.clock_gettime(self.clock)


class Counted:
    """Wraps the transport's pump and its sink's send: wake-ups, frames, and the thread
    CPU time inside each (read on the background thread itself)."""

    def __init__(self, run: Run) -> None:
        transport = run._transport
        self.wakeups = self.frames = self.records = 0
        self.pump_cpu = self.drain_cpu = self.send_cpu = 0.0
        pump, drain, send = transport._pump, transport._drain_backlog, transport._sink.send

        def counted_pump(final: bool) -> None:
            start = time.thread_time()
            pump(final)
            self.pump_cpu += time.thread_time() - start
            self.wakeups += 1

        def counted_drain() -> None:
            self.records += len(transport._backlog)
            start = time.thread_time()
            drain()
            self.drain_cpu += time.thread_time() - start

        def counted_send(frame: str) -> None:
            start = time.thread_time()
            send(frame)
            self.send_cpu += time.thread_time() - start
            self.frames += 1

        transport._pump, transport._drain_backlog = counted_pump, counted_drain  # type: ignore[method-assign]
        transport._sink.send = counted_send  # type: ignore[method-assign]

    def reset(self) -> None:
        self.wakeups = self.frames = self.records = 0
        self.pump_cpu = self.drain_cpu = self.send_cpu = 0.0


def start_collector(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = Path(data_dir) / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "collector", "--port", "0", "--http-port", "0", "--data", data_dir,
         "--ready-file", str(ready), "--log-level", "WARNING"],
    )
    return process, wait_for_ready_file(ready, process, timeout=60).ws_url


def thread_costs(quick: bool, sink: str, steps: int) -> None:
    cfg, batch = (GPT_TINY, 4) if quick else (GPT_SMALL, 8)
    workload = gpt_workload("gpt", cfg, batch, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as data_dir:
        process, url = (None, f"file:{data_dir}/spool.jsonl") if sink == "file" else start_collector(data_dir)
        try:
            for _ in range(3):
                workload.step()
            before = set(threading.enumerate())
            run = Run(workload.model, workload.optimizer, url=url, name="record-cost", every=10)
            counted = Counted(run)
            for _ in range(5):
                workload.step()
            time.sleep(0.5)  # the warm-up's records are sent
            clocks = [ThreadClock(t) for t in threading.enumerate() if t not in before]
            main = ThreadClock(threading.main_thread())
            counted.reset()
            cpu_before = {c.name: c.seconds() for c in clocks}
            main_before, start = main.seconds(), time.perf_counter()
            step_seconds = []
            for _ in range(steps):
                t = time.perf_counter()
                workload.step()
                step_seconds.append(time.perf_counter() - t)
            wall = time.perf_counter() - start
            main_cpu = main.seconds() - main_before
            time.sleep(0.6)  # the last records are sent
            cpu = {c.name: c.seconds() - cpu_before[c.name] for c in clocks}
            run.detach()
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    step = statistics.median(step_seconds)
    print(f"\n== thread: {steps} steps of the {'tiny ' if quick else ''}GPT at every=10 -> "
          f"{'a file spool' if sink == 'file' else 'a collector subprocess'}; median step {step * 1e3:.1f} ms, "
          f"training thread {1e3 * (wall - main_cpu) / steps:.2f} ms/step off CPU")
    print(f"   records {counted.records}, wake-ups {counted.wakeups / steps:.2f}/step, "
          f"frames {counted.frames / steps:.2f}/step ({counted.records / max(1, counted.frames):.1f} records/frame)")
    rows = []
    for name, seconds in cpu.items():
        rows.append([name, f"{seconds / steps * 1e6:.0f}", f"{100 * seconds / steps / step:.3f}%"])
    n = max(1, counted.records)
    rows += [
        ["  in wake-ups (pump)", f"{counted.pump_cpu / steps * 1e6:.0f}", f"{100 * counted.pump_cpu / steps / step:.3f}%"],
        ["    reading + writing records", f"{counted.drain_cpu / steps * 1e6:.0f}",
         f"({counted.drain_cpu / n * 1e6:.0f} us per record)"],
        ["    sink.send", f"{counted.send_cpu / steps * 1e6:.0f}",
         f"({counted.send_cpu / max(1, counted.frames) * 1e6:.0f} us per frame)"],
    ]
    print_table(["thread (CPU time)", "us/step", "% of step"], rows)


# ---- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny GPT and fewer repetitions (CI)")
    parser.add_argument("--only", choices=("path", "thread"), help="run one part")
    parser.add_argument("--sink", choices=("collector", "file"), default="collector",
                        help="where the training run's records go (default: a collector subprocess)")
    parser.add_argument("--steps", type=int, help="training steps of part 2 (default 150; --quick 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # see bench/overhead.py: one intra-op thread on a shared CPU
    torch.manual_seed(0)
    os.environ.setdefault("GRADWATCH_QUIET", "1")
    if args.only in (None, "path"):
        workload = gpt_workload("gpt", GPT_TINY if args.quick else GPT_SMALL, 4, torch.device("cpu"))
        with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as spool:
            run = Run(workload.model, workload.optimizer, url=f"file:{spool}/spool.jsonl", name="path")
            costs = path_costs(run, 2_000 if args.quick else 20_000)
            run.detach()
        report_path(costs, len(run._layers), len(workload.optimizer.param_groups))
    if args.only in (None, "thread"):
        thread_costs(args.quick, args.sink, args.steps or (200 if args.quick else 150))


if __name__ == "__main__":
    main()
