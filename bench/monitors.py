"""The monitoring conditions the overhead benchmark compares, all attached to one model at
once; the benchmark switches one on for each block of steps (`switch`).

- gradwatch: the probe's hooks run inside the model's forward and `optimizer.step()`;
  `Run.enabled` pauses it without unhooking. Its background thread builds and writes
  each step's record.
- naive: a per-parameter `.norm().item()` loop after `optimizer.step()`.
- the anchors, the real libraries (optional, `bench/requirements.txt`):
  `wandb.watch(model, log="all")` in offline mode: a forward hook on the model logs a
  histogram of every parameter, a tensor hook on every parameter one of its gradient
  (wandb/integration/torch/wandb_torch.py), each `wandb.run._log(..., commit=False)`, and a
  `run.log` per step commits the row, as a training loop's `wandb.log({"loss": ...})`
  does; switched off with `run.unwatch(model)`, on with `run.watch(...)` again.
  TensorBoard's `SummaryWriter.add_histogram` of every weight and gradient after the step.

Each monitor reports its own time on the training thread and, where it has one, the CPU
time of its background thread or process (`Background`).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from workloads import Workload

from gradwatch.probe.run import Run

INSTALL_HINT = "pip install -r bench/requirements.txt"


# ---- background CPU time ------------------------------------------------------------------


def _thread_cpu(thread: threading.Thread) -> float | None:
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))  # type: ignore[arg-type]
    except (AttributeError, OSError, TypeError, ValueError):  # not POSIX, or the thread has ended
        return None


def _descendants() -> set[int]:
    """Process ids of this process's descendants (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [os.getpid()]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _process_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class Background:
    """The threads and processes a monitor started, and their CPU time so far. A thread
    or process that has ended keeps the last value read."""

    def __init__(self, threads: list[threading.Thread], pids: list[int]) -> None:
        self.threads, self.pids = threads, pids
        self._last: dict[Any, float] = {}

    @property
    def measurable(self) -> bool:
        return bool(self.threads or self.pids) and self.cpu_seconds() is not None

    def process_seconds(self) -> float:
        """CPU time of its processes alone (0.0 without any)."""
        readings = [_process_cpu(p) for p in self.pids]
        return sum(r for r in readings if r is not None)

    def cpu_seconds(self) -> float | None:
        readings = [(t, _thread_cpu(t)) for t in self.threads] + [(p, _process_cpu(p)) for p in self.pids]
        for key, value in readings:
            if value is not None:
                self._last[key] = value
        if not self._last:
            return None
        return sum(self._last.values())


@contextmanager
def spawned() -> Iterator[list[Background]]:
    """Collects the threads and child processes started inside the `with` block."""
    threads, pids = set(threading.enumerate()), _descendants()
    out: list[Background] = []
    yield out
    out.append(Background([t for t in threading.enumerate() if t not in threads], sorted(_descendants() - pids)))


# ---- conditions ---------------------------------------------------------------------------


class Monitor:
    """A condition of the benchmark; the base class is bare training."""

    name = "bare"
    frequency = 1  # optimizer steps between two full measurements ("equal frequency" comparisons)
    logs_after_step = False  # True: `after_step` does work (timed, with device syncs around it)
    background: Background | None = None

    def switch(self, on: bool) -> None:
        """Turns the monitor's hooks on or off (outside the timed block)."""

    def after_step(self) -> None:
        """Runs after `optimizer.step()` on this condition's steps (timed as its own time)."""

    def take_own_seconds(self) -> float:
        """Own time inside hooks not timed by the benchmark itself, since the last call."""
        return 0.0

    def held_bytes(self) -> int | None:
        """Memory the monitor keeps between steps (its buffers), in bytes; None: not known."""
        return None

    def problems(self) -> list[str]:
        """Anything that makes this condition's numbers invalid (a probe that switched off)."""
        return []

    def close(self) -> None:
        pass


class Gradwatch(Monitor):
    """A gradwatch run attached to the workload, paused except on its own blocks."""

    def __init__(self, workload: Workload, every: int, spool_dir: str, update_ratio: bool = True) -> None:
        self.name = f"gradwatch every={every}" + (" (default)" if every == 10 else "") + ("" if update_ratio else " no Δw")
        self.frequency = every
        run_name = f"bench-{workload.name}-every{every}{'' if update_ratio else '-no-update'}"
        # A file spool: the background thread builds, encodes and writes every record, as
        # it would send them to a collector, without a collector's noise on this machine.
        # `Run`, not `gradwatch.attach`: attach returns the run already attached to a model,
        # and the benchmark attaches several (every=10, every=1, no Δw) to the same one.
        with spawned() as started:
            self.run = Run(
                workload.model, workload.optimizer, scaler=workload.scaler, every=every, update_ratio=update_ratio,
                name=run_name, url=f"file:{spool_dir}/{run_name}.jsonl",
            )
        self.background = started[0]
        self.run.enabled = False

    def switch(self, on: bool) -> None:
        self.run.enabled = on

    def held_bytes(self) -> int | None:
        # Read from the probe's internals: the weight snapshot for ||Δw|| (allocated on the
        # first detail step), the pinned host ring of the device -> host handoff (CUDA only)
        # and one packed vector. None when the internals moved.
        try:
            measure, handoff = self.run._measure, self.run._handoff
            snapshot = sum(t.nbytes for group in measure._snapshot or [] for t in group)
            ring = handoff._ring.nbytes if handoff._ring is not None else 0
            return snapshot + ring + measure.layout.length * measure.dtype.itemsize
        except (AttributeError, TypeError):
            return None

    def problems(self) -> list[str]:
        found = []
        if self.run._broken:
            found.append(f"{self.name}: the probe switched itself off (see the log above)")
        if self.run.dropped:
            found.append(f"{self.name}: {self.run.dropped} records dropped")
        return found

    def close(self) -> None:
        self.run.detach()


class NaiveNorms(Monitor):
    """The hand-written monitor: one `.norm().item()` per parameter, every step."""

    name = "naive .norm().item()"
    logs_after_step = True

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.named_parameters())
        self.last: dict[str, float] = {}

    def after_step(self) -> None:
        self.last = {name: p.grad.norm().item() for name, p in self.params if p.grad is not None}


class WandbSession:
    """One offline wandb run for the whole benchmark (its service process starts once)."""

    def __init__(self) -> None:
        import wandb

        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        self.version = wandb.__version__
        self._dir = tempfile.TemporaryDirectory(prefix="gradwatch-bench-wandb-")
        with spawned() as started:
            # console="off": wandb would otherwise wrap this process's stdout, which prints the tables
            self.run = wandb.init(mode="offline", dir=self._dir.name, project="gradwatch-bench",
                                  settings=wandb.Settings(console="off"))
        self.background = started[0]  # its Python threads and the wandb-core service process

    def close(self) -> None:
        self.run.finish()
        self._dir.cleanup()


class WandbWatch(Monitor):
    """`wandb.watch(model, log="all", log_freq=N)`, real, offline. wandb counts forwards and
    backwards, not optimizer steps: `log_freq` is the workload's accumulation, so that it
    logs once per optimizer step (`log_freq=1` without accumulation). `switch(False)` is
    `run.unwatch(model)`; each `switch(True)` watches anew (its counters restart: blocks
    start on an optimizer step, so it logs on each step's last micro-batch).
    Own time: its forward hook (parameters; on CUDA their `.cpu()` copies), its gradient
    histograms and the per-step `run.log` that commits the row."""

    logs_after_step = True

    def __init__(self, workload: Workload, session: WandbSession) -> None:
        self.frequency = 1
        self.log_freq = workload.accumulation
        self.name = f"wandb.watch log=all log_freq={self.log_freq}"
        self.model = workload.model
        self.session = session
        self.background = session.background
        self.steps = 0
        self._own = 0.0
        self._started = 0.0
        self._in_forward = False
        self._timing: list[Any] = []
        self._history = session.run._torch
        original = self._original_stats = self._history.log_tensor_stats

        def timed_stats(tensor: Any, name: str) -> None:  # the gradient histograms (tensor hooks)
            if self._in_forward:
                return original(tensor, name)
            start = time.perf_counter()
            try:
                return original(tensor, name)
            finally:
                self._own += time.perf_counter() - start

        self._history.log_tensor_stats = timed_stats

    def _forward_started(self, *_: Any) -> None:
        self._in_forward = True
        self._started = time.perf_counter()

    def _forward_ended(self, *_: Any) -> None:
        self._own += time.perf_counter() - self._started
        self._in_forward = False

    def switch(self, on: bool) -> None:
        if on == bool(self._timing):
            return
        if on:
            # wandb's forward hook is registered between these two, which time it; idx=0
            # keeps its chart names the same at every watch
            self._timing.append(self.model.register_forward_hook(self._forward_started))
            self.session.run.watch(self.model, log="all", log_freq=self.log_freq, idx=0)
            self._timing.append(self.model.register_forward_hook(self._forward_ended))
        else:
            self.session.run.unwatch(self.model)
            for handle in self._timing:
                handle.remove()
            self._timing.clear()

    def after_step(self) -> None:
        self.steps += 1
        self.session.run.log({"bench/step": self.steps})  # commits the step's histograms

    def take_own_seconds(self) -> float:
        own, self._own = self._own, 0.0
        return own

    def close(self) -> None:
        self.switch(False)
        self._history.log_tensor_stats = self._original_stats


class TensorBoardHistograms(Monitor):
    """SummaryWriter.add_histogram of every weight and gradient, every step."""

    name = "tensorboard add_histogram"
    logs_after_step = True

    def __init__(self, model: torch.nn.Module, writer_factory: Callable[[str], Any]) -> None:
        self.params = list(model.named_parameters())
        self.steps = 0
        self._logdir = tempfile.TemporaryDirectory(prefix="gradwatch-bench-tb-")
        with spawned() as started:
            self.writer = writer_factory(self._logdir.name)
        self.background = started[0]  # the event file's writer thread

    def after_step(self) -> None:
        self.steps += 1
        for name, p in self.params:
            self.writer.add_histogram(f"parameters/{name}", p.detach(), self.steps)
            if p.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", p.grad, self.steps)

    def close(self) -> None:
        self.writer.close()
        self._logdir.cleanup()


# ---- which anchors are installed ----------------------------------------------------------


def tensorboard_writer() -> Callable[[str], Any] | None:
    """SummaryWriter when tensorboard is importable, else None (the condition is skipped)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def wandb_installed() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class HookTimer:
    """Times gradwatch's hooks from the outside: a hook registered before the probe's
    starts a clock, one registered after stops it (PyTorch calls hooks in registration
    order). On CUDA it also puts the probe's hooks under
    ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync in them raises, the
    probe switches itself off, and `Gradwatch.problems` reports it."""

    def __init__(self, workload: Workload) -> None:
        self.seconds = 0.0
        self._started = 0.0
        self._cuda = workload.device.type == "cuda"
        self._model = workload.model
        self._optimizer = workload.optimizer
        self._handles = self._install(self._start)

    def _install(self, callback: Callable[[], None]) -> list[Any]:
        return [
            self._model.register_forward_hook(lambda *_: callback()),
            self._optimizer.register_step_pre_hook(lambda *_: callback()),
            self._optimizer.register_step_post_hook(lambda *_: callback()),
        ]

    def close_around(self) -> None:
        """Call once every probe is attached: installs the stopping hooks after theirs."""
        self._handles += self._install(self._stop)

    def _start(self) -> None:
        if self._cuda:
            torch.cuda.set_sync_debug_mode("error")
        self._started = time.perf_counter()

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._started
        if self._cuda:
            torch.cuda.set_sync_debug_mode("default")

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
