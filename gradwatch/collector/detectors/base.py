"""The uniform detector interface: observation in, alert events out.

A detector is a small pure object: it keeps its own state, does no I/O and reads no clock.
Subclasses implement `check`, which says which conditions hold *now*; the base class turns
those into events with hysteresis: an alert fires once when its condition starts and resolves
once when it ends, so a persisting condition never produces an alert storm; while it lasts,
it keeps the finding (message, value) of its onset.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict

from gradwatch.collector.detectors.runbook import hint

Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class Observation:
    """One optimizer step of a run, merged over its ranks, as every detector sees it.

    Norms are plain (not squared). Per-layer tuples are aligned with `layers` and are None
    on steps that carry no per-layer detail (the probe sends detail every `every` steps).
    """

    step: int
    time: float = 0.0
    loss: float | None = None
    grad_norm: float | None = None
    grad_norm_preclip: float | None = None
    nonfinite_layers: int = 0
    skipped: bool = False
    grads_kept: bool = False  # the gradients were not cleared after the previous step
    loss_scale: float | None = None
    lr: tuple[float, ...] = ()
    scalars: Mapping[str, float] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    layer_grad_norm: tuple[float | None, ...] | None = None
    layer_weight_norm: tuple[float, ...] | None = None
    layer_update_ratio: tuple[float, ...] | None = None
    # Indices into `layers` of the frozen layers (no parameter requires a gradient), as of
    # this step's per-layer detail: not measured, and never judged by the per-layer rules.
    layer_frozen: frozenset[int] = frozenset()

    @property
    def val_loss(self) -> float | None:
        return self.scalars.get("val_loss")


@dataclass(frozen=True)
class AlertEvent:
    """An alert firing (`resolved=False`) or ending (`resolved=True`) at `step`."""

    kind: str
    severity: Severity
    step: int
    message: str
    layer: str | None = None
    resolved: bool = False
    value: float | None = None
    hint: str = ""  # what to try, in the order a practitioner would check it


@dataclass(frozen=True)
class Finding:
    """A condition that holds at this step; `key` tells apart independent conditions
    of one detector (the layer at fault, or None for the run as a whole)."""

    message: str
    severity: Severity = "warning"
    layer: str | None = None
    value: float | None = None
    hint: str = ""  # overrides the kind's runbook hint when this finding knows better


class DetectorSettings(BaseModel):
    """Base of every detector's settings; each field is overridable from the config file."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    enabled: bool = True


class Detector(ABC):
    kind: ClassVar[str]
    Settings: ClassVar[type[DetectorSettings]]

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self._active: dict[str | None, Finding] = {}

    @abstractmethod
    def check(self, obs: Observation) -> list[Finding] | None:
        """The conditions holding at this step, or None when this step cannot tell
        (for example a per-layer rule on a step without per-layer detail): then the
        active alerts stay as they are."""

    def observe(self, obs: Observation) -> list[AlertEvent]:
        findings = self.check(obs)
        if findings is None or (not findings and not self._active):
            return []  # nothing holds and nothing did: most steps of most runs
        now = {f.layer: self._active.get(f.layer, f) for f in findings}
        events = [
            AlertEvent(self.kind, f.severity, obs.step, f.message, f.layer, False, f.value, f.hint or hint(self.kind))
            for key, f in now.items()
            if key not in self._active
        ]
        events += [
            AlertEvent(self.kind, f.severity, obs.step, self.resolution(f, obs), f.layer, True)
            for key, f in self._active.items()
            if key not in now
        ]
        self._active = now
        return events

    def resolution(self, finding: Finding, obs: Observation) -> str:
        """What changed, for the message of the alert's resolution at `obs`: the value now,
        not the firing text again. Detectors say it in their own terms."""
        return f"{self.kind} no longer holds at step {obs.step}"

    @property
    def active(self) -> Mapping[str | None, Finding]:
        return self._active


def layer_value(obs: Observation, values: tuple[float | None, ...] | None, layer: str | None) -> float | None:
    """One layer's entry of a per-layer tuple of `obs` (None when absent): for resolution
    messages, which run once per episode, so the linear search is fine."""
    if values is None or layer is None or layer not in obs.layers:
        return None
    return values[obs.layers.index(layer)]


def finite(x: float | None) -> TypeGuard[float]:
    return x is not None and math.isfinite(x)
