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
import math
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar, cast

import torch

from gradwatch import protocol
from gradwatch.errors import StopTraining
from gradwatch.probe import backward, clip
from gradwatch.probe.actions import ActionState
from gradwatch.probe.handoff import Handoff, Pending
from gradwatch.probe.layers import LayerMap, LayerSpec
from gradwatch.probe.measure import Measurer
from gradwatch.probe.transport import Transport

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


@dataclass
class _StepMeta:
    """Host-side facts of a step, known without reading the device."""

    step: int
    time: float
    step_time: float | None
    detail: bool
    with_updates: bool
    present: set[int]  # ids of the layers that had a gradient
    frozen: tuple[int, ...] = ()  # ids of the frozen layers, on detail steps
    grads_after_step: bool = False  # a closure (LBFGS) computes them inside step
    skipped: bool = False
    grads_kept: bool = False
    has_loss: bool = False
    has_scale: bool = False
    has_preclip: bool = False
    has_found_inf: bool = False
    lr: list[float] = field(default_factory=list)
    momentum: list[float | None] = field(default_factory=list)
    weight_decay: list[float | None] = field(default_factory=list)
    scalars: dict[str, Any] = field(default_factory=dict)


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _checked_url(url: str) -> str:
    """The collector address, refused at once when it cannot work (retrying it as if the
    collector were down would only drop the whole run, step by step, to the same mistake)."""
    if url.startswith("file:"):
        return url
    if "://" not in url:
        return f"ws://{url}"  # host:port, as users type it
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("ws", "wss"):
        return url
    if scheme in ("http", "https"):
        raise ValueError(
            f"GRADWATCH_URL / url={url!r} is an HTTP address (the collector's --http-port, for /metrics "
            f"and queries); the probe streams to its websocket port: ws://HOST:8765 (--port), or file:PATH"
        )
    raise ValueError(f"url={url!r} is not a collector address: use ws://HOST:8765 (wss:// with TLS) or file:PATH")


def unwrap_optimizer(optimizer: Any) -> tuple[Any, Any]:
    """The optimizer inside any wrappers, and the GradScaler of the outermost wrapper that has one.

    Wrappers (Accelerate's `AcceleratedOptimizer`, Lightning's and DeepSpeed's) keep the real
    optimizer at `.optimizer`; some subclass `Optimizer` without initialising it, so its hook
    registries are missing and hooks must go on the inner one, which every step reaches."""
    scaler = None
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        scaler = scaler or getattr(optimizer, "scaler", None)
        optimizer = optimizer.optimizer
    return optimizer, scaler


def _grad_state(p: torch.Tensor) -> tuple[int, int]:
    """Changes whenever a backward writes p's gradient: a new `.grad` tensor, or an in-place
    accumulation into the old one (which bumps its version counter)."""
    grad = p.grad
    return (0, 0) if grad is None else (id(grad), grad._version)


def _loss_of(output: Any) -> torch.Tensor | None:
    """The training loss inside a forward's output: a 0-dim tensor, a tuple holding one,
    or a dict / ModelOutput with a `loss`."""
    if isinstance(output, torch.Tensor):
        return output if output.ndim == 0 and output.is_floating_point() else None
    if isinstance(output, Mapping):
        return _loss_of(output.get("loss"))
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return _loss_of(loss)
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.ndim == 0 and item.is_floating_point():
                return item
    return None


def _default_run_name() -> str:
    import __main__

    stem = os.path.splitext(os.path.basename(getattr(__main__, "__file__", "") or "python"))[0] or "run"
    # All ranks of a distributed job must pick the same name without talking to each other.
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if job and job != "none":
        return protocol_safe(f"{stem}-{job}")
    if "MASTER_PORT" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return protocol_safe(f"{stem}-{os.environ.get('MASTER_ADDR', 'local')}-{os.environ['MASTER_PORT']}")
    return protocol_safe(f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def protocol_safe(name: str) -> str:
    """`name` made acceptable as a run name (see protocol.RUN_NAME_PATTERN)."""
    cleaned = re.sub(r"[^A-Za-z0-9._:@+-]", "-", name).lstrip("._:@+-")
    return (cleaned or "run")[:128]


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _is_sharded(t: torch.Tensor) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


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
        self.name = protocol_safe(name or os.environ.get("GRADWATCH_RUN") or _default_run_name())
        self.url = _checked_url(url or os.environ.get("GRADWATCH_URL") or "ws://127.0.0.1:8765")
        self.every = every
        self.should_stop = False
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
        self.rank, self.world_size = _distributed()
        self.sharded = any(_is_sharded(p) for p in model.parameters())
        self._layers = LayerMap(model, layers, contributes=self._contributes)
        self._param_ids = {id(p) for p in model.parameters()}
        first = next(iter(model.parameters()), None)
        home = first.device if first is not None else torch.device("cpu")
        self._measure = Measurer(self._layers, home)
        self._handoff = Handoff(self._measure.layout.length, self._measure.dtype, home)
        self._update_ratio = update_ratio

        self.step = 0  # optimizer steps recorded so far
        self._last_record = time.perf_counter()
        self._losses: list[torch.Tensor | float] = []
        self._logged_losses: list[torch.Tensor | float] = []
        # Losses that `backward()` was called on and that reached this run's parameters:
        # the loss of scripts that compute it outside the model (see probe/backward.py).
        self._backward_losses: list[torch.Tensor] = []
        self._backward_candidate: torch.Tensor | None = None
        # 'backward': the model's own loss is a part of the step's (Hugging Face normalises each
        # micro-batch by the tokens of the whole accumulated batch), so the step's loss is the
        # sum of what was backpropagated, as the framework itself reports it.
        self._loss_from_backward = loss_from == "backward"
        self._loss_logged = False
        # A sentinel, its `.grad` (weakly: a cleared gradient must be freed), the gradient's
        # version and the sentinel's own, right after the last update, until the next
        # backward checks whether anything cleared the gradient (zero_grad) in between.
        self._grad_after_step: tuple[torch.Tensor, weakref.ref[torch.Tensor], int, int] | None = None
        self._grads_kept = False
        self._unsent: tuple[torch.Tensor, _StepMeta] | None = None  # sealed, waiting for its step's end
        self._scalars: dict[str, Any] = {}
        self._preclip: torch.Tensor | None = None
        self._stepped_since_update = False
        self._pending: tuple[torch.Tensor, _StepMeta] | None = None

        self._actions = ActionState(self, enabled=actions, on_checkpoint=on_checkpoint, stop_mode=stop)
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
        self._handles: list[Any] = []
        self._grad_hook: Any = None  # the gradient hook of a run without an optimizer
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
                self._loss_logged = True  # the user reports the loss: backward() is not read
                self._logged_losses.append(value.detach() if isinstance(value, torch.Tensor) else float(value))
            elif len(self._scalars) < protocol.MAX_SCALARS or key in self._scalars:
                self._scalars[protocol_safe(key).replace("-", "_")] = (
                    value.detach() if isinstance(value, torch.Tensor) else value
                )

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
        self._actions.uninstall()
        if self.scaler is not None and "update" in vars(self.scaler):
            del self.scaler.update
        clip.unsubscribe(self)
        backward.unsubscribe(self)
        atexit.unregister(self.detach)
        if self._actions.stopped_reason:
            status, reason = "stopped", self._actions.stopped_reason
        if not self._broken:
            try:
                self._flush()  # the last step's record, with what was logged after it
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

    # ---- hooks ------------------------------------------------------------------------

    def _install_hooks(self, loss_fn: torch.nn.Module | None) -> None:
        source = loss_fn if loss_fn is not None else self.model
        self._handles.append(source.register_forward_hook(self._on_forward))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
            self._actions.install(self.optimizer)
        else:
            self._hook_grads()
        if self.scaler is not None:
            original_update = self.scaler.update

            def update(*args: Any, **kwargs: Any) -> Any:
                self._before_scaler_update()
                return original_update(*args, **kwargs)

            self.scaler.update = update

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
        return not self.sharded or _is_sharded(p) or self.rank == 0

    def on_clip(self, params: list[torch.Tensor], total_norm: torch.Tensor) -> None:
        if params and id(params[0]) in self._param_ids:
            self._preclip = total_norm.detach()

    @_hook
    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or not self.model.training:
            return  # an evaluation: what is logged around it still belongs to the last step
        self._flush()  # a training step begins: the last one's record is complete
        if self.optimizer is None and self._detail_next() and self._measure.refresh():
            self._hook_grads()  # before the backward, whose gradients the hook passes
        loss = None if self._loss_from_backward else _loss_of(output)
        if loss is not None and len(self._losses) < 1024:
            self._losses.append(loss.detach())

    @_hook
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._flush()  # in case no training forward announced this step
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
        if meta.detail:
            self._measure.weights_and_updates(vec, meta.with_updates)
        self._stepped_since_update = True
        self._emit(vec, meta)
        self._note_gradients()

    def _backward_loss(self, device: torch.device) -> torch.Tensor:
        """The sum of the losses backpropagated since the last record (the user divides by
        the accumulation steps, or the gradients are that sum too)."""
        return torch.stack([t.to(device, torch.float32, non_blocking=True) for t in self._backward_losses]).sum()

    def _unscaled(self, loss: torch.Tensor) -> torch.Tensor:
        """A backpropagated loss without GradScaler's factor, divided now: `scaler.update()`
        changes the scale in place before the record is sent."""
        scale = getattr(self.scaler, "_scale", None)
        loss = loss.detach()
        return loss / scale.to(loss.device, non_blocking=True) if isinstance(scale, torch.Tensor) else loss

    def before_backward(self, loss: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
        """`loss.backward()` is about to run: note where the gradients of a few of this
        run's tensors stand (host-side: the identity and version of `.grad`)."""
        if self._broken or not self.enabled or self._detached:
            return None
        self._backward_candidate = loss  # detached only if kept: most of the cost here
        if self._grad_after_step is not None:  # the first backward since the last step
            param, grad, version, param_version = self._grad_after_step
            self._grad_after_step = None
            # Without an optimizer the snapshot is taken after each backward: the weights must
            # have moved since (a hand-written update), or this is deliberate accumulation.
            updated = self.optimizer is not None or param._version != param_version
            self._grads_kept = updated and param.grad is not None and param.grad is grad() \
                and param.grad._version == version
        if self._loss_logged or self._losses:
            return ()  # the loss is logged or returned by the model: backward() is not read
        return tuple(_grad_state(p) for p in self._sentinels())

    def after_backward(self, loss: torch.Tensor, before: tuple[tuple[int, int], ...] | None) -> None:
        """Keep the loss if this backward wrote a gradient of this run's tensors."""
        candidate, self._backward_candidate = self._backward_candidate, None
        if before is None or candidate is None:
            return
        if self.optimizer is None:  # the gradient hook took the loss during the backward
            self._note_gradients()
            return
        if not before:
            return  # nothing to attribute (see before_backward)
        if not any(_grad_state(p) != state for p, state in zip(self._sentinels(), before)):
            return
        # A step whose forward the probe does not see (Lightning calls `training_step`, not the
        # module) begins at its first backward: the last step's record is complete.
        self._flush()
        if len(self._backward_losses) < 1024:
            self._backward_losses.append(self._unscaled(candidate))

    def _note_gradients(self) -> None:
        """After an update (the optimizer's step, or without one each backward): where a
        sentinel's gradient stands, for the next backward to tell whether it was cleared."""
        sentinels = self._sentinels()
        grad = sentinels[0].grad if sentinels else None
        if grad is not None:
            self._grad_after_step = (sentinels[0], weakref.ref(grad), grad._version, sentinels[0]._version)

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
        self._emit(vec, meta)

    @_hook
    def _on_backward(self, grads: Any) -> None:
        # No optimizer: every backward is one record (per-backward gradients); which
        # tensors train was re-read at the forward (see _on_forward).
        detail = self._detail_next()
        vec = self._measure.new_vector()
        meta = self._new_meta(detail, with_updates=False)
        meta.present = self._measure.grads(vec, list(grads))
        if self._backward_candidate is not None:
            self._backward_losses = [self._unscaled(self._backward_candidate)]
        if detail:
            self._measure.weights_and_updates(vec, with_updates=False)
        self._emit(vec, meta)

    # ---- building a record --------------------------------------------------------------

    def _detail_next(self) -> bool:
        """Whether the next record carries per-layer detail."""
        return self.step % self.every == 0

    def _new_meta(self, detail: bool, with_updates: bool) -> _StepMeta:
        now = time.perf_counter()
        meta = _StepMeta(
            step=self.step + 1,
            time=time.time(),
            step_time=now - self._last_record if self.step else None,
            detail=detail,
            with_updates=with_updates,
            present=set(),
            frozen=self._layers.frozen if detail else (),
        )
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                meta.lr.append(_to_float(group.get("lr")) or 0.0)
                betas = group.get("betas")
                meta.momentum.append(_to_float(group.get("momentum", betas[0] if betas else None)))
                meta.weight_decay.append(_to_float(group.get("weight_decay")))
        return meta

    def _measure_grads(self, vec: torch.Tensor, meta: _StepMeta) -> None:
        meta.present = self._measure.grads(vec)

    def _emit(self, vec: torch.Tensor, meta: _StepMeta) -> None:
        """Seal the record of the step just taken. It is sent when the next step begins (its
        first training forward, or its optimizer step) or at detach: values logged after
        this step, before the next, belong to it (an evaluation, a pre-clip norm computed
        after the backward of a model updated by hand)."""
        self._flush()  # a record still waiting goes first
        if self.scaler is not None and isinstance(getattr(self.scaler, "_scale", None), torch.Tensor):
            self._measure.set_extra(vec, "loss_scale", self.scaler._scale)  # before scaler.update
            meta.has_scale = True
        meta.grads_kept, self._grads_kept = self._grads_kept, False
        self.step += 1
        self._last_record = time.perf_counter()
        self._unsent = (vec, meta)

    def _flush(self) -> None:
        """Send the sealed record with what was logged for its step."""
        if self._unsent is None:
            return
        vec, meta = self._unsent
        self._unsent = None
        losses = self._logged_losses or self._losses
        if losses:
            tensors = [torch.as_tensor(x, dtype=torch.float32).to(vec.device, non_blocking=True) for x in losses]
            self._measure.set_extra(vec, "loss", torch.stack([t.reshape(()) for t in tensors]).mean())
            meta.has_loss = True
        elif self._backward_losses and not self._loss_logged:
            self._measure.set_extra(vec, "loss", self._backward_loss(vec.device))
            meta.has_loss = True
        self._losses, self._logged_losses, self._backward_losses = [], [], []
        if self._preclip is not None:
            self._measure.set_extra(vec, "preclip_norm", self._preclip)
            meta.has_preclip = True
            self._preclip = None
        meta.scalars, self._scalars = self._scalars, {}
        if self._transport.backlog_full():
            self._transport.count_drop()
            return
        pending = self._handoff.put(vec)
        if pending is None:
            self._transport.count_drop()
            return
        self._transport.submit(functools.partial(self._to_record, meta, pending))

    def _to_record(self, meta: _StepMeta, pending: Pending) -> protocol.StepRecord:
        """Background thread: read the packed vector and build the wire record."""
        values = self._handoff.read(pending)
        layout = self._measure.layout
        grad_sq = values[layout.grad()]
        layer_grad_sq = [v if i in meta.present else None for i, v in enumerate(grad_sq)]
        weight_sq = _unmeasured(values[layout.weight()], meta.frozen) if meta.detail else None
        update_sq = _unmeasured(values[layout.update()], meta.frozen) if meta.with_updates else None
        found_inf = meta.has_found_inf and values[layout.extra("found_inf")] > 0
        return protocol.StepRecord(
            step=meta.step,
            time=meta.time,
            step_time=meta.step_time,
            loss=values[layout.extra("loss")] if meta.has_loss else None,
            grad_norm_sq=sum(v for v in layer_grad_sq if v is not None) if meta.present else None,
            grad_norm_preclip=values[layout.extra("preclip_norm")] if meta.has_preclip else None,
            nonfinite_layers=sum(1 for v in layer_grad_sq if v is not None and not math.isfinite(v)),
            skipped=meta.skipped or found_inf,
            grads_kept=meta.grads_kept,
            loss_scale=values[layout.extra("loss_scale")] if meta.has_scale else None,
            lr=meta.lr,
            momentum=meta.momentum,
            weight_decay=meta.weight_decay,
            scalars={k: v for k, v in ((k, _to_float(v)) for k, v in meta.scalars.items()) if v is not None},
            layer_grad_sq=layer_grad_sq if meta.detail else None,
            layer_weight_sq=weight_sq,
            layer_update_sq=update_sq,
            layer_frozen=list(meta.frozen) if meta.detail else None,
        )


def _unmeasured(values: list[float], frozen: tuple[int, ...]) -> list[float | None]:
    """Per-layer values (a fresh slice, edited in place) with None for the frozen layers,
    which the probe does not measure."""
    out = cast(list[float | None], values)
    for i in frozen:
        out[i] = None
    return out
