"""The run registry: the collector's sans-I/O core.

Protocol messages and the current time go in; events (run started, status changed, alert,
action to send, ack) come out, for the I/O shell to log, store and send. Nothing here
touches a socket, a file or the clock.

Merging ranks: a step is merged once every rank that is still reporting has reached it
(its highest step is >= it), or once it has waited `rank_wait_seconds` for the others (a
straggler's late record for a merged step is then ignored). A rank lost (silent for
`heartbeat_timeout`) or finished no longer holds merging back. How records merge:
`merge.py`; the events: `events.py`; the state of a run: `run_state.py`.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gradwatch.collector.actions import ActionPlanner, lead_steps
from gradwatch.collector.config import RetentionConfig
from gradwatch.collector.detectors.base import (
    AlertEvent,
    Detector,
    Severity,
)
from gradwatch.collector.detectors.runbook import hint
from gradwatch.collector.events import (
    ENDED_STATUSES,
    RUN_STATUSES,
    ActionAcked,
    ActionIssued,
    AlertRaised,
    DetectorFailed,
    Event,
    RunEvicted,
    RunStarted,
    RunStatus,
    StatusChanged,
)
from gradwatch.collector.merge import MergedStep, is_nonfinite, merge_step
from gradwatch.collector.run_state import RankState, RunState, same_layout
from gradwatch.protocol import (
    CLOSE_POLICY,
    Ack,
    Action,
    Bye,
    Hello,
    Landscape,
    LRFind,
    ProtocolError,
    Steps,
    Welcome,
)

MAX_PENDING_STEPS = 10_000  # unmerged steps per run, whatever the stragglers: bounds memory


@dataclass(frozen=True)
class Joined:
    """The answer to a hello: the welcome, the actions to send right after it, and events."""

    welcome: Welcome
    actions: list[Action]
    events: list[Event]


class Registry:
    """All runs the collector knows, keyed by name."""

    def __init__(
        self,
        retention: RetentionConfig,
        detectors: Callable[[], list[Detector]],
        planner: ActionPlanner | None = None,
    ) -> None:
        self.retention = retention
        self._new_detectors = detectors
        self.planner = planner or ActionPlanner({})
        self.runs: dict[str, RunState] = {}
        self.evicted_total = 0
        self.http_url = ""  # told to every probe in its welcome; the server sets it once bound

    # --- messages ------------------------------------------------------------------------

    def hello(self, hello: Hello, now: float) -> Joined:
        """A probe connected as (hello.run, hello.rank). Raises ProtocolError when the run
        cannot be joined (another layout while it is running, rank out of range, full)."""
        if hello.rank >= hello.world_size:
            raise ProtocolError(CLOSE_POLICY, f"rank {hello.rank} is not below world_size {hello.world_size}")
        events: list[Event] = []
        run = self.runs.get(hello.run)
        if run is not None and not self._can_rejoin(run, hello):
            if not run.ended:
                raise ProtocolError(
                    CLOSE_POLICY,
                    f"run {hello.run!r} is running with another layout (world_size, sharded, layers);"
                    " use another run name",
                )
            run = None  # an ended run's name is reused by a new training: start afresh
        if run is None:
            events += self._make_room(hello.run)
            run = self._new_run(hello, now)
            events.append(RunStarted(run.name, hello.world_size, hello.sharded, hello.actions))
        rank = run.ranks.setdefault(hello.rank, RankState(last_seen=now))
        rank.connected, rank.bye, rank.lost, rank.last_seen = True, None, False, now
        run.last_seen = now
        events += self._update_status(run, now)
        with_actions = hello.actions and self.planner.enabled
        welcome = Welcome(run=run.name, actions=with_actions, http_url=self.http_url)
        if not with_actions:
            return Joined(welcome, [], events)
        actions, broadcast = self._arm(run)
        return Joined(welcome, actions, events + broadcast)

    def _arm(self, run: RunState) -> tuple[list[Action], list[Event]]:
        """The skip guards' arming: (actions for the joining connection, events for all ranks).
        A single process is armed at once. The ranks of a distributed run must arm at the same
        step, since each judges every step on its own and they must skip the same ones: they
        are armed together, once all have joined, at a step ahead like any action. A rank that
        joins again gets the same arming (applying it twice changes nothing)."""
        state, world_size = run.action_state, run.hello.world_size
        if state.arming is not None:
            return list(state.arming), []
        if world_size > 1 and sum(r.connected for r in run.ranks.values()) < world_size:
            return [], []
        step = 0 if world_size == 1 else run.highest_step + lead_steps(run.steps_per_second(), world_size)
        state.arming = self.planner.arming(state, step)
        for action in state.arming:
            run.actions_total[(action.kind, "armed")] += 1
        if world_size == 1:
            return list(state.arming), []
        return [], [ActionIssued(run.name, action, str(action.params["on"])) for action in state.arming]

    def steps(self, run_name: str, rank: int, message: Steps, now: float) -> list[Event]:
        run, state = self._touch(run_name, rank, now)
        state.dropped += message.dropped
        for record in message.records:
            if record.step <= run.last_merged_step:
                continue  # replayed after a reconnect: already merged
            state.max_step = max(state.max_step, record.step)
            if record.step_time is not None:
                state.step_time = record.step_time
            if record.step not in run.pending:
                run.pending[record.step] = {}
                run.pending_since[record.step] = now
            run.pending[record.step][rank] = record
        return self._update_status(run, now) + self._merge_ready(run, now)

    def heartbeat(self, run_name: str, rank: int, now: float) -> list[Event]:
        run, _ = self._touch(run_name, rank, now)
        return self._update_status(run, now)

    def ack(self, run_name: str, rank: int, ack: Ack, now: float) -> list[Event]:
        run, _ = self._touch(run_name, rank, now)
        _, alert_kind = run.action_state.sent.get(ack.id, (ack.kind, "unknown"))
        run.actions_total[(ack.kind, ack.outcome)] += 1
        return self._update_status(run, now) + [ActionAcked(run.name, rank, ack, alert_kind)]

    def result(self, run_name: str, rank: int, message: LRFind | Landscape, now: float) -> list[Event]:
        """An LR range test's verdict or a landscape grid: kept with the run's page."""
        run, _ = self._touch(run_name, rank, now)
        run.series.keep(message)
        return self._update_status(run, now)

    def bye(self, run_name: str, rank: int, bye: Bye, now: float) -> list[Event]:
        run, state = self._touch(run_name, rank, now)
        state.bye = bye
        state.dropped = max(state.dropped, bye.dropped)
        return self._merge_ready(run, now) + self._update_status(run, now)

    def disconnect(self, run_name: str, rank: int) -> None:
        """The connection closed. Without a bye, the rank may be reconnecting: it is only
        declared lost by `tick` after `heartbeat_timeout` of silence."""
        run = self.runs.get(run_name)
        if run is not None and rank in run.ranks:
            run.ranks[rank].connected = False

    def tick(self, now: float) -> list[Event]:
        """Called periodically: heartbeat timeouts (rank lost, run lost)."""
        events: list[Event] = []
        for run in list(self.runs.values()):
            if run.status in ("finished", "stopped", "crashed"):
                continue
            events += self._update_status(run, now)
            events += self._merge_ready(run, now)
        return events

    # --- queries ---------------------------------------------------------------------------

    def visible_runs(self, now: float, grace: float) -> Iterable[RunState]:
        """Runs whose series belong on /metrics: not ended, or ended less than `grace` ago."""
        return (r for r in self.runs.values() if r.ended_at is None or now - r.ended_at < grace)

    def status_counts(self) -> Mapping[str, int]:
        counts = Counter(r.status for r in self.runs.values())
        return {s: counts.get(s, 0) for s in RUN_STATUSES}

    # --- internals -------------------------------------------------------------------------

    def _can_rejoin(self, run: RunState, hello: Hello) -> bool:
        if not same_layout(run.hello, hello):
            return False
        # A finished run whose name comes back is a new training; a lost one is the same
        # training reconnecting after a long outage (or the collector's own restart).
        return run.status not in ("finished", "stopped", "crashed")

    def _new_run(self, hello: Hello, now: float) -> RunState:
        run = RunState(
            name=hello.run,
            hello=hello,
            started=now,
            last_seen=now,
            # An LR range test drives the LR up until the loss explodes, on purpose: its page
            # shows the curve, and no detector judges it.
            detectors=[] if hello.tags.get("kind") == "lr-find" else self._new_detectors(),
            history=deque(maxlen=self.retention.history_steps),
            layers=tuple(hello.layers),
        )
        self.runs[run.name] = run
        return run

    def _make_room(self, incoming: str) -> list[Event]:
        self.runs.pop(incoming, None)
        if len(self.runs) < self.retention.max_runs:
            return []
        ended = [r for r in self.runs.values() if r.ended]
        if not ended:
            raise ProtocolError(
                CLOSE_POLICY,
                f"the collector already tracks max_runs={self.retention.max_runs} running runs",
            )
        oldest = min(ended, key=lambda r: r.ended_at or r.last_seen)
        del self.runs[oldest.name]
        self.evicted_total += 1
        return [RunEvicted(oldest.name)]

    def _touch(self, run_name: str, rank: int, now: float) -> tuple[RunState, RankState]:
        run = self.runs[run_name]
        state = run.ranks[rank]
        state.last_seen = run.last_seen = now
        state.lost = False
        return run, state

    def _update_status(self, run: RunState, now: float) -> list[Event]:
        events: list[Event] = []
        timeout = self.retention.heartbeat_timeout
        for state in run.ranks.values():
            if state.bye is None and not state.lost and now - state.last_seen > timeout:
                state.lost = True
        # Ranks that never said hello are only tracked as a count (world_size may be huge).
        missing = run.hello.world_size - len(run.ranks)
        run.missing_ranks_lost = missing > 0 and now - run.started > timeout
        byes = [s.bye for s in run.ranks.values() if s.bye is not None]
        lost = sorted(r for r, s in run.ranks.items() if s.lost)
        if len(byes) == len(run.ranks) and (missing == 0 or run.missing_ranks_lost):
            statuses = {b.status for b in byes}
            new: RunStatus = "crashed" if "crashed" in statuses else "stopped" if "stopped" in statuses else "finished"
            reason = "; ".join(b.reason for b in byes if b.reason) or "all ranks said bye"
        elif not any(s.reporting for s in run.ranks.values()) and (missing == 0 or run.missing_ranks_lost):
            new, reason = "lost", f"no message for {timeout:g} s (heartbeat timeout)"
        elif lost or run.missing_ranks_lost:
            gone = [*map(str, lost)] + ([f"{missing} that never connected"] if run.missing_ranks_lost else [])
            new, reason = "degraded", f"rank(s) {', '.join(gone)} stopped reporting"
        else:
            new, reason = "running", "reporting"
        events += self._set_alert(
            run, "run_lost", None, new == "lost", "critical", f"run {run.name} stopped reporting: {reason}"
        )
        degraded = new == "degraded"
        for rank in run.ranks:
            events += self._set_alert(
                run, "rank_lost", f"rank{rank}", degraded and rank in lost, "warning",
                f"rank {rank} of {run.name} sent nothing for {timeout:g} s",
            )
        events += self._set_alert(
            run, "rank_lost", "missing", degraded and run.missing_ranks_lost, "warning",
            f"{missing} of {run.hello.world_size} ranks of {run.name} never connected",
        )
        if new != run.status:
            events.append(StatusChanged(run.name, run.status, new, reason))
            run.status = new
            run.ended_at = now if new in ENDED_STATUSES else None
            if new in ENDED_STATUSES:
                events += self._resolve_open_alerts(run, new)
        return events

    def _resolve_open_alerts(self, run: RunState, status: RunStatus) -> list[Event]:
        """An ended run's conditions end with it: its open alerts resolve, saying why, so that
        Prometheus and Alertmanager stop firing for a run that no longer trains. A lost
        run's `run_lost` stays: it is the alert for that end."""
        events: list[Event] = []
        step = max(run.last_merged_step, 0)
        for (kind, key), alert in list(run.active_alerts.items()):
            if kind == "run_lost":
                continue
            ended = dataclasses.replace(alert, step=step, message=f"resolved: run {status}", resolved=True, hint="")
            events += self._record_alert(run, ended, key)
        return events

    def _set_alert(
        self, run: RunState, kind: str, key: str | None, active: bool, severity: Severity, message: str
    ) -> list[Event]:
        """Lifecycle alerts (run_lost, rank_lost), with the same fire-once/resolve-once
        hysteresis the detectors have."""
        was_active = (kind, key) in run.active_alerts
        if active == was_active:
            return []
        step = max(run.last_merged_step, 0)
        if active:
            event = AlertEvent(kind, severity, step, message, hint=hint(kind))
        else:
            message = f"reporting again at step {step}"
            event = AlertEvent(kind, severity, step, message, resolved=True)
        return self._record_alert(run, event, key)

    def _record_alert(self, run: RunState, event: AlertEvent, key: str | None) -> list[Event]:
        events: list[Event] = [AlertRaised(run.name, event)]
        if event.resolved:
            run.active_alerts.pop((event.kind, key), None)
            return events
        run.active_alerts[(event.kind, key)] = event
        run.alerts_total[event.kind] += 1
        if run.hello.actions:
            for action in self.planner.on_alert(
                run.action_state, event, run.highest_step, run.steps_per_second(), run.hello.world_size
            ):
                run.actions_total[(action.kind, "sent")] += 1
                events.append(ActionIssued(run.name, action, event.kind))
        return events

    def _merge_ready(self, run: RunState, now: float) -> list[Event]:
        if not run.pending:
            return []
        progress = [s.max_step for s in run.ranks.values() if s.reporting]
        if len(run.ranks) < run.hello.world_size and not run.missing_ranks_lost:
            progress.append(-1)  # ranks that have not connected yet hold merging back too
        watermark = min(progress, default=math.inf)
        events: list[Event] = []
        for step in sorted(run.pending):
            waited = now - run.pending_since[step] >= self.retention.rank_wait_seconds
            if step > watermark and not waited and len(run.pending) <= MAX_PENDING_STEPS:
                break
            del run.pending_since[step]
            merged = merge_step(step, run.pending.pop(step), run.hello.sharded, run.layers)
            events += self._observe(run, merged)
        return events

    def _observe(self, run: RunState, merged: MergedStep) -> list[Event]:
        obs = merged.observation
        run.last_merged_step = obs.step
        run.latest.update(merged)
        run.steps_total += 1
        run.skipped_steps_total += obs.skipped
        run.nonfinite_steps_total += is_nonfinite(obs)
        run.series.observe(obs)
        if obs.layer_grad_norm is not None:
            run.latest_layer_detail = obs
            obs_for_history = dataclasses.replace(
                obs, layer_grad_norm=None, layer_weight_norm=None, layer_update_ratio=None, layer_frozen=frozenset()
            )
        else:
            obs_for_history = obs
        # The ring buffer keeps whole-run values only: per-layer detail of thousands of
        # layers times thousands of steps would not be bounded in any useful sense.
        run.history.append(obs_for_history)
        events: list[Event] = []
        for detector in list(run.detectors):
            try:
                alerts = detector.observe(obs)
            except Exception as err:  # noqa: BLE001 - a detector bug must not take ingest down
                run.detectors.remove(detector)
                events.append(DetectorFailed(run.name, detector.kind, f"{type(err).__name__}: {err}",
                                             traceback.format_exc()))
                continue
            for alert in alerts:
                events += self._record_alert(run, alert, alert.layer)
        return events
