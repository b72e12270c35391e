"""A `Run`: the probe attached to one model (and optimizer) in a training process.

Where the measurements are taken (the gradients the optimizer actually sees):

- optimizer step pre-hook: gradients are final here (after accumulation, after DDP's
  all-reduce, after GradScaler's unscale); fused optimizers under GradScaler still hold
  scaled gradients, so the packed norms are divided by the scale on the device;
- optimizer step post-hook: weights and ||Δw|| on detail steps; LBFGS (a closure) is
  measured here, after the closure ran;
- GradScaler.update: a step whose optimizer.step was skipped for an overflow fires no
  optimizer hook, so the skip is recorded there;
- without an optimizer, a multi-gradient hook records every backward;
- frozen layers: on detail steps, before measuring, ``requires_grad`` is re-read (host-side
  flags, no device access) so that a layer frozen or unfrozen after attach is measured
  from then on or reported frozen (in between, the set of the last detail step holds).

All hooks are wrapped so that an internal error disables the probe, never training,
and ``torch.compiler.disable`` keeps them out of compiled graphs.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import torch

from gradwatch import protocol
from gradwatch.errors import StopTraining
from gradwatch.probe import backward, clip
from gradwatch.probe.actions import ActionState, guard_step
from gradwatch.probe.clearing import ClearingCheck
from gradwatch.probe.environment import (
    default_run_name,
    distributed,
    is_sharded,
    pick_collector,
    protocol_safe,
    replicated_value,
    unwrap_optimizer,
)
from gradwatch.probe.handoff import Handoff
from gradwatch.probe.landscape import LandscapeResult, landscape
from gradwatch.probe.layers import LayerMap, LayerSpec
from gradwatch.probe.loss import StepLoss, grad_state
from gradwatch.probe.measure import Measurer
from gradwatch.probe.record import Recorder, StepMeta
from gradwatch.probe.skip_guard import SkipGuard
from gradwatch.probe.transport import Transport
from gradwatch.probe.wrapping import wrap_method

log = logging.getLogger("gradwatch.probe")

F = TypeVar("F", bound=Callable[..., Any])


def _hook(method: F) -> F:
    """Runs a probe hook so that nothing can escape it; a paused run (``run.enabled =
    False``) returns at once. It always returns None: a step pre-hook that returns a value
    would replace the step's arguments."""

    @functools.wraps(method)
    def guarded(self: Run, *args: Any, **kwargs: Any) -> None:
        if self._broken or not self.enabled:
            return
        try:
            method(self, *args, **kwargs)
        except Exception:  # the probe's own failure must never fail the step
            self._broken = True
            log.exception("gradwatch: the probe hit an internal error and switched itself off; training continues")

    return torch.compiler.disable(guarded)  # type: ignore[return-value]


class Run:
    """The handle `gradwatch.attach` returns: `log()`, `detach()`, usable as a context manager.

    `should_stop` turns True when the collector's `stop` action arrives (actions=True).
    `enabled = False` pauses the probe between steps without unhooking it (every hook
    returns at once; the benchmarks toggle it per step)."""

    live: ClassVar[weakref.WeakSet[Run]] = weakref.WeakSet()  # attached and not detached

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: Any = None,
        name: str | None = None,
        url: str | None = None,
        every: int = 10,
        actions: bool = False,
        tags: Mapping[str, str] | None = None,
        layers: LayerSpec = "param",
        loss_fn: torch.nn.Module | None = None,
        loss_from: str = "auto",
        on_checkpoint: Callable[[int], Any] | None = None,
        stop: str = "raise",
        token: str | None = None,
        update_ratio: bool = True,
        buffer: int = 10_000,
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every}: per-layer detail needs every >= 1 (1 = every step)")
        if loss_from not in ("auto", "backward"):
            raise ValueError(f"loss_from={loss_from!r}: use 'auto' (logged, else the model's, else backward()) "
                             "or 'backward' (the sum of the losses backpropagated for the step)")
        if stop not in ("raise", "flag"):
            raise ValueError(f"stop={stop!r}: use 'raise' (StopTraining at the next step) or 'flag' (run.should_stop)")
        self.name = protocol_safe(name or os.environ.get("GRADWATCH_RUN") or default_run_name())
        self.url = pick_collector(url or os.environ.get("GRADWATCH_URL") or "ws://127.0.0.1:8765", self.name)
        self.every = every
        self.enabled = True
        self._broken = False
        self._detached = False
        self._lock = threading.Lock()

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model of type {type(model).__name__} is not a torch.nn.Module: pass the module that "
                            "trains (the one whose parameters the optimizer updates)")
        if next(iter(model.parameters()), None) is None:
            raise ValueError(f"model {type(model).__name__} has no parameters, so there is nothing to measure: "
                             "attach the module that trains, after it is built")
        self.model = model
        optimizer, wrapper_scaler = unwrap_optimizer(optimizer)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer of type {type(optimizer).__name__} is not a torch.optim.Optimizer and has none at "
                "`.optimizer`: pass the torch optimizer that steps, or none (each backward is then one record)"
            )
        self.optimizer = optimizer
        scaler = scaler if scaler is not None else wrapper_scaler
        self.scaler = scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None
        self.rank, self.world_size = distributed()
        self.sharded = any(is_sharded(p) for p in model.parameters())
        self._layers = LayerMap(model, layers, contributes=self._contributes)
        self._param_ids = {id(p) for p in model.parameters()}
        home = next(iter(model.parameters())).device
        self._measure = Measurer(self._layers, home)
        self._handoff = Handoff(self._measure.layout.length, self._measure.dtype, home)
        self._update_ratio = update_ratio

        self._loss = StepLoss(from_backward=loss_from == "backward", scaler=self.scaler)
        self._backward_candidate: torch.Tensor | None = None  # between before_ and after_backward
        self._clearing = ClearingCheck(with_optimizer=optimizer is not None)
        self._stepped_since_update = False
        self._pending: tuple[torch.Tensor, StepMeta] | None = None

        self._actions = ActionState(enabled=actions, on_checkpoint=on_checkpoint, stop_mode=stop)
        self._unguard_step: Callable[[], None] | None = None
        self._skip_guard = SkipGuard(home, self._measure.dtype, sharded=self.sharded) if actions else None
        hello = protocol.Hello(
            v=protocol.PROTOCOL_VERSION,
            run=self.name,
            rank=self.rank,
            world_size=self.world_size,
            sharded=self.sharded,
            layers=self._layers.names,
            param_groups=len(optimizer.param_groups) if optimizer is not None else 0,
            actions=actions,
            every=every,
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            started=time.time(),
            tags=dict(tags or {}),
        )
        self._transport = Transport(
            self.url,
            hello,
            self._actions.receive,
            token=token or os.environ.get("GRADWATCH_TOKEN"),
            max_records=buffer,
        )
        self._recorder = Recorder(self._measure, self._handoff, self._transport, self._loss, self._clearing,
                                  self.scaler)
        self._handles: list[Any] = []
        self._grad_hook: Any = None  # the gradient hook of a run without an optimizer
        self._unwrap_scaler: Callable[[], None] | None = None
        self._install_hooks(loss_fn)
        clip.subscribe(self)
        backward.subscribe(self)
        atexit.register(self.detach)
        Run.live.add(self)
        log.info(
            "gradwatch: watching %d tensors in %d layers (%d frozen) of run %r (rank %d/%d) -> %s",
            len(self._layers.param_names), len(self._layers), len(self._layers.frozen), self.name, self.rank,
            self.world_size, self.url,
        )

    # ---- public API -------------------------------------------------------------------

    def log(self, **values: float | torch.Tensor) -> None:
        """Report values the probe cannot see (validation loss, accuracy, ...). A value belongs
        to the step being taken, or, logged after an optimizer step and before the next step
        begins (its first training forward, or its first backward), to that step: an
        evaluation after step k is step k's. `loss=` overrides the loss the probe finds by
        itself; logged several times in a step (once per micro-batch), their mean is the step's."""
        if self._detached:
            return
        for key, value in values.items():
            if key == "loss":
                self._loss.logged(value)
            else:
                self._recorder.log_scalar(protocol_safe(key).replace("-", "_"), value)

    def landscape(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[..., torch.Tensor] | None = None,
        directions: int = 2,
        points: int = 21,
        radius: float = 1.0,
        **options: Any,
    ) -> LandscapeResult:
        """The loss around this run's current weights (`gradwatch.probe.landscape`; `options`:
        ``last_update=``, ``seed=``), its summary logged with the current step as
        ``landscape_centre`` and ``landscape_curvature_<k>`` / ``landscape_rise_<k>`` per
        direction, and its grid sent to the collector (the run's page draws it). Evaluated in
        eval mode under no_grad, which the probe's hooks ignore."""
        result = landscape(self.model, batches, loss_fn, directions, points, radius, **options)
        self.log(**result.scalars())
        message = result.message(self.step)
        if message is not None:
            self.send_result(message)
        else:
            log.info("gradwatch: the landscape's %d points per axis exceed the %d the collector takes; only its "
                     "summary is sent", len(result.alphas), protocol.MAX_LANDSCAPE_AXIS)
        return result

    def send_result(self, message: protocol.LRFind | protocol.Landscape) -> None:
        """Send an LR range test's verdict or a landscape grid to the collector, after the
        records submitted so far (`lr_find` and `landscape` do)."""
        if not self._detached:
            self._transport.submit(message)

    def detach(self, status: str = "finished", reason: str = "") -> None:
        """Flush, unhook, say goodbye to the collector. Idempotent; also runs at exit."""
        with self._lock:
            if self._detached:
                return
            self._detached = True
        Run.live.discard(self)
        for handle in [*self._handles, self._grad_hook]:
            if handle is not None:
                handle.remove()
        self._handles.clear()
        self._grad_hook = None
        if self._unguard_step is not None:
            self._unguard_step()
            self._unguard_step = None
        if self._skip_guard is not None and not self._broken:
            try:
                self._skip_guard.finish()  # a skipped step's host-side state, still on its way
            except Exception:  # the probe's own failure must never fail the caller
                log.exception("gradwatch: settling the skip guard's last steps failed")
        if self._unwrap_scaler is not None:
            self._unwrap_scaler()
            self._unwrap_scaler = None
        clip.unsubscribe(self)
        backward.unsubscribe(self)
        atexit.unregister(self.detach)
        if self._actions.stopped_reason:
            status, reason = "stopped", self._actions.stopped_reason
        if not self._broken:
            try:
                self._recorder.flush()  # the last step's record, with what was logged after it
            except Exception:  # the probe's own failure must never fail the caller
                log.exception("gradwatch: sending the last record failed")
        self._transport.close(status=status, reason=reason)
        if self._transport.dropped:
            log.warning("gradwatch: run %r dropped %d steps in total", self.name, self._transport.dropped)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None or exc_type is StopTraining:
            self.detach()
        else:
            self.detach(status="crashed", reason=f"{exc_type.__name__}: {exc}"[:500])

    @property
    def dropped(self) -> int:
        return self._transport.dropped

    @property
    def step(self) -> int:
        """Optimizer steps recorded so far."""
        return self._recorder.step

    @property
    def should_stop(self) -> bool:
        """The collector's `stop` action was applied (with ``stop="flag"``, the loop's cue)."""
        return bool(self._actions.stopped_reason)

    def _step_boundary(self) -> None:
        """Before each optimizer step, with actions on: applies the actions due (acknowledged
        to the collector) and raises `StopTraining` for a stop (``stop="raise"``). An armed
        skip guard acts in the step's hooks (`SkipGuard.before_step`, `.after_step`)."""
        if self._actions.should_stop_now():
            raise StopTraining(self._actions.stopped_reason)
        for ack in self._actions.apply_due(self.step + 1):
            self._transport.submit(ack)
        if self._actions.should_stop_now():
            raise StopTraining(self._actions.stopped_reason)

    # ---- hooks ------------------------------------------------------------------------

    def _install_hooks(self, loss_fn: torch.nn.Module | None) -> None:
        source = loss_fn if loss_fn is not None else self.model
        self._handles.append(source.register_forward_hook(self._on_forward))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
            if self._actions.enabled:
                self._unguard_step = guard_step(self.optimizer, self._step_boundary, self._live)
        else:
            self._hook_grads()
        if self.scaler is not None:
            self._unwrap_scaler = wrap_method(self.scaler, "update", self._before_scaler_update, self._live)

    def _live(self) -> bool:
        return not self._detached

    def _hook_grads(self) -> None:
        """Without an optimizer: one hook over the measured tensors (a frozen tensor cannot
        take one), so it is placed again whenever they change."""
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        if self._layers.params:
            self._grad_hook = torch.autograd.graph.register_multi_grad_hook(
                self._layers.params, self._on_backward, mode="all"
            )

    def _contributes(self, p: torch.Tensor) -> bool:
        # Sharded runs sum partial squares over ranks: a tensor replicated on every rank
        # is counted on rank 0 only.
        return not self.sharded or is_sharded(p) or self.rank == 0

    def on_clip(self, params: list[torch.Tensor], total_norm: torch.Tensor) -> None:
        if params and id(params[0]) in self._param_ids:
            self._recorder.preclip = replicated_value(total_norm.detach())

    @_hook
    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or not self.model.training:
            return  # an evaluation: what is logged around it still belongs to the last step
        self._recorder.flush()  # a training step begins: the last one's record is complete
        if self.optimizer is None and self._detail_next() and self._measure.refresh():
            self._hook_grads()  # before the backward, whose gradients the hook passes
        self._loss.returned(output)

    @_hook
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._pending is not None:
            # A step inside the step: torch hooks a subclass's step and its base's, so one that
            # calls super().step() fires the hooks twice. The outer call measured the step.
            return
        self._recorder.flush()  # in case no training forward announced this step
        self._actions.scale_lr(optimizer)
        detail = self._detail_next()
        if detail:
            self._measure.refresh()  # before the snapshot: it follows the measured tensors
        with_updates = detail and self._update_ratio
        vec = self._measure.new_vector()
        meta = self._new_meta(detail, with_updates)
        if with_updates:
            self._measure.snapshot()
        meta.grads_after_step = kwargs.get("closure", args[0] if args else None) is not None
        if not meta.grads_after_step:
            self._measure_grads(vec, meta)
            grad_scale = getattr(optimizer, "grad_scale", None)
            if isinstance(grad_scale, torch.Tensor):
                self._measure.unscale_grads(vec, grad_scale)
            found_inf = getattr(optimizer, "found_inf", None)
            if isinstance(found_inf, torch.Tensor):
                self._measure.set_extra(vec, "found_inf", found_inf)
                meta.has_found_inf = True
        if self._skip_guard is not None:
            self._skip_guard.before_step(optimizer, armed=self._actions.skip_armed, preclip=self._recorder.preclip)
        self._pending = (vec, meta)

    @_hook
    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._actions.restore_lr(optimizer)
        if self._pending is None:
            return
        vec, meta = self._pending
        self._pending = None
        if meta.grads_after_step:
            self._measure_grads(vec, meta)
        if self._skip_guard is not None:
            flag = self._skip_guard.after_step(
                optimizer, vec[self._measure.layout.grad()], self._recorder.preclip,
                on_nonfinite=self._actions.skips_nonfinite, on_spike=self._actions.skips_spikes,
            )
            if flag is not None:
                self._measure.set_extra(vec, "skipped", flag)
        if meta.detail:
            self._measure.weights_and_updates(vec, meta.with_updates)
        self._stepped_since_update = True
        self._recorder.seal(vec, meta)
        self._clearing.after_update(self._sentinels())

    def before_backward(self, loss: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
        """`loss.backward()` is about to run: note where the gradients of a few of this
        run's tensors stand (host-side: the identity and version of `.grad`)."""
        if self._broken or not self.enabled or self._detached:
            return None
        self._backward_candidate = loss  # detached only if kept: most of the cost here
        self._clearing.before_backward()
        if not self._loss.reads_backward:
            return ()  # the loss is logged or returned by the model: backward() is not read
        return tuple(grad_state(p) for p in self._sentinels())

    def after_backward(self, loss: torch.Tensor, before: tuple[tuple[int, int], ...] | None) -> None:
        """Keep the loss if this backward wrote a gradient of this run's tensors."""
        candidate, self._backward_candidate = self._backward_candidate, None
        if before is None or candidate is None:
            return
        if self.optimizer is None:  # the gradient hook took the loss during the backward
            self._clearing.after_update(self._sentinels())
            return
        if not before:
            return  # nothing to attribute (see before_backward)
        if not any(grad_state(p) != state for p, state in zip(self._sentinels(), before)):
            return
        # A step whose forward the probe does not see (Lightning calls `training_step`, not the
        # module) begins at its first backward: the last step's record is complete.
        self._recorder.flush()
        self._loss.backpropagated(candidate)

    def _sentinels(self) -> tuple[torch.Tensor, ...]:
        """The first and last measured tensors: one of them takes a gradient in any
        backward that reaches the model (the input side and the output side)."""
        params = self._layers.params
        return (params[0], params[-1]) if params else ()

    def _before_scaler_update(self) -> None:
        if not self._stepped_since_update and not self._broken and self.optimizer is not None:
            self._record_skipped_step()
        self._stepped_since_update = False

    @_hook
    def _record_skipped_step(self) -> None:
        # GradScaler found an inf/NaN and did not call optimizer.step: no optimizer hook
        # fired. The gradients are unscaled (and hold the overflow); weights are unchanged.
        vec = self._measure.new_vector()
        meta = self._new_meta(detail=False, with_updates=False)
        meta.skipped = True
        self._measure_grads(vec, meta)
        self._stepped_since_update = True
        self._recorder.seal(vec, meta)

    @_hook
    def _on_backward(self, grads: Any) -> None:
        # No optimizer: every backward is one record (per-backward gradients); which
        # tensors train was re-read at the forward (see _on_forward).
        detail = self._detail_next()
        vec = self._measure.new_vector()
        meta = self._new_meta(detail, with_updates=False)
        meta.present = self._measure.grads(vec, list(grads))
        if self._backward_candidate is not None:
            self._loss.backpropagated_alone(self._backward_candidate)
        if detail:
            self._measure.weights_and_updates(vec, with_updates=False)
        self._recorder.seal(vec, meta)

    # ---- building a record --------------------------------------------------------------

    def _detail_next(self) -> bool:
        """Whether the next record carries per-layer detail."""
        return self.step % self.every == 0

    def _new_meta(self, detail: bool, with_updates: bool) -> StepMeta:
        frozen = self._layers.frozen if detail else ()
        return self._recorder.new_meta(detail, with_updates, frozen, self.optimizer)

    def _measure_grads(self, vec: torch.Tensor, meta: StepMeta) -> None:
        meta.present = self._measure.grads(vec)
