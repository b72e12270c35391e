"""Actions from the collector, applied by the probe at an optimizer-step boundary.

Nothing here does anything unless the run was attached with ``actions=True``: with actions
off, messages from the collector are ignored and training cannot be changed by them.

- ``reduce_lr``: a persistent factor on every param group's LR, applied just for the
  duration of ``optimizer.step`` and undone right after it, so LR schedulers (cosine,
  OneCycle, warm-up, chainable ones) keep computing their own schedule and never erase it.
- ``skip_step``: arms a local guard (``params.on`` names the alert kind) that skips the
  optimizer step whose gradients are non-finite (``nonfinite``) or spike far above the
  recent median (``loss_spike``, ``exploding_gradients``): parameters and optimizer state
  stay untouched. The guard decides and undoes on the device (`skip_guard.SkipGuard`):
  armed, it costs a copy of the weights and optimizer state per step, and no sync; unarmed
  it costs nothing. Under GradScaler, overflowing steps are already skipped by the scaler.
- ``checkpoint``: calls the ``on_checkpoint(step)`` callback given to ``attach``.
- ``stop``: raises ``gradwatch.StopTraining`` at the next step boundary (``stop="raise"``)
  or sets ``run.should_stop`` (``stop="flag"``).

`ActionState` knows nothing of the run it serves: the run asks it at each step boundary
which actions are due (and sends the acknowledgements it returns), which skips are armed,
and whether to stop; `guard_step` wraps `optimizer.step` so that the run's boundary
callable runs first.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from gradwatch import protocol
from gradwatch.errors import StopTraining
from gradwatch.probe.wrapping import wrap_method

log = logging.getLogger("gradwatch.probe")

SPIKES = frozenset({"loss_spike", "exploding_gradients"})  # alert kinds a gradient spike answers


class ActionState:
    """The actions received and what they changed: the LR factor, the armed skip guards,
    the stop request."""

    def __init__(self, *, enabled: bool, on_checkpoint: Callable[[int], Any] | None, stop_mode: str) -> None:
        self.enabled = enabled
        self._on_checkpoint = on_checkpoint
        self._stop_mode = stop_mode
        self._inbox: deque[protocol.Action] = deque()
        self.lr_factor = 1.0
        self.min_lr = 0.0
        self._saved_lr: list[Any] | None = None
        self.skip_on: set[str] = set()
        self.stopped_reason = ""

    # background thread
    def receive(self, action: protocol.Action) -> None:
        if self.enabled:
            self._inbox.append(action)

    # ---- training thread --------------------------------------------------------------

    def apply_due(self, step: int) -> list[protocol.Ack]:
        """Applies every action due at or before `step` (the step about to be taken); returns
        their acknowledgements, for the collector."""
        acks = []
        while self._inbox and self._inbox[0].step <= step:
            acks.append(self._apply(self._inbox.popleft(), step))
        return acks

    def guard_pending(self, on: str) -> bool:
        """The skip guard for `on` is armed, or its arming waits for the next step."""
        return on in self.skip_on or any(
            a.kind == "skip_step" and a.params.get("on") == on for a in list(self._inbox)
        )

    def should_stop_now(self) -> bool:
        """A stop was applied and the run raises `StopTraining` for it (``stop="raise"``)."""
        return bool(self.stopped_reason) and self._stop_mode == "raise"

    def scale_lr(self, optimizer: torch.optim.Optimizer) -> None:
        if self.lr_factor == 1.0:
            return
        self._saved_lr = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):  # a tensor LR stays a tensor, on its device: no read
                group["lr"] = torch.maximum(lr * self.lr_factor, torch.clamp(lr, max=self.min_lr))
            else:
                group["lr"] = max(lr * self.lr_factor, min(self.min_lr, lr))

    def restore_lr(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self._saved_lr is None or optimizer is None:
            return
        for group, lr in zip(optimizer.param_groups, self._saved_lr):
            group["lr"] = lr
        self._saved_lr = None

    def _apply(self, action: protocol.Action, step: int) -> protocol.Ack:
        try:
            outcome, reason = self._dispatch(action, step)
        except Exception as err:  # a user callback (checkpoint) may fail in any way
            log.exception("gradwatch: action %s at step %d failed", action.kind, step)
            outcome, reason = "refused", f"{type(err).__name__}: {err}"
        log.warning("gradwatch: action %s at step %d: %s%s", action.kind, step, outcome, f" ({reason})" if reason else "")
        return protocol.Ack(id=action.id, kind=action.kind, step=step, outcome=outcome, reason=reason[:500])

    def _dispatch(self, action: protocol.Action, step: int) -> tuple[str, str]:
        params = action.params
        if action.kind == "reduce_lr":
            factor = float(params.get("factor", 0.5))
            if not 0.0 < factor <= 1.0:
                return "refused", f"factor {factor} is not in (0, 1]"
            self.lr_factor *= factor
            self.min_lr = max(self.min_lr, float(params.get("min_lr", 0.0)))
            return "applied", f"LR factor is now {self.lr_factor:g}"
        if action.kind == "skip_step":
            on = str(params.get("on", "nonfinite"))
            self.skip_on.add(on)
            return "applied", f"skipping steps on {on}"
        if action.kind == "checkpoint":
            if self._on_checkpoint is None:
                return "refused", "no on_checkpoint callback was given to gradwatch.attach"
            self._on_checkpoint(step)
            return "applied", ""
        if action.kind == "stop":
            self.stopped_reason = action.reason or "stopped by the collector"
            return "applied", self.stopped_reason
        return "refused", f"unknown action {action.kind}"

    @property
    def skip_armed(self) -> bool:
        return bool(self.skip_on)

    @property
    def skips_nonfinite(self) -> bool:
        return "nonfinite" in self.skip_on

    @property
    def skips_spikes(self) -> bool:
        return bool(self.skip_on & SPIKES)


def guard_step(optimizer: torch.optim.Optimizer, at_boundary: Callable[[], None],
               live: Callable[[], bool]) -> Callable[[], None]:
    """Wraps `optimizer.step` so that `at_boundary()` runs before each step while `live()`;
    returns the function that unwraps it. `StopTraining` from the boundary propagates; any
    other failure takes the step."""

    def before() -> None:
        try:
            at_boundary()
        except StopTraining:
            raise
        except Exception:  # the boundary must never be why a step fails
            log.exception("gradwatch: applying the collector's actions failed; this step is taken")

    return wrap_method(optimizer, "step", before, live)
