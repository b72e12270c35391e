"""The monitoring conditions the overhead benchmark compares, all attached to one model at
once; the benchmark switches one on for each step (`switch`).

- gradwatch: the probe's hooks run inside `optimizer.step()` and the model's forward;
  `Run.enabled` pauses it without unhooking.
- the alternatives users write or install run after `optimizer.step()` (`after_step`):
  a per-parameter `.norm().item()` loop, a wandb.watch(log="all")-like logger, and
  TensorBoard's `add_histogram` (only where tensorboard is installed).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from workloads import Workload

import gradwatch

HISTOGRAM_BINS = 64  # wandb.watch's default num_bins


class Monitor:
    """A condition of the benchmark; the base class is bare training."""

    name = "bare"
    frequency = 1  # steps between two full measurements, for "equal frequency" comparisons

    def switch(self, on: bool) -> None:
        """Turns the monitor's hooks on or off (monitors without hooks need nothing)."""

    def after_step(self) -> None:
        """Runs after `optimizer.step()` on this condition's steps (timed as its own time)."""

    def held_bytes(self) -> int | None:
        """Memory the monitor keeps between steps (its buffers), in bytes; None: not known."""
        return None

    def problems(self) -> list[str]:
        """Anything that makes this condition's numbers invalid (a probe that switched off)."""
        return []

    def close(self) -> None:
        pass


class Gradwatch(Monitor):
    """A gradwatch run attached to the workload, paused except on its own steps."""

    def __init__(self, workload: Workload, every: int, spool_dir: str, update_ratio: bool = True) -> None:
        self.name = f"gradwatch every={every}" + (" (default)" if every == 10 else "") + ("" if update_ratio else " no Δw")
        self.frequency = every
        run_name = f"bench-{workload.name}-every{every}{'' if update_ratio else '-no-update'}"
        # A file spool: the background thread encodes and writes every record, as it would
        # send them to a collector, without a collector's noise on this machine.
        self.run = gradwatch.attach(
            workload.model, workload.optimizer, scaler=workload.scaler, every=every, update_ratio=update_ratio,
            name=run_name, url=f"file:{spool_dir}/{run_name}.jsonl",
        )
        self.run.enabled = False

    def switch(self, on: bool) -> None:
        self.run.enabled = on

    def held_bytes(self) -> int:
        # Read from the probe's internals: the weight snapshot for ||Δw|| (allocated on the
        # first detail step), the pinned host ring of the device -> host handoff (CUDA only)
        # and one packed vector.
        measure, handoff = self.run._measure, self.run._handoff
        snapshot = sum(t.nbytes for group in measure._snapshot or [] for t in group)
        ring = handoff._ring.nbytes if handoff._ring is not None else 0
        return snapshot + ring + measure.layout.length * measure.dtype.itemsize

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

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.named_parameters())
        self.last: dict[str, float] = {}

    def after_step(self) -> None:
        self.last = {name: p.grad.norm().item() for name, p in self.params if p.grad is not None}


def _wandb_histogram(tensor: torch.Tensor) -> tuple[list[float], list[float]]:
    """What wandb.watch does per tensor (wandb/integration/torch): drop non-finite values,
    read min and max on the host, 64-bin histc, copy the counts to the host."""
    flat = tensor.detach().reshape(-1).float()
    if not torch.isfinite(flat).all().item():
        flat = flat[torch.isfinite(flat)]
    low, high = flat.min().item(), flat.max().item()
    counts = torch.histc(flat, bins=HISTOGRAM_BINS, min=low, max=high).cpu()
    edges = torch.linspace(low, high, HISTOGRAM_BINS + 1)
    return counts.tolist(), edges.tolist()


class WandbLike(Monitor):
    """wandb.watch(model, log="all", log_freq=N), imitated: histograms of every weight and
    every gradient on every N-th step."""

    def __init__(self, model: torch.nn.Module, every: int) -> None:
        self.name = f"wandb-like every={every}"
        self.frequency = every
        self.params = list(model.named_parameters())
        self.steps = 0
        self.last: dict[str, Any] = {}

    def after_step(self) -> None:
        self.steps += 1
        if (self.steps - 1) % self.frequency:
            return
        for name, p in self.params:
            self.last[f"parameters/{name}"] = _wandb_histogram(p)
            if p.grad is not None:
                self.last[f"gradients/{name}"] = _wandb_histogram(p.grad)


class TensorBoardHistograms(Monitor):
    """SummaryWriter.add_histogram of every weight and gradient, every step."""

    name = "tensorboard add_histogram"

    def __init__(self, model: torch.nn.Module, writer_factory: Callable[[str], Any]) -> None:
        self.params = list(model.named_parameters())
        self.steps = 0
        self._logdir = tempfile.TemporaryDirectory(prefix="gradwatch-bench-tb-")
        self.writer = writer_factory(self._logdir.name)

    def after_step(self) -> None:
        self.steps += 1
        for name, p in self.params:
            self.writer.add_histogram(f"parameters/{name}", p.detach(), self.steps)
            if p.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", p.grad, self.steps)

    def close(self) -> None:
        self.writer.close()
        self._logdir.cleanup()


def tensorboard_writer() -> Callable[[str], Any] | None:
    """SummaryWriter when tensorboard is importable, else None (the condition is skipped)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


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
