"""What the probe costs a training step, next to what users would run instead.

    python bench/overhead.py                  # CPU-sized GPT, MLP, CNN+BN, GPT accum+AMP (~15 min)
    python bench/overhead.py --quick          # tiny versions, under a minute (CI)
    python bench/overhead.py --device cuda --gpt2-small   # GPT-2 small, fp32/AMP fp16, accum 1/8
    python bench/overhead.py --device cpu --gpt2-small --quick   # that path, smoke-run on the CPU

Conditions: bare; gradwatch at defaults (every=10), every=1, every=1 without ||Δw||; a naive
`.norm().item()` loop; and, where installed (bench/requirements.txt), the real anchors:
wandb.watch(log="all") offline and TensorBoard add_histogram of every weight and gradient.

Every condition lives in ONE process on ONE model: all monitors are attached at once and
switched on one BLOCK of consecutive steps at a time. A round runs each condition's block
in a random order and then in reverse (A-B-C...C-B-A), so drift of a shared machine and
the after-effects of one condition on the next hit every condition alike. Blocks, not
single steps, because the probe works on a background thread (it builds, encodes and writes
each step's record): with one step per condition that work lands in whatever step runs next,
often a bare one, which would pay for it. Within a block it lands in the condition's own
later steps; only the work of a block's last moments spills over its end (the background
CPU that ran during the other conditions' blocks, an upper bound of it, is printed per
workload). A block lasts about --block-seconds (bare, gradwatch and the naive loop share one
length, a multiple of 5 so that a round of two blocks holds every=10's detail step exactly
once per 10 steps; the slower anchors get shorter blocks of at least 2 steps).

Per round, each condition's wall time per step is divided by bare's; the tables give the
median of those ratios and the ratio of totals, each with a bootstrap 95% interval over
rounds, next to each monitor's own time on the training thread (inside its hooks, or its
after-step logging) and the CPU time of its background thread or process during its own
blocks. On the CPU the ratio of CPU time (this process's threads and the anchors'
processes) comes too: another job on a shared machine stretches wall time, not CPU time.

On a GPU the device is synchronized at each block's ends only (and around after-step
logging, which reads the device anyway), the probe's hooks run under
torch.cuda.set_sync_debug_mode("error"), and each block's peak memory is compared with
bare's. GPT-2 small takes a few minutes per workload there; --only runs one at a time.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import tempfile
import time
from dataclasses import dataclass, field

import torch
from monitors import (
    INSTALL_HINT,
    Gradwatch,
    HookTimer,
    Monitor,
    NaiveNorms,
    TensorBoardHistograms,
    WandbSession,
    WandbWatch,
    tensorboard_writer,
    version,
    wandb_installed,
)
from workloads import Workload, default_workloads, gpt2_small_workloads

BOOTSTRAP_RESAMPLES = 2000
TARGET = 1.01  # gradwatch at defaults, wall time against bare
MIN_ROUNDS_FOR_VERDICT = 5  # fewer rounds make a bootstrap interval meaningless


@dataclass
class Samples:
    """What one condition measured over the rounds of one workload."""

    block: int = 1  # steps per block
    round_step_seconds: list[float] = field(default_factory=list)  # per round: wall time / steps
    round_step_cpu: list[float] = field(default_factory=list)  # per round: CPU time / steps (see cpu_seconds)
    own_seconds: float = 0.0  # on the training thread, inside the monitor
    background_seconds: float | None = None  # CPU of its background thread or process, in its blocks
    background_elsewhere: float = 0.0  # ... and in the other conditions' blocks
    steps: int = 0
    peak_bytes: int = 0  # CUDA: highest max_memory_allocated over its blocks


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


def weight_bytes(workload: Workload) -> int:
    return sum(p.numel() * p.element_size() for p in workload.model.parameters() if p.requires_grad)


def probe_bytes_per_step(workload: Workload, every: int) -> float:
    """Bytes of memory traffic the probe's kernels need per optimizer step, amortised.
    Every step reads each gradient once (one fused norm); a detail step also copies the
    weights into the snapshot (read + write), reads them for ||w||, forms Δw = snapshot - w
    in place (two reads, one write) and reads Δw for its norm: 7 passes over the weights."""
    weights = weight_bytes(workload)
    return weights + 7 * weights / every  # gradients have the parameters' dtype


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds(monitors: list[Monitor]) -> float:
    """CPU time of this process (every thread) and of the monitors' own processes (wandb's
    service): unlike wall time, it does not grow when another job takes the core."""
    return time.process_time() + sum(m.background.process_seconds() for m in monitors if m.background)


def background_cpu(monitors: list[Monitor]) -> dict[str, float]:
    readings = {m.name: m.background.cpu_seconds() if m.background else None for m in monitors}
    return {name: value for name, value in readings.items() if value is not None}


def run_block(workload: Workload, monitors: list[Monitor], monitor: Monitor, timer: HookTimer, steps: int,
              book: dict[str, Samples]) -> tuple[float, float]:
    """`steps` optimizer steps with `monitor` on; returns their wall and CPU time and books the rest
    (the background CPU time of every monitor during the block, to it or elsewhere).
    The device is synchronized at the block's ends only, and around the after-step logging
    of the monitors that have one (they read the device there anyway)."""
    device = workload.device
    cuda = device.type == "cuda"
    samples = book[monitor.name]
    cpu_before = background_cpu(monitors)
    monitor.switch(True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    cpu_start = cpu_seconds(monitors)
    start = time.perf_counter()
    for _ in range(steps):
        workload.step()
        if monitor.logs_after_step:
            sync(device)  # so that its own time does not include the step's kernels
            logged = time.perf_counter()
            monitor.after_step()
            sync(device)
            samples.own_seconds += time.perf_counter() - logged
    sync(device)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(monitors) - cpu_start
    monitor.switch(False)
    samples.own_seconds += timer.take() + monitor.take_own_seconds()
    samples.steps += steps
    if cuda:
        samples.peak_bytes = max(samples.peak_bytes, torch.cuda.max_memory_allocated(device))
    for name, after in background_cpu(monitors).items():
        if name not in cpu_before:
            continue
        if name == monitor.name:
            samples.background_seconds = (samples.background_seconds or 0.0) + after - cpu_before[name]
        else:
            book[name].background_elsewhere += after - cpu_before[name]
    return wall, cpu


def block_sizes(monitors: list[Monitor], step_seconds: dict[str, float], block_seconds: float,
                fixed: int | None) -> dict[str, int]:
    """Steps per block: `fixed`, or about `block_seconds` per block. Bare, gradwatch and the
    naive loop share one length, a multiple of 5 (every=10: one detail step per two blocks);
    slower conditions get fewer steps, at least 2."""
    if fixed is not None:
        return {m.name: fixed for m in monitors}
    main = 5 * math.ceil(max(1, math.ceil(block_seconds / step_seconds["bare"])) / 5)
    sizes = {}
    for m in monitors:
        if isinstance(m, (Gradwatch, NaiveNorms)) or m.name == "bare":
            sizes[m.name] = main
        else:
            sizes[m.name] = min(main, max(2, math.ceil(block_seconds / step_seconds[m.name])))
    return sizes


def run_rounds(
    workload: Workload, monitors: list[Monitor], timer: HookTimer, *, warmup: int, min_rounds: int,
    seconds: float, block_seconds: float, fixed_block: int | None,
) -> dict[str, Samples]:
    """Warm-up rounds (short blocks, discarded; they also time each condition's step to size
    its blocks), then rounds until `seconds` have passed and at least `min_rounds` were recorded."""
    order_rng = random.Random(0)

    def play_round(blocks: dict[str, int], book: dict[str, Samples]) -> None:
        # A fresh random order each round: a rotation would keep every condition behind the
        # same neighbour, and a step right after an allocation-heavy logger runs slower.
        order = order_rng.sample(monitors, len(monitors))
        wall = {m.name: 0.0 for m in monitors}
        cpu = {m.name: 0.0 for m in monitors}
        for monitor in order + order[::-1]:
            block_wall, block_cpu = run_block(workload, monitors, monitor, timer, blocks[monitor.name], book)
            wall[monitor.name] += block_wall
            cpu[monitor.name] += block_cpu
        for name, block_wall in wall.items():
            book[name].round_step_seconds.append(block_wall / (2 * blocks[name]))
            book[name].round_step_cpu.append(cpu[name] / (2 * blocks[name]))

    warm_block = 1 if fixed_block is not None else 2
    scratch = {m.name: Samples() for m in monitors}
    for _ in range(warmup):
        play_round({m.name: warm_block for m in monitors}, scratch)
    step_seconds = {name: min(s.round_step_seconds) for name, s in scratch.items() if s.round_step_seconds}
    if fixed_block is None and not step_seconds:
        fixed_block = 2  # no warm-up: nothing to size the blocks by
    blocks = block_sizes(monitors, step_seconds, block_seconds, fixed_block)

    results = {m.name: Samples(block=blocks[m.name]) for m in monitors}
    deadline = time.perf_counter() + seconds
    while len(results["bare"].round_step_seconds) < min_rounds or time.perf_counter() < deadline:
        play_round(blocks, results)
    return results


# ---- statistics ---------------------------------------------------------------------------


Estimate = tuple[float, float, float]  # value, 95% interval low, high


def ratio_with_interval(condition: list[float], bare: list[float]) -> tuple[Estimate, Estimate]:
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


def verdict(total: Estimate, rounds: int) -> str:
    """The default probe's ratio of totals against the target."""
    _, low, high = total
    if rounds < MIN_ROUNDS_FOR_VERDICT:
        return f"too few rounds ({rounds})"
    if high <= TARGET:
        return f"within {TARGET:.2f} (95% CI)"
    if low > TARGET:
        return f"over {TARGET:.2f} (95% CI)"
    return f"not resolved: CI spans {TARGET:.2f}"


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


def fmt_ratio(estimate: Estimate) -> str:
    value, low, high = estimate
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def report(workload: Workload, monitors: list[Monitor], results: dict[str, Samples], bandwidth: float) -> list[list[str]]:
    """Prints the workload's table; returns its rows for the summary."""
    bare = results["bare"]
    bare_step = sorted(bare.round_step_seconds)[len(bare.round_step_seconds) // 2]
    params = list(workload.model.parameters())
    print(
        f"\n== {workload.name}: {fmt_count(sum(p.numel() for p in params))} parameters in {len(params)} tensors, "
        f"{workload.items_per_step} {workload.item_kind}/step (accumulation {workload.accumulation}"
        f"{', AMP ' + str(workload.amp_dtype).removeprefix('torch.') if workload.amp_dtype else ''}), "
        f"bare step {bare_step * 1e3:.1f} ms (median of rounds), {len(bare.round_step_seconds)} rounds"
    )
    for every in (10, 1):
        traffic = probe_bytes_per_step(workload, every)
        floor = traffic / bandwidth
        print(
            f"   probe kernels' memory traffic at every={every}: {fmt_bytes(traffic)}/step -> bandwidth floor "
            f"{floor * 1e3:.3f} ms = {100 * floor / bare_step:.2f}% of the bare step"
        )
    cuda = workload.device.type == "cuda"
    header = ["condition", "steps/block", "wall/bare, median [95% CI]", "wall/bare, total [95% CI]",
              *([] if cuda else ["CPU/bare, total [95% CI]"]), "own ms/step", "own %", "bg CPU ms/step", "bg %", "buffers held",
              *(["peak mem vs bare"] if cuda else []), "wandb÷this"]
    # Own time net of bare's, which is what the paused probes and the timing hooks cost.
    bare_own = bare.own_seconds / bare.steps
    own = {m.name: results[m.name].own_seconds / results[m.name].steps - bare_own for m in monitors}
    background = {m.name: (results[m.name].background_seconds / results[m.name].steps
                           if results[m.name].background_seconds is not None else None) for m in monitors}
    anchor = next((m.name for m in monitors if isinstance(m, WandbWatch)), None)

    def total_cpu(name: str) -> float:
        return own[name] + (background[name] or 0.0)

    floor = 2 * weight_bytes(workload) / bandwidth
    rows = [
        ["bare", str(bare.block), "1", "1", *([] if cuda else ["1"]), f"{bare_own * 1e3:.3f} (hooks paused)", "", "",
         "", "", *([""] if cuda else []), ""],
        ["bandwidth floor: 1 read of grads + weights", "", f">= {1 + floor / bare_step:.3f}", "",
         *([] if cuda else [""]), f"{floor * 1e3:.3f}", f"{100 * floor / bare_step:.2f}%", "", "", "", *([""] if cuda else []), ""],
    ]
    summary = []
    spill = []
    for monitor in monitors[1:]:
        samples = results[monitor.name]
        held = monitor.held_bytes()
        memory = ["-" if held is None else fmt_bytes(held)]
        if cuda:  # held buffers + transient allocations during its blocks (bare's peak has every held buffer)
            memory.append(fmt_signed_bytes((held or 0) + samples.peak_bytes - bare.peak_bytes))
        cheaper = ""
        if anchor and isinstance(monitor, Gradwatch) and monitor.frequency == 1 and total_cpu(monitor.name) > 0:
            cheaper = f"{total_cpu(anchor) / total_cpu(monitor.name):.0f}x"
        bg = background[monitor.name]
        bg_cells = ["", ""] if bg is None else [f"{bg * 1e3:.3f}", f"{100 * bg / bare_step:.2f}%"]
        if bg is not None:
            spill.append(f"{monitor.name} {100 * samples.background_elsewhere / samples.steps / bare_step:.3f}%")
        own_share = f"{100 * own[monitor.name] / bare_step:.2f}%"
        median, total = ratio_with_interval(samples.round_step_seconds, bare.round_step_seconds)
        # on a GPU the CPU time says little (the host waits in synchronize): left out there
        cpu = [] if cuda else [fmt_ratio(ratio_with_interval(samples.round_step_cpu, bare.round_step_cpu)[1])]
        rows.append([monitor.name, str(samples.block), fmt_ratio(median), fmt_ratio(total), *cpu,
                     f"{own[monitor.name] * 1e3:.3f}", own_share, *bg_cells, *memory, cheaper])
        target = verdict(total, len(samples.round_step_seconds)) if isinstance(monitor, Gradwatch) and monitor.frequency == 10 else ""
        summary.append([workload.name, monitor.name, fmt_ratio(median), fmt_ratio(total), *cpu, own_share,
                        bg_cells[1], target])
    print_table(header, rows)
    if spill:
        print("   background CPU that ran during the other conditions' blocks (spill over a block's end, idle "
              "wake-ups), per step of the condition, % of the bare step (at most what the blocks leave "
              f"uncharged): {', '.join(spill)}")
    for monitor in monitors:
        for problem in monitor.problems():
            print(f"   !! {problem}")
    if cuda:
        clean = all(not m.problems() for m in monitors if isinstance(m, Gradwatch))
        print(f"   probe hooks under torch.cuda.set_sync_debug_mode('error'): {'no host-device sync' if clean else 'SYNC FOUND'}")
    return summary


# ---- main ---------------------------------------------------------------------------------


@dataclass
class Anchors:
    """The real libraries next to the probe: which run, which were skipped and why."""

    wandb: WandbSession | None = None
    tensorboard: bool = False
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, no_wandb: bool, no_tensorboard: bool) -> Anchors:
        anchors = cls()
        if no_wandb:
            anchors.skipped.append("wandb (--no-wandb)")
        elif not wandb_installed():
            anchors.missing.append("wandb")
        else:
            try:
                anchors.wandb = WandbSession()
            except Exception as err:  # noqa: BLE001 (an anchor that cannot start is skipped, loudly)
                anchors.skipped.append(f"wandb (wandb.init failed: {type(err).__name__}: {err})")
        if no_tensorboard:
            anchors.skipped.append("tensorboard (--no-tensorboard)")
        elif tensorboard_writer() is None:
            anchors.missing.append("tensorboard")
        else:
            anchors.tensorboard = True
        return anchors

    def line(self) -> str:
        running = ([f"wandb {self.wandb.version} (offline)"] if self.wandb else []) + (
            [f"tensorboard {version('tensorboard')}"] if self.tensorboard else [])
        parts = [f"anchors: {', '.join(running) or 'none'}"]
        if self.missing:
            parts.append(f"SKIPPED, not installed: {', '.join(self.missing)} (install with: {INSTALL_HINT})")
        if self.skipped:
            parts.append(f"skipped: {', '.join(self.skipped)}")
        return "; ".join(parts)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.close()


def attach_monitors(workload: Workload, spool_dir: str, anchors: Anchors) -> tuple[list[Monitor], HookTimer]:
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
    monitors.append(NaiveNorms(workload.model))
    if anchors.wandb is not None:
        monitors.append(WandbWatch(workload, anchors.wandb))
    if anchors.tensorboard:
        writer = tensorboard_writer()
        assert writer is not None
        monitors.append(TensorBoardHistograms(workload.model, writer))
    return monitors, timer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints one table per workload and a summary.",
        epilog="wall/bare: wall time per step with the condition on / bare's, in the same round (1.010 means "
        "+1%); 'total' is the ratio of summed times (amortised), 'median' the median of per-round ratios. "
        "'CPU/bare' (CPU devices): the same with the CPU time of this process and of the anchors' processes, "
        "which another job on the machine does not inflate: with no spare core it is what wall time would show. "
        "'own': time on the training thread inside the monitor, net of bare's (gradwatch: inside its hooks; on "
        "a GPU its kernels run asynchronously and show in the wall time only). 'bg CPU': CPU time of the "
        "monitor's background thread or process during its own blocks, per step (gradwatch: building, encoding and writing records; wandb: "
        "its service process and threads; tensorboard: its event-file writer). 'wandb÷this': wandb's own + "
        "background CPU over gradwatch's, both every optimizer step.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and a few short rounds (< 1 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--gpt2-small", action="store_true",
                        help="GPT-2 small (124M): fp32 and AMP, accumulation 1 and 8 (for a GPU; with --quick a CPU smoke run)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size for --gpt2-small (sequences of 1024)")
    parser.add_argument("--seconds", type=float, help="measuring time per workload at least (default 60; --gpt2-small 0; --quick 2)")
    parser.add_argument("--min-rounds", type=int, help="rounds per workload at least (default 8; --gpt2-small 3; --quick 2)")
    parser.add_argument("--warmup", type=int, help="unrecorded rounds before measuring (default 1; --gpt2-small --quick 0)")
    parser.add_argument("--block", type=int, help="steps per block for every condition (default: about --block-seconds; --quick 2)")
    parser.add_argument("--block-seconds", type=float, default=1.0, help="target length of a block (default 1 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (default 1: see docs/performance.md)")
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s for the floor (default: measured with a copy)")
    parser.add_argument("--only", nargs="+", metavar="WORKLOAD", help="run only these workloads")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard even if it is installed")
    parser.add_argument("--no-wandb", action="store_true", help="skip wandb even if it is installed")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    smoke = args.quick and args.gpt2_small
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 0.0 if args.gpt2_small else 60.0)
    min_rounds = args.min_rounds if args.min_rounds is not None else (
        1 if smoke else 2 if args.quick else 3 if args.gpt2_small else 8)
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 1)
    block = args.block if args.block is not None else (1 if smoke else 2 if args.quick else None)
    torch.manual_seed(0)
    # On a shared CPU, a multi-threaded op waits at OpenMP's barrier for whichever of its
    # threads another process descheduled: 0.3 ms copies then take 10-40 ms at random.
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    factories = gpt2_small_workloads(device, args.batch, quick=args.quick) if args.gpt2_small else default_workloads(device, args.quick)
    unknown = set(args.only or ()) - factories.keys()
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {sorted(factories)}")
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth(device, 64 if args.quick else 512)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'torch threads: {torch.get_num_threads()}'}), "
        f"torch {torch.__version__}, memory bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"({'given' if args.bandwidth else 'measured: tensor copy, read + write'})"
    )
    anchors = Anchors.start(args.no_wandb, args.no_tensorboard)
    print(anchors.line())
    print(f"blocks: {f'{block} steps' if block else f'about {args.block_seconds:g} s'}; rounds: at least {min_rounds} "
          f"and {seconds:g} s per workload; warm-up rounds: {warmup}")
    summary: list[list[str]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as spool_dir:
            for name, factory in factories.items():
                if args.only and name not in args.only:
                    continue
                workload = factory()
                monitors, timer = attach_monitors(workload, spool_dir, anchors)
                results = run_rounds(workload, monitors, timer, warmup=warmup, min_rounds=min_rounds, seconds=seconds,
                                     block_seconds=args.block_seconds, fixed_block=block)
                summary += report(workload, monitors, results, bandwidth)
                for monitor in monitors:
                    monitor.close()
                timer.remove()
                del workload, monitors, timer
                gc.collect()  # the model, its optimizer and the probes' buffers, before the next workload
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        anchors.close()
    print(f"\n== summary: wall time per step / bare [bootstrap 95% CI]; own and background CPU time as % of the bare step; "
          f"target for gradwatch at defaults: total <= {TARGET:.2f}")
    print_table(["workload", "condition", "wall/bare, median [95% CI]", "wall/bare, total [95% CI]",
                 *([] if device.type == "cuda" else ["CPU/bare, total [95% CI]"]), "own %", "bg %",
                 f"default vs {TARGET:.2f}"], summary)
    if anchors.missing or anchors.skipped:
        print(anchors.line())


if __name__ == "__main__":
    main()
