"""What the probe costs a training step, next to what users would run instead.

    python bench/overhead.py                  # CPU-sized GPT, MLP, CNN+BN, GPT accum+AMP (minutes)
    python bench/overhead.py --quick          # tiny versions, under a minute (CI)
    python bench/overhead.py --device cuda --gpt2-small   # GPT-2 small, fp32/AMP fp16, accum 1/8

Every condition lives in ONE process on ONE model: all monitors are attached at once and
switched on one step at a time. A round runs each condition's step in a random order and
then in reverse (A-B-C...C-B-A), so drift of a shared machine (other jobs, clocks,
thermals) and the after-effects of one condition on the next step hit every condition alike; ratios against bare are taken per round and
summarised by their median and by the ratio of totals (the amortised cost, which counts
the every-N-th-step work that a median skips), each with a bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass, field

import torch
from monitors import (
    Gradwatch,
    HookTimer,
    Monitor,
    NaiveNorms,
    TensorBoardHistograms,
    WandbLike,
    tensorboard_writer,
)
from workloads import Workload, default_workloads, gpt2_small_workloads

BOOTSTRAP_RESAMPLES = 2000


@dataclass
class Samples:
    """What one condition measured over the rounds of one workload."""

    round_seconds: list[float] = field(default_factory=list)  # its two steps of each round
    own_seconds: float = 0.0  # inside the monitor: probe hooks or after_step logging
    steps: int = 0
    peak_bytes: int = 0  # CUDA: highest max_memory_allocated over its steps


# ---- measuring ----------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes/s of a large tensor copy (read + write), the floor any norm pass runs at."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def probe_bytes_per_step(workload: Workload, every: int) -> float:
    """Bytes of memory traffic the probe's kernels need per optimizer step, amortised.
    Every step reads each gradient once (one fused norm); a detail step also copies the
    weights into the snapshot (read + write), reads them for ||w||, forms Δw = snapshot - w
    in place (two reads, one write) and reads Δw for its norm: 7 passes over the weights."""
    params = [p for p in workload.model.parameters() if p.requires_grad]
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    return weight_bytes + 7 * weight_bytes / every  # gradients have the parameters' dtype


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(workload: Workload, monitor: Monitor, timer: HookTimer, samples: Samples) -> float:
    """One optimizer step with `monitor` on; returns its wall time and books the rest."""
    device = workload.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    monitor.switch(True)
    sync(device)
    start = time.perf_counter()
    workload.step()
    sync(device)  # so that after_step's own time does not include the step's kernels
    logged = time.perf_counter()
    monitor.after_step()
    sync(device)
    end = time.perf_counter()
    monitor.switch(False)
    samples.own_seconds += timer.take() + (end - logged)
    samples.steps += 1
    if cuda:
        samples.peak_bytes = max(samples.peak_bytes, torch.cuda.max_memory_allocated(device))
    return end - start


def run_rounds(
    workload: Workload, monitors: list[Monitor], timer: HookTimer, *, warmup: int, min_rounds: int, seconds: float
) -> dict[str, Samples]:
    """Warm-up rounds (discarded), then rounds until `seconds` have passed and at least
    `min_rounds` were recorded."""

    def play_round(index: int, book: dict[str, Samples]) -> None:
        # A fresh random order each round: a rotation would keep every condition behind the
        # same neighbour, and a step right after an allocation-heavy logger runs slower.
        order = random.Random(index).sample(monitors, len(monitors))
        this_round = {m.name: 0.0 for m in monitors}
        for monitor in order + order[::-1]:
            this_round[monitor.name] += timed_step(workload, monitor, timer, book[monitor.name])
        for name, round_seconds in this_round.items():
            book[name].round_seconds.append(round_seconds)

    scratch = {m.name: Samples() for m in monitors}
    for index in range(warmup):
        play_round(index, scratch)
    results = {m.name: Samples() for m in monitors}
    deadline = time.perf_counter() + seconds
    while len(results["bare"].round_seconds) < min_rounds or time.perf_counter() < deadline:
        play_round(len(results["bare"].round_seconds), results)
    return results


# ---- statistics ---------------------------------------------------------------------------


def ratio_with_interval(condition: list[float], bare: list[float]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(median of per-round ratios, ratio of totals), each as (estimate, low, high) with a
    bootstrap 95% interval over rounds (rounds are resampled as pairs)."""
    c, b = torch.tensor(condition, dtype=torch.float64), torch.tensor(bare, dtype=torch.float64)
    picks = torch.randint(len(c), (BOOTSTRAP_RESAMPLES, len(c)), generator=torch.Generator().manual_seed(0))
    medians = (c[picks] / b[picks]).quantile(0.5, dim=1)
    totals = c[picks].sum(1) / b[picks].sum(1)
    bounds = torch.tensor([0.025, 0.975], dtype=torch.float64)
    median_low, median_high = medians.quantile(bounds).tolist()
    total_low, total_high = totals.quantile(bounds).tolist()
    return (
        ((c / b).quantile(0.5).item(), median_low, median_high),
        ((c.sum() / b.sum()).item(), total_low, total_high),
    )


# ---- reporting ----------------------------------------------------------------------------


def _fmt_si(n: float, units: tuple[str, ...]) -> str:
    """`n` with three significant digits and the first unit (powers of 1000) that fits."""
    for unit in units[:-1]:
        if n < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}{units[-1]}"


def fmt_bytes(n: float) -> str:
    return _fmt_si(n, (" B", " KB", " MB", " GB", " TB"))


def fmt_signed_bytes(n: float) -> str:
    return ("-" if n < 0 else "+") + fmt_bytes(abs(n))


def fmt_count(n: float) -> str:
    return _fmt_si(n, ("", "K", "M", "G", "T"))


def fmt_ratio(estimate: tuple[float, float, float]) -> str:
    value, low, high = estimate
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


@dataclass
class SummaryRow:
    conditions: list[str]  # the columns after the workload's own
    cells: list[str]


def report(workload: Workload, monitors: list[Monitor], results: dict[str, Samples], bandwidth: float) -> SummaryRow:
    bare = results["bare"]
    bare_step = sorted(bare.round_seconds)[len(bare.round_seconds) // 2] / 2
    params = list(workload.model.parameters())
    probe_floor = {every: probe_bytes_per_step(workload, every) for every in (10, 1)}
    print(
        f"\n== {workload.name}: {fmt_count(sum(p.numel() for p in params))} parameters in {len(params)} tensors, "
        f"{workload.items_per_step} {workload.item_kind}/step (accumulation {workload.accumulation}"
        f"{', AMP ' + str(workload.amp_dtype).removeprefix('torch.') if workload.amp_dtype else ''}), "
        f"bare step {bare_step * 1e3:.1f} ms (median), {len(bare.round_seconds)} rounds"
    )
    for every, traffic in probe_floor.items():
        floor = traffic / bandwidth
        print(
            f"   probe memory traffic at every={every}: {fmt_bytes(traffic)}/step -> bandwidth floor "
            f"{floor * 1e3:.3f} ms = {100 * floor / bare_step:.2f}% of the bare step"
        )
    cuda = workload.device.type == "cuda"
    header = ["condition", "median step/bare [95% CI]", "total step/bare [95% CI]", "own ms/step", "own % of step",
              "buffers held", *(["step peak mem vs bare"] if cuda else []), "wandb-like÷this"]
    # Own time net of bare's, which is what the paused probes and the timing hooks cost.
    bare_own = bare.own_seconds / bare.steps
    own = {m.name: results[m.name].own_seconds / results[m.name].steps - bare_own for m in monitors}
    wandb_own = {m.frequency: own[m.name] for m in monitors if isinstance(m, WandbLike)}
    default_floor = probe_floor[10] / bandwidth
    summary = [workload.name, fmt_count(sum(p.numel() for p in params)), str(len(params)), str(workload.items_per_step),
               f"{bare_step * 1e3:.1f}", f"{100 * default_floor / bare_step:.2f}%"]
    rows = [["bare", "1", "1", f"{bare_own * 1e3:.3f} (hooks paused)", "", "", *([""] if cuda else []), ""]]
    for monitor in monitors[1:]:
        samples = results[monitor.name]
        held = monitor.held_bytes()
        memory = ["-" if held is None else fmt_bytes(held)]
        if cuda:  # transient allocations during its steps (persistent buffers are in every step's peak)
            memory.append(fmt_signed_bytes(samples.peak_bytes - bare.peak_bytes))
        cheaper = (f"{wandb_own[monitor.frequency] / own[monitor.name]:.0f}x"
                   if isinstance(monitor, Gradwatch) and monitor.frequency in wandb_own else "")
        own_share = f"{100 * own[monitor.name] / bare_step:.2f}%"
        median, total = ratio_with_interval(samples.round_seconds, bare.round_seconds)
        rows.append([monitor.name, fmt_ratio(median), fmt_ratio(total), f"{own[monitor.name] * 1e3:.3f}", own_share,
                     *memory, cheaper])
        summary.append(f"{fmt_ratio(median)} ({own_share})")
    print_table(header, rows)
    for monitor in monitors:
        for problem in monitor.problems():
            print(f"   !! {problem}")
    if cuda:
        clean = all(not m.problems() for m in monitors if isinstance(m, Gradwatch))
        print(f"   probe hooks under torch.cuda.set_sync_debug_mode('error'): {'no host-device sync' if clean else 'SYNC FOUND'}")
    return SummaryRow([m.name for m in monitors if m.name != "bare"], summary)


# ---- main ---------------------------------------------------------------------------------


def attach_monitors(workload: Workload, spool_dir: str, tensorboard: bool) -> tuple[list[Monitor], HookTimer]:
    """Every condition, bare first (the reference every ratio divides by), and the timer
    around gradwatch's hooks."""
    timer = HookTimer(workload)  # its starting hooks must come before the probes' hooks
    monitors: list[Monitor] = [
        Monitor(),
        Gradwatch(workload, 10, spool_dir),
        Gradwatch(workload, 1, spool_dir),
        Gradwatch(workload, 1, spool_dir, update_ratio=False),  # what the weight snapshot for Δw costs
    ]
    timer.close_around()
    monitors += [NaiveNorms(workload.model), WandbLike(workload.model, 1), WandbLike(workload.model, 100)]
    writer = tensorboard_writer() if tensorboard else None
    if writer is not None:
        monitors.append(TensorBoardHistograms(workload.model, writer))
    return monitors, timer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints one table per workload and a summary.",
        epilog="Ratios are step time with the condition on / bare step time in the same round; "
        "1.010 means +1%. 'own ms/step' is time inside the monitor, net of bare's (for gradwatch: inside its "
        "hooks on the training thread). 'wandb-like÷this' compares own time with the wandb-like logger at the same frequency.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and a few rounds (< 1 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--gpt2-small", action="store_true", help="GPT-2 small (124M): fp32 and AMP fp16, accumulation 1 and 8 (for a GPU)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size for --gpt2-small (sequences of 1024)")
    parser.add_argument("--seconds", type=float, help="measuring time per workload (default 60; --quick 3)")
    parser.add_argument("--min-rounds", type=int, help="rounds per workload at least (default 8; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds before measuring (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1: see docs/performance.md)")
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s for the floor (default: measured with a copy)")
    parser.add_argument("--only", nargs="+", metavar="WORKLOAD", help="run only these workloads")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard even if it is installed")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 60.0)
    min_rounds = args.min_rounds if args.min_rounds is not None else (2 if args.quick else 8)
    torch.manual_seed(0)
    # On a shared CPU, a multi-threaded op waits at OpenMP's barrier for whichever of its
    # threads another process descheduled: 0.3 ms copies then take 10-40 ms at random.
    torch.set_num_threads(args.threads)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth(device, 64 if args.quick else 512)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'torch threads: {torch.get_num_threads()}'}), "
        f"torch {torch.__version__}, memory bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"({'given' if args.bandwidth else 'measured: tensor copy, read + write'})"
    )
    factories = gpt2_small_workloads(device, args.batch) if args.gpt2_small else default_workloads(device, args.quick)
    unknown = set(args.only or ()) - factories.keys()
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {sorted(factories)}")
    summaries: list[SummaryRow] = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as spool_dir:
        for name, factory in factories.items():
            if args.only and name not in args.only:
                continue
            workload = factory()
            monitors, timer = attach_monitors(workload, spool_dir, not args.no_tensorboard)
            results = run_rounds(workload, monitors, timer, warmup=args.warmup, min_rounds=min_rounds, seconds=seconds)
            summaries.append(report(workload, monitors, results, bandwidth))
            for monitor in monitors:
                monitor.close()
            timer.remove()
            del workload, monitors
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\n== summary: median step time / bare [bootstrap 95% CI] (monitor's own time as % of the bare step)")
    print_table(["workload", "params", "tensors", "items/step", "bare ms", "floor every=10", *summaries[0].conditions],
                [s.cells for s in summaries])


if __name__ == "__main__":
    main()
