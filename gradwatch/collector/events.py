"""What the registry tells its shell to act on: a run started, changed status, raised or
resolved an alert, needs an action sent, acknowledged one, was evicted, or lost a detector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from gradwatch.collector.detectors.base import AlertEvent
from gradwatch.protocol import Ack, Action

RunStatus = Literal["running", "degraded", "finished", "stopped", "crashed", "lost"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
ENDED_STATUSES = frozenset({"finished", "stopped", "crashed", "lost"})

@dataclass(frozen=True)
class RunStarted:
    run: str
    world_size: int
    sharded: bool
    actions: bool


@dataclass(frozen=True)
class StatusChanged:
    run: str
    old: RunStatus
    new: RunStatus
    reason: str


@dataclass(frozen=True)
class AlertRaised:
    run: str
    alert: AlertEvent


@dataclass(frozen=True)
class ActionIssued:
    run: str
    action: Action
    alert_kind: str


@dataclass(frozen=True)
class ActionAcked:
    run: str
    rank: int
    ack: Ack
    alert_kind: str


@dataclass(frozen=True)
class RunEvicted:
    run: str


@dataclass(frozen=True)
class DetectorFailed:
    run: str
    kind: str
    error: str
    traceback: str = ""  # formatted where it was raised: a detector bug must be findable from the log


Event = RunStarted | StatusChanged | AlertRaised | ActionIssued | ActionAcked | RunEvicted | DetectorFailed
