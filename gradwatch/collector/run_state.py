"""The collector's state of one run and of each of its ranks: what the registry updates and
the HTTP, metrics and web shells read."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from gradwatch.collector.actions import RunActionState
from gradwatch.collector.detectors.base import AlertEvent, Detector, Observation
from gradwatch.collector.events import ENDED_STATUSES, RunStatus
from gradwatch.collector.merge import MergedStep
from gradwatch.collector.series import RunSeries
from gradwatch.protocol import Bye, Hello, StepRecord

RATE_WINDOW = 32  # recent merged steps used to estimate a run's step rate


@dataclass
class RankState:
    last_seen: float
    connected: bool = False
    bye: Bye | None = None
    lost: bool = False
    max_step: int = -1
    step_time: float | None = None
    dropped: int = 0  # records this rank's probe had to drop, as it reported them

    @property
    def reporting(self) -> bool:
        return self.bye is None and not self.lost


MAX_SCALAR_NAMES = 256  # per run, across all steps: bounds the gradwatch_scalar series


@dataclass
class LatestValues:
    """The last known value of each quantity of a run. A quantity missing from a step (val
    loss logged every 100 steps, loss not captured on one step) keeps its previous value,
    so its series does not flap on and off /metrics."""

    time: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    grad_norm_preclip: float | None = None
    loss_scale: float | None = None
    nonfinite_layers: int = 0
    lr: tuple[float | None, ...] = ()
    momentum: tuple[float | None, ...] = ()
    weight_decay: tuple[float | None, ...] = ()
    scalars: dict[str, float] = field(default_factory=dict)

    def update(self, merged: MergedStep) -> None:
        obs = merged.observation
        self.time = obs.time
        self.nonfinite_layers = obs.nonfinite_layers
        for name in ("loss", "grad_norm", "grad_norm_preclip", "loss_scale"):
            value = getattr(obs, name)
            if value is not None:
                setattr(self, name, value)
        self.lr = obs.lr or self.lr
        self.momentum = merged.momentum or self.momentum
        self.weight_decay = merged.weight_decay or self.weight_decay
        for name, value in obs.scalars.items():
            if name in self.scalars or len(self.scalars) < MAX_SCALAR_NAMES:
                self.scalars[name] = value

    @property
    def val_loss(self) -> float | None:
        return self.scalars.get("val_loss")


@dataclass
class RunState:
    """The collector's state of one run (not the probe's `gradwatch.probe.Run` handle)."""

    name: str
    hello: Hello
    started: float
    last_seen: float
    detectors: list[Detector]
    history: deque[Observation]
    layers: tuple[str, ...]  # hello.layers, as the tuple every Observation shares
    status: RunStatus = "running"
    ended_at: float | None = None
    ranks: dict[int, RankState] = field(default_factory=dict)  # the ranks that said hello
    missing_ranks_lost: bool = False  # ranks that never said hello, past the heartbeat timeout
    pending: dict[int, dict[int, StepRecord]] = field(default_factory=dict)  # step -> rank -> record
    pending_since: dict[int, float] = field(default_factory=dict)  # step -> when its first record came
    last_merged_step: int = -1
    latest: LatestValues = field(default_factory=LatestValues)
    latest_layer_detail: Observation | None = None  # the last observation with per-layer values
    steps_total: int = 0
    skipped_steps_total: int = 0
    nonfinite_steps_total: int = 0
    alerts_total: Counter[str] = field(default_factory=Counter)
    active_alerts: dict[tuple[str, str | None], AlertEvent] = field(default_factory=dict)
    actions_total: Counter[tuple[str, str]] = field(default_factory=Counter)  # (action, outcome)
    action_state: RunActionState = field(default_factory=RunActionState)
    series: RunSeries = field(default_factory=RunSeries)  # what the run's web page draws

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATUSES

    @property
    def ranks_reporting(self) -> int:
        return sum(1 for r in self.ranks.values() if r.connected and r.reporting)

    @property
    def highest_step(self) -> int:
        return max((r.max_step for r in self.ranks.values()), default=-1)

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        """The layers frozen as of the run's last per-layer detail, in hello order."""
        detail = self.latest_layer_detail
        return tuple(self.layers[i] for i in sorted(detail.layer_frozen)) if detail is not None else ()

    def steps_per_second(self) -> float | None:
        recent = list(self.history)[-RATE_WINDOW:]
        if len(recent) < 2 or recent[-1].time <= recent[0].time:
            return None
        return (recent[-1].step - recent[0].step) / (recent[-1].time - recent[0].time)


def same_layout(a: Hello, b: Hello) -> bool:
    return (a.world_size, a.sharded, a.layers, a.param_groups) == (
        b.world_size, b.sharded, b.layers, b.param_groups
    )
