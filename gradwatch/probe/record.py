"""The record of each step: sealed when the step is taken, sent when the next step begins
(its first training forward or backward, or its optimizer step) or at detach, so that
values logged after a step, before the next, belong to it (an evaluation, a pre-clip norm
computed after the backward of a model updated by hand). The wire record is built on the
background thread from the host-side facts of the step (`StepMeta`, known without reading
the device) and the packed vector's values."""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from gradwatch import protocol
from gradwatch.probe.clearing import ClearingCheck
from gradwatch.probe.handoff import Handoff, Pending
from gradwatch.probe.loss import StepLoss
from gradwatch.probe.measure import Layout, Measurer

if TYPE_CHECKING:
    from gradwatch.probe.transport import Transport


@dataclass
class StepMeta:
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
    # Floats, or device tensors (a tensor LR of fused/capturable optimizers) read on the
    # background thread: reading them here would wait for the device every step.
    lr: list[float | torch.Tensor] = field(default_factory=list)
    momentum: list[float | torch.Tensor | None] = field(default_factory=list)
    weight_decay: list[float | torch.Tensor | None] = field(default_factory=list)
    scalars: dict[str, Any] = field(default_factory=dict)

    def read_param_groups(self, param_groups: list[dict[str, Any]]) -> None:
        """LR, momentum (Adam's beta1) and weight decay of each param group."""
        for group in param_groups:
            self.lr.append(_later(group.get("lr")) or 0.0)
            betas = group.get("betas")
            self.momentum.append(_later(group.get("momentum", betas[0] if betas else None)))
            self.weight_decay.append(_later(group.get("weight_decay")))


def _later(value: Any) -> float | torch.Tensor | None:
    """A host value now; a device tensor copied on the device (asynchronously, ahead of the
    packed vector's copy, so it has landed when the background thread reads the vector)."""
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return value.detach().clone()
    return to_float(value)


def to_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def build_record(meta: StepMeta, values: list[float], layout: Layout) -> protocol.EncodedRecord:
    """The wire record of a step, as JSON text (no model is built here: the collector
    validates it). Raises ValueError for what the collector would refuse (a logged name that
    is not a scalar name, more param groups than the protocol takes): that step is dropped."""
    grad_sq = values[layout.grad()]
    if len(meta.present) == layout.layers:  # every layer has a gradient (the usual case)
        layer_grad_sq: list[float | None] = cast(list[float | None], grad_sq)
        grad_norm_sq: float | None = sum(grad_sq)
        # A finite sum has no NaN or infinity among its terms: count them only otherwise.
        nonfinite = 0 if math.isfinite(grad_norm_sq) else sum(1 for v in grad_sq if not math.isfinite(v))
    else:
        layer_grad_sq = [v if i in meta.present else None for i, v in enumerate(grad_sq)]
        grad_norm_sq = sum(v for v in layer_grad_sq if v is not None) if meta.present else None
        nonfinite = sum(1 for v in layer_grad_sq if v is not None and not math.isfinite(v))
    found_inf = meta.has_found_inf and values[layout.extra("found_inf")] > 0
    guard_skipped = values[layout.extra("skipped")] > 0  # decided on the device (actions.SkipGuard)
    lr = [to_float(v) or 0.0 for v in meta.lr]
    momentum = [to_float(v) for v in meta.momentum]
    weight_decay = [to_float(v) for v in meta.weight_decay]
    scalars = {k: v for k, v in ((k, to_float(v)) for k, v in meta.scalars.items()) if v is not None}
    _check(lr, scalars)
    fields = {
        "step": meta.step,
        "time": meta.time,
        "step_time": meta.step_time,
        "loss": values[layout.extra("loss")] if meta.has_loss else None,
        "grad_norm_sq": grad_norm_sq,
        "grad_norm_preclip": values[layout.extra("preclip_norm")] if meta.has_preclip else None,
        "nonfinite_layers": nonfinite,
        "skipped": meta.skipped or found_inf or guard_skipped,
        "grads_kept": meta.grads_kept,
        "loss_scale": values[layout.extra("loss_scale")] if meta.has_scale else None,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "scalars": scalars,
    }
    detail = None
    if meta.detail:
        detail = {
            "layer_grad_sq": layer_grad_sq,
            "layer_weight_sq": _unmeasured(values[layout.weight()], meta.frozen),
            "layer_update_sq": _unmeasured(values[layout.update()], meta.frozen) if meta.with_updates else None,
            "layer_frozen": meta.frozen,
        }
    # Every float written comes from `values`, the param groups or the scalars (time and
    # step_time are finite): one sum says whether a NaN or an infinity is among them.
    finite = math.isfinite(sum(values) + sum(lr) + sum(v for v in momentum if v is not None)
                           + sum(v for v in weight_decay if v is not None) + sum(scalars.values()))
    return protocol.EncodedRecord.build(fields, detail, finite)


def _check(lr: list[float], scalars: dict[str, float]) -> None:
    """What the collector would refuse, which a model would have caught here."""
    if len(lr) > protocol.MAX_PARAM_GROUPS:
        raise ValueError(f"{len(lr)} param groups: the protocol takes at most {protocol.MAX_PARAM_GROUPS}")
    for name in scalars:
        if not _scalar_name(name):
            raise ValueError(f"logged value {name!r}: not a scalar name ({protocol.SCALAR_NAME_PATTERN})")


_SCALAR_NAME = re.compile(protocol.SCALAR_NAME_PATTERN)


@functools.lru_cache(maxsize=1024)  # a run logs the same few names at every step
def _scalar_name(name: str) -> bool:
    return _SCALAR_NAME.fullmatch(name) is not None


def _unmeasured(values: list[float], frozen: tuple[int, ...]) -> list[float | None]:
    """Per-layer values (a fresh slice, edited in place) with None for the frozen layers,
    which the probe does not measure."""
    out = cast(list[float | None], values)
    for i in frozen:
        out[i] = None
    return out


class Recorder:
    """Seals each step's record and sends it, with what was logged for its step."""

    def __init__(self, measure: Measurer, handoff: Handoff, transport: Transport, loss: StepLoss,
                 clearing: ClearingCheck, scaler: Any) -> None:
        self._measure = measure
        self._handoff = handoff
        self._transport = transport
        self._loss = loss
        self._clearing = clearing
        self._scaler = scaler
        self.step = 0  # records sealed so far: optimizer steps (or backwards, without one)
        self._last_record = time.perf_counter()
        self._unsent: tuple[torch.Tensor, StepMeta] | None = None  # sealed, waiting for its step's end
        self._scalars: dict[str, Any] = {}
        self.preclip: torch.Tensor | None = None  # clip_grad_norm_'s total norm since the last send

    def new_meta(self, detail: bool, with_updates: bool, frozen: tuple[int, ...], optimizer: Any) -> StepMeta:
        meta = StepMeta(
            step=self.step + 1,
            time=time.time(),
            step_time=time.perf_counter() - self._last_record if self.step else None,
            detail=detail,
            with_updates=with_updates,
            present=set(),
            frozen=frozen,
        )
        if optimizer is not None:
            meta.read_param_groups(optimizer.param_groups)
        return meta

    def log_scalar(self, name: str, value: Any) -> None:
        if len(self._scalars) < protocol.MAX_SCALARS or name in self._scalars:
            self._scalars[name] = value.detach() if isinstance(value, torch.Tensor) else value

    def seal(self, vec: torch.Tensor, meta: StepMeta) -> None:
        """The step was taken: its record waits for what is logged until the next begins."""
        self.flush()  # a record still waiting goes first
        scale = getattr(self._scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            self._measure.set_extra(vec, "loss_scale", scale)  # before scaler.update
            meta.has_scale = True
        meta.grads_kept = self._clearing.take()
        self.step += 1
        self._last_record = time.perf_counter()
        self._unsent = (vec, meta)

    def flush(self) -> None:
        """Send the sealed record with what was logged for its step."""
        if self._unsent is None:
            return
        vec, meta = self._unsent
        self._unsent = None
        loss = self._loss.take(vec.device)
        if loss is not None:
            self._measure.set_extra(vec, "loss", loss)
            meta.has_loss = True
        if self.preclip is not None:
            self._measure.set_extra(vec, "preclip_norm", self.preclip)
            meta.has_preclip = True
            self.preclip = None
        meta.scalars, self._scalars = self._scalars, {}
        if self._transport.backlog_full():
            self._transport.count_drop()
            return
        pending = self._handoff.put(vec)
        if pending is None:
            self._transport.count_drop()
            return
        self._transport.submit(functools.partial(self._to_record, meta, pending))

    def _to_record(self, meta: StepMeta, pending: Pending) -> protocol.EncodedRecord:
        """Background thread: read the packed vector and build the wire record."""
        return build_record(meta, self._handoff.read(pending), self._measure.layout)
