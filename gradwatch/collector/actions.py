"""The actions policy, collector side: which `Action` answers which alert, and when.

Pure: the planner reads the run's progress and returns protocol messages; the server sends
them to every rank's connection of that run. An action names the step at which it applies,
far enough ahead (about one second of training, at least two steps) that every rank
receives it before reaching that step, so all ranks apply it at the same step.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gradwatch.collector.config import ActionPolicy, SkipStep, action_params
from gradwatch.collector.detectors.base import AlertEvent
from gradwatch.protocol import Action

MIN_LEAD_STEPS = 2
LEAD_SECONDS = 1.0


@dataclass
class RunActionState:
    """What the planner remembers per run: when each action kind was last sent, and what was
    sent under which id (so that an Ack can be traced back to the alert that caused it)."""

    last_sent_step: dict[str, int] = field(default_factory=dict)
    sent: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (action kind, alert kind)
    arming: list[Action] | None = None  # the skip_step guards armed, once made

    def remember(self, action: Action, alert_kind: str) -> None:
        if len(self.sent) >= 1024:  # bounded: forget the oldest
            self.sent.pop(next(iter(self.sent)))
        self.sent[action.id] = (action.kind, alert_kind)


def lead_steps(steps_per_second: float | None, world_size: int) -> int:
    """Steps between the highest step seen and the one an action applies at. A single
    process applies it at its next step boundary; ranks of a distributed run need time
    for the action to reach all of them before that step."""
    if world_size == 1:
        return 1
    if steps_per_second is None or not math.isfinite(steps_per_second):
        return MIN_LEAD_STEPS
    return max(MIN_LEAD_STEPS, math.ceil(steps_per_second * LEAD_SECONDS))


class ActionPlanner:
    def __init__(self, policy: Mapping[str, Sequence[ActionPolicy]]) -> None:
        self.policy = policy

    @property
    def enabled(self) -> bool:
        return any(self.policy.values())

    def arming(self, state: RunActionState, step: int = 0) -> list[Action]:
        """One `skip_step` per alert kind the policy maps to it, arming the probe's local guard
        (a skip must happen in the same step, with no round trip) at `step` (0: at once)."""
        actions = []
        for alert_kind, policies in self.policy.items():
            if any(isinstance(p, SkipStep) for p in policies):
                action = Action(
                    id=_new_id(), kind="skip_step", step=step, params={"on": alert_kind},
                    reason=f"arm the skip-step guard for {alert_kind}",
                )
                state.remember(action, alert_kind)
                actions.append(action)
        return actions

    def on_alert(
        self,
        state: RunActionState,
        event: AlertEvent,
        highest_step: int,
        steps_per_second: float | None,
        world_size: int = 1,
    ) -> list[Action]:
        """The actions answering a newly fired alert, each outside its cooldown."""
        if event.resolved:
            return []
        actions = []
        for policy in self.policy.get(event.kind, ()):
            if isinstance(policy, SkipStep):
                continue  # already armed in the probe
            last = state.last_sent_step.get(policy.action)
            if last is not None and event.step - last < policy.cooldown:
                continue
            action = Action(
                id=_new_id(),
                kind=policy.action,
                step=max(highest_step, event.step) + lead_steps(steps_per_second, world_size),
                params=action_params(policy),
                reason=f"{event.kind} at step {event.step}: {event.message}"[:500],
            )
            state.last_sent_step[policy.action] = event.step
            state.remember(action, event.kind)
            actions.append(action)
        return actions


def _new_id() -> str:
    return uuid.uuid4().hex[:16]
