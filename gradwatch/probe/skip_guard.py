"""The armed ``skip_step`` guard: decides on the device whether the optimizer step being
taken is poisoned, and undoes it there. Nothing is read on the host, so an armed guard
costs the training thread no sync.

How a step is skipped without knowing on the host that it is:

- before the step, `save` copies every parameter and optimizer-state tensor the step may
  change into buffers kept while armed (one more copy of the weights and optimizer state);
- after it, `judge` turns the step's gradient norm into a 0-dim flag on the device:
  non-finite, or a spike (``SPIKE_FACTOR`` times the median of the recent norms);
- `undo` puts the saved values back where the flag is set (``torch.where``, bit for bit),
  on each tensor's own device. State the step created is zeroed, as optimizers start it.
  Tensors and numbers are taken back; state kept in other containers (LBFGS's history
  lists) is not.

State the optimizer keeps on the host while the flag lives on an accelerator (plain Adam's
``step`` counter is a CPU tensor; some optimizers keep Python numbers) cannot be masked on
the device. Its change is taken back once the flag has reached the host: the flag travels
in a pinned buffer behind a CUDA event, polled (never waited for) at the next step, so a
step counter is exact again before any later step reads it, unless the device runs more
than a step behind the host; the counter is then exact from the step the flag arrives.

Every rank of a distributed run takes the same decision when it judges the same norm from
the same history: DDP ranks hold the same averaged gradients; a sharded run judges the
global norm that ``clip_grad_norm_`` computes (`Run` does not judge a sharded step without
it), and the collector arms all ranks at the same step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from gradwatch.probe.environment import local

log = logging.getLogger("gradwatch.probe")

SPIKE_FACTOR = 10.0  # a gradient norm this many times the recent median is a spike
SPIKE_WINDOW = 64  # recent norms kept for the median
MIN_HISTORY = 8  # norms needed before a spike can be judged
FLAGS_IN_FLIGHT = 64  # pinned slots for flags on their way to the host


@dataclass
class _HostState:
    """Host-resident optimizer state of one step: where it lives, its value before and after."""

    holder: dict[Any, Any]
    key: Any
    before: Any
    after: Any = None


@dataclass
class _Saved:
    """What `save` noted before one step (the copies are the guard's buffers)."""

    state_keys: dict[int, set[Any]] = field(default_factory=dict)  # id(param) -> state keys before
    host: list[_HostState] = field(default_factory=list)
    # Where each copy came from, in the buffers' order: (None, param) or (state dict, key).
    places: list[tuple[dict[Any, Any] | None, Any]] = field(default_factory=list)


@dataclass
class _Undo:
    """A step's host-resident changes, waiting for its flag to reach the host."""

    host: list[_HostState]
    flag: torch.Tensor  # on the host: pinned (CUDA) or the CPU flag itself
    event: torch.cuda.Event | None


class SkipGuard:
    """Judges each step's gradient norm on the device and undoes the steps it flags."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, sharded: bool = False) -> None:
        self.device = device
        self.sharded = sharded
        self._guarding = False  # the step being taken was saved
        self._said_unjudged = False
        self._recent = torch.full((SPIKE_WINDOW,), math.nan, dtype=dtype, device=device)
        self._slot = 0
        self._saved: _Saved | None = None
        self._kept_ids: list[tuple[int, torch.Size, torch.dtype, torch.device]] = []
        self._copies: list[torch.Tensor] = []
        self._waiting: list[_Undo] = []
        # Made at the first flag sent home: a pinned allocation may synchronize, so never per step.
        self._host_flags: torch.Tensor | None = None
        self._events: list[torch.cuda.Event] = []
        self._next_flag = 0

    # ---- the run's side ------------------------------------------------------------------

    def before_step(self, optimizer: torch.optim.Optimizer, *, armed: bool, preclip: torch.Tensor | None) -> None:
        """Saves what the step may change when armed. Every rank must judge the same norm: a
        sharded run's is the global one clip_grad_norm_ computed (before the step), without
        which its steps are not judged."""
        self._guarding = armed and (preclip is not None or not self.sharded)
        if armed and not self._guarding and not self._said_unjudged:
            self._said_unjudged = True
            log.warning("gradwatch: the skip guard of a sharded run judges the global gradient norm, which it "
                        "reads from clip_grad_norm_; this step did not clip, so it is not judged. Call "
                        "clip_grad_norm_ before optimizer.step (max_norm=float('inf') measures without clipping)")
        if self._guarding:
            self.save(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer, grad_sq: torch.Tensor, preclip: torch.Tensor | None,
                   *, on_nonfinite: bool, on_spike: bool) -> torch.Tensor | None:
        """Judges a saved step (its pre-clip norm when the run clips, else the norm of the
        per-layer squares `grad_sq`), undoes it when flagged; returns the flag, or None for a
        step not guarded."""
        if not self._guarding:
            return None
        self._guarding = False
        norm_sq = preclip.square() if preclip is not None else grad_sq.sum()
        flag = self.judge(norm_sq, on_nonfinite=on_nonfinite, on_spike=on_spike)
        self.undo(optimizer, flag)
        return flag

    # ---- before the step ----------------------------------------------------------------

    @torch.no_grad()
    def save(self, optimizer: torch.optim.Optimizer) -> None:
        """Copies what the step may change. Also settles earlier steps whose flags arrived."""
        self.settle()
        saved = _Saved()
        kept: list[torch.Tensor] = []  # parameters and device-resident state, in a fixed order
        for p in _params(optimizer):
            kept.append(p)
            saved.places.append((None, p))
            state = optimizer.state.get(p, {})
            saved.state_keys[id(p)] = set(state)
            for key, value in state.items():
                if self._on_host(value):
                    saved.host.append(_HostState(state, key, _copy(value)))
                elif isinstance(value, torch.Tensor):
                    kept.append(value)
                    saved.places.append((state, key))
        ids = [(id(t), t.shape, t.dtype, t.device) for t in kept]
        if ids != self._kept_ids:  # the first step, or the optimizer created state: new buffers
            self._kept_ids = ids
            self._copies = [torch.empty_like(local(t)) for t in kept]
        torch._foreach_copy_(self._copies, [local(t) for t in kept])
        self._saved = saved

    # ---- after the step -----------------------------------------------------------------

    @torch.no_grad()
    def judge(self, norm_sq: torch.Tensor, *, on_nonfinite: bool, on_spike: bool) -> torch.Tensor:
        """The step's flag (0-dim bool, on the guard's device) from its squared gradient norm.
        Every judged finite norm that is no spike joins the recent history."""
        norm = norm_sq.detach().to(self.device, self._recent.dtype, non_blocking=True).reshape(()).sqrt()
        finite = torch.isfinite(norm)
        filled = (~torch.isnan(self._recent)).sum()
        ordered = torch.sort(self._recent).values  # NaN (empty slots) sort last
        median = ordered.gather(0, ((filled - 1).clamp(min=0) // 2).reshape(1)).reshape(())
        spike = finite & (filled >= MIN_HISTORY) & (norm > SPIKE_FACTOR * median)
        slot = self._recent[self._slot : self._slot + 1]
        torch.where(finite & ~spike, norm, slot, out=slot)
        self._slot = (self._slot + 1) % SPIKE_WINDOW
        flag = torch.zeros((), dtype=torch.bool, device=self.device)
        if on_nonfinite:
            flag |= ~finite
        if on_spike:
            flag |= spike
        return flag

    @torch.no_grad()
    def undo(self, optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
        """Puts back what `save` copied where `flag` is set; zeroes state the step created."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        flags = _PerDevice(flag)
        for (holder, key), copy in zip(saved.places, self._copies):
            # Read again: an optimizer may have put a new tensor in its state rather than
            # update the old one in place.
            live = key if holder is None else holder.get(key)
            if isinstance(live, torch.Tensor) and local(live).shape == copy.shape:
                live = local(live)
                torch.where(flags.on(live.device), copy, live, out=live)
        for p in _params(optimizer):
            state = optimizer.state.get(p, {})
            for key in set(state) - saved.state_keys.get(id(p), set()):
                value = state[key]
                if self._on_host(value):
                    saved.host.append(_HostState(state, key, _zero_like(value)))
                elif isinstance(value, torch.Tensor):
                    live = local(value)
                    torch.where(flags.on(live.device), torch.zeros_like(live), live, out=live)
        for entry in saved.host:
            entry.after = _copy(entry.holder.get(entry.key))
        if saved.host:
            self._waiting.append(self._send_home(flag, saved.host))
            self.settle()

    def settle(self) -> None:
        """Takes back the host-resident changes of every flagged step whose flag has reached
        the host (oldest first); never waits for the device."""
        while self._waiting and (self._waiting[0].event is None or self._waiting[0].event.query()):
            undo = self._waiting.pop(0)
            if bool(undo.flag):
                for entry in undo.host:
                    entry.holder[entry.key] = _minus_change(entry.holder.get(entry.key), entry.before, entry.after)

    def finish(self) -> None:
        """At detach: waits for the flags still on their way and settles their steps."""
        for undo in self._waiting:
            if undo.event is not None:
                undo.event.synchronize()
        self.settle()

    def _on_host(self, value: Any) -> bool:
        """State the device flag cannot mask: Python numbers, and CPU tensors of a run on an
        accelerator."""
        if isinstance(value, torch.Tensor):
            return value.device.type == "cpu" and self.device.type != "cpu"
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def _send_home(self, flag: torch.Tensor, host: list[_HostState]) -> _Undo:
        if flag.device.type == "cpu":
            return _Undo(host, flag, None)
        if flag.device.type != "cuda":  # MPS, XPU: no event to poll; read when settled
            return _Undo(host, flag.to("cpu"), None)
        if self._host_flags is None:
            self._host_flags = torch.empty(FLAGS_IN_FLIGHT, dtype=torch.bool, pin_memory=True)
            self._events = [torch.cuda.Event() for _ in range(FLAGS_IN_FLIGHT)]
        if len(self._waiting) >= FLAGS_IN_FLIGHT:  # the device is that many steps behind: only then wait
            event = self._waiting[0].event
            assert event is not None
            event.synchronize()
            self.settle()
        slot, self._next_flag = self._next_flag, (self._next_flag + 1) % FLAGS_IN_FLIGHT
        pinned = self._host_flags[slot]
        pinned.copy_(flag, non_blocking=True)
        event = self._events[slot]
        event.record(torch.cuda.current_stream(flag.device))
        return _Undo(host, pinned, event)


class _PerDevice:
    """The flag on each device that needs it, copied there once (device to device: no sync)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self._on = {flag.device: flag}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = next(iter(self._on.values())).to(device, non_blocking=True)
        return self._on[device]


def _params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _zero_like(value: Any) -> Any:
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else type(value)(0)


def _minus_change(now: Any, before: Any, after: Any) -> Any:
    """`now` less the skipped step's change (`after - before`): the value before it when no
    step ran since, and a counter one step back in any case."""
    if isinstance(now, torch.Tensor):
        return now.sub_(after - before)
    return now - (after - before)
