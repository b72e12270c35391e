"""A run's history for the web view: its curves, its gradient-flow matrix, the alerts and
actions that mark them, and its one-off results (an LR range test, a landscape: results.py).

Pure: observations (as the detectors see them) and markers in; JSON-ready snapshots and
deltas out; no I/O, no clock. Bounded: BUCKETS buckets per curve (see buckets.py: min, max
and last per bucket, the width doubling as the run grows), a bounded number of curves
(MAX_LR_GROUPS learning rates, MAX_LOGGED logged scalars), the matrix of flow.py and the
last MAX_MARKERS markers. Arrays grow with the run up to those bounds: at most about
1.5 MiB per run whatever its length, and about 0.4 MiB for 10,000 steps of 200 layers.

The curves, one value per step where the step has it:

  loss, val_loss        train loss; val_loss where it was logged
  gap                   val_loss minus the mean train loss since the previous val_loss
  grad_norm             the global gradient norm the optimizer saw (after clipping)
  grad_norm_preclip     the norm clip_grad_norm_ returned (before clipping)
  loss_scale            the AMP loss scale (the `skipped` counts say where steps were skipped)
  update_ratio          ||Δw|| / ||w|| over all measured layers, on per-layer detail steps
  weight_norm           ||w|| over all measured layers, on per-layer detail steps
  steps_per_second      from the probe's step times
  lr/N                  the learning rate of param group N
  log/NAME              any other logged scalar (val_acc, ...)

A NaN value is not drawn: it is counted in the bucket's `nonfinite` with the step's other
non-finite findings.
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from gradwatch.collector.buckets import Cells, StepBuckets, decode, encode
from gradwatch.collector.detectors.base import Observation
from gradwatch.collector.flow import GradientFlow
from gradwatch.collector.results import Result, Results

BUCKETS = 1024  # per curve at most; between 512 and 1024 once the run is long
CURVE_DIGITS = 6
MAX_LR_GROUPS = 16
MAX_LOGGED = 8
MAX_MARKERS = 1_000
MARKER_OVERHEAD_BYTES = 120  # a marker object and its fields, beside the text they hold
FORMAT = 1  # of `to_json`, for files a later version must read
CURVE_NAME = re.compile(
    r"^(loss|val_loss|gap|grad_norm|grad_norm_preclip|loss_scale|update_ratio|weight_norm|steps_per_second"
    r"|lr/[0-9]{1,3}|log/[A-Za-z_][A-Za-z0-9_.:/-]{0,63})$"
)


@dataclass(frozen=True)
class Marker:
    """An alert firing or resolving, an action sent or its ack: a mark on the charts at
    `step` and a line in the page's alert list. `event` is the alert history's."""

    step: int
    event: str  # fired, resolved, action, ack
    kind: str  # the alert kind (for actions and acks: the alert that caused them)
    severity: str
    message: str
    hint: str = ""
    layer: str | None = None
    action: str | None = None
    outcome: str | None = None
    time: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Marker:
        marker = cls(**data)
        if not isinstance(marker.step, int) or not all(
            isinstance(getattr(marker, f), str) for f in ("event", "kind", "severity", "message", "hint")
        ):
            raise ValueError(f"not a marker: {data!r}")
        return marker

    @property
    def nbytes(self) -> int:
        texts = (getattr(self, f.name) for f in fields(self))
        return MARKER_OVERHEAD_BYTES + sum(len(t) for t in texts if isinstance(t, str))


class RunSeries:
    """One run's history for its page. Feed it `observe` (steps in increasing order, as the
    registry merges them; an older step is ignored) and `mark`; read it with `since`."""

    def __init__(self) -> None:
        self.version = 0  # bumped by every change
        self.last_step = -1
        self.buckets = StepBuckets(BUCKETS, counters=("skipped", "nonfinite"))
        self.curves: dict[str, Cells] = {}
        self.flow: GradientFlow | None = None
        self.flow_since = 0  # the version that started the current matrix
        self.markers: deque[tuple[int, Marker]] = deque(maxlen=MAX_MARKERS)  # (version, marker)
        self.previous: tuple[int, float] | None = None  # (step, time) of the last observation
        self.train_losses = (0.0, 0)  # sum and count of finite train losses since the last val_loss
        self.results = Results()

    def observe(self, obs: Observation) -> None:
        if obs.step <= self.last_step:
            return
        self.version += 1
        self.last_step = obs.step
        i = self.buckets.place(obs.step, self.version)
        self.buckets.counters["skipped"][i] += obs.skipped
        self.buckets.counters["nonfinite"][i] += _nonfinite(obs)
        for name, value in self._values(obs):
            if not math.isnan(value):
                self._curve(name).add(i, value)
        if obs.layer_grad_norm is not None and obs.layers:
            if self.flow is None or self.flow.layers_total != len(obs.layers):
                self.flow, self.flow_since = GradientFlow.for_layers(obs.layers), self.version
            self.flow.add(obs.step, obs.layer_grad_norm, self.version)

    def mark(self, marker: Marker) -> None:
        self.version += 1
        self.markers.append((self.version, marker))

    def keep(self, result: Result) -> None:
        """An LR range test's verdict or a landscape grid (the newest of each kind is kept)."""
        self.version += 1
        self.results.keep(result, self.version)

    def since(self, version: int) -> dict[str, Any]:
        """Everything that changed after `version`: the curves' and the matrix's changed
        buckets, the new markers and results. A version this series never had (0, or one from
        before a restart) gets everything, with `reset` true; so does a part (`curves`,
        `layers`) whose buckets were merged since, with its own `reset`."""
        reset = not 0 < version <= self.version
        flow_reset = reset or version < self.flow_since
        return {
            "version": self.version,
            "reset": reset,
            "last_step": self.last_step,
            "curves": self._curves_since(version, reset),
            "layers": self.flow.since(version, flow_reset) if self.flow is not None else None,
            "markers": [asdict(m) for v, m in self.markers if reset or v > version],
            "results": self.results.since(version, reset),
        }

    def to_json(self) -> dict[str, Any]:
        """Everything, to save a finished run's page (see `from_json`)."""
        return {"format": FORMAT, **self.since(0), "results": self.results.to_json(), "previous": self.previous,
                "train_losses": self.train_losses}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSeries:
        """Raises ValueError when `data` is not what `to_json` wrote."""
        if data.get("format") != FORMAT:
            raise ValueError(f"series format {data.get('format')!r}, expected {FORMAT}")
        try:
            return cls._restore(data)
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"malformed series: {type(err).__name__}: {err}") from None

    @property
    def nbytes(self) -> int:
        """About what this series holds in memory: its arrays, row names and marker texts."""
        flow = self.flow.nbytes if self.flow is not None else 0
        curves = sum(c.nbytes for c in self.curves.values())
        markers = sum(m.nbytes for _, m in self.markers)
        return self.buckets.nbytes + curves + flow + markers + self.results.nbytes

    # --- internals ---------------------------------------------------------------------------

    def _values(self, obs: Observation) -> list[tuple[str, float]]:
        values = [(n, getattr(obs, n)) for n in ("loss", "grad_norm", "grad_norm_preclip", "loss_scale")]
        values += [(f"lr/{k}", lr) for k, lr in enumerate(obs.lr[:MAX_LR_GROUPS])]
        loss_sum, losses = self.train_losses
        if obs.loss is not None and math.isfinite(obs.loss):
            loss_sum, losses = loss_sum + obs.loss, losses + 1
        if obs.val_loss is not None:
            values.append(("val_loss", obs.val_loss))
            if losses:
                values.append(("gap", obs.val_loss - loss_sum / losses))
            loss_sum, losses = 0.0, 0
        self.train_losses = (loss_sum, losses)
        logged = sum(1 for n in self.curves if n.startswith("log/"))
        for name, value in obs.scalars.items():
            if name != "val_loss" and (f"log/{name}" in self.curves or logged < MAX_LOGGED):
                logged += f"log/{name}" not in self.curves
                values.append((f"log/{name}", value))
        values += _weight_values(obs)
        if math.isfinite(obs.time):  # (a probe's clock is taken as sent; a NaN must not stick)
            if self.previous is not None and obs.time > self.previous[1]:
                values.append(("steps_per_second", (obs.step - self.previous[0]) / (obs.time - self.previous[1])))
            self.previous = (obs.step, obs.time)
        return [(n, v) for n, v in values if v is not None]

    def _curve(self, name: str) -> Cells:
        curve = self.curves.get(name)
        if curve is None:
            curve = self.curves[name] = Cells()
            curve.grow(self.buckets.used)
            self.buckets.members.append(curve)
        return curve

    def _curves_since(self, version: int, reset: bool) -> dict[str, Any]:
        buckets = self.buckets
        reset = reset or version < buckets.relaid_at
        start = 0 if reset else buckets.first_changed_after(version)
        end = buckets.used
        return {
            "reset": reset,
            "width": buckets.width,
            "origin": buckets.origin,
            "from": start,
            "step": buckets.steps_json(start),
            "skipped": list(buckets.counters["skipped"][start:end]),
            "nonfinite": list(buckets.counters["nonfinite"][start:end]),
            "curves": {
                name: {which: encode(getattr(c, which)[start:end], CURVE_DIGITS) for which in ("min", "max", "last")}
                for name, c in self.curves.items()
            },
        }

    @classmethod
    def _restore(cls, data: Mapping[str, Any]) -> RunSeries:
        series = cls()
        series.version, series.last_step = int(data["version"]), int(data["last_step"])
        curves = data["curves"]
        steps = curves["step"]
        counters = {name: curves[name] for name in series.buckets.counters}
        series.buckets.restore(curves["origin"], int(curves["width"]), steps, series.version, counters)
        for name, columns in curves["curves"].items():
            if not CURVE_NAME.match(name):
                raise ValueError(f"not a curve name: {name!r}")
            curve = series._curve(name)
            for which in ("min", "max", "last"):
                if len(columns[which]) != len(steps):
                    raise ValueError(f"{name}.{which}: {len(columns[which])} values for {len(steps)} buckets")
                curve.restore(which, decode(columns[which]))
        if data["layers"] is not None:
            series.flow = GradientFlow.from_json(data["layers"], series.version)
            series.flow_since = series.version
        series.markers.extend((series.version, Marker.from_json(m)) for m in data["markers"])
        previous = data["previous"]
        series.previous = (int(previous[0]), float(previous[1])) if previous is not None else None
        loss_sum, losses = data["train_losses"]
        series.train_losses = (float(loss_sum), int(losses))
        series.results = Results.from_json(data.get("results", {}), series.version)  # absent: saved before results
        return series


def _nonfinite(obs: Observation) -> bool:
    values = (obs.loss, obs.grad_norm)
    return obs.nonfinite_layers > 0 or any(v is not None and not math.isfinite(v) for v in values)


def _weight_values(obs: Observation) -> list[tuple[str, float]]:
    """The whole model's ||w|| and ||Δw||/||w|| from a detail step's per-layer values
    (squared norms add up over layers). The usual vectors, every layer measured, are summed
    in C: this runs on every detail step."""
    weights, ratios = obs.layer_weight_norm, obs.layer_update_ratio
    if weights is None:
        return []
    try:
        weight = math.hypot(*weights)
    except TypeError:  # a None: a layer not measured
        present = [w for w in weights if w is not None]
        if not present:
            return []
        weight = math.hypot(*present)
    out = [("weight_norm", weight)]
    if ratios is not None:
        try:
            update, base = math.hypot(*map(operator.mul, ratios, weights)), weight
        except TypeError:  # the ratio over the layers that have both
            pairs = [(r, w) for r, w in zip(ratios, weights) if r is not None and w is not None]
            update, base = math.hypot(*(r * w for r, w in pairs)), math.hypot(*(w for _, w in pairs))
        if base > 0:
            out.append(("update_ratio", update / base))
    return out
