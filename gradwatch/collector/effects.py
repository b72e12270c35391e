"""What the registry's events do outside it: log lines, history rows, actions sent to a
run's connections, the run state saved to the data directory, and the marks on a run's page.

Each event's effect stands alone: an exception in one is logged with its traceback and
counted (gradwatch_collector_internal_errors_total{where="effect"}), and the next event
still has its effect. A failing disk is expected and only logged: ingest goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable

from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.connections import Peers
from gradwatch.collector.history import History, HistoryEntry, RunRecord
from gradwatch.collector.metrics import IngestStats
from gradwatch.collector.registry import (
    ENDED_STATUSES,
    ActionAcked,
    ActionIssued,
    AlertRaised,
    DetectorFailed,
    Event,
    Registry,
    RunEvicted,
    RunStarted,
    StatusChanged,
)
from gradwatch.collector.run_state import RunState
from gradwatch.collector.series import Marker, RunSeries
from gradwatch.collector.series_store import SeriesStore
from gradwatch.protocol import encode

log = logging.getLogger("gradwatch.collector")

ACTION_SEND_TIMEOUT = 2.0  # seconds an action may wait on one rank's connection


class Effects:
    """Applies events to the history and the connections. `previous_runs` are the runs a
    previous collector process left in the history and no probe has restarted yet."""

    def __init__(
        self,
        config: CollectorConfig,
        registry: Registry,
        history: History,
        peers: Peers,
        stats: IngestStats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.registry, self.history, self.peers, self.stats = config, registry, history, peers, stats
        self.clock = clock
        self.pages = SeriesStore(config.server.data_dir)
        self._previous_pages: dict[str, RunSeries | None] = {}  # read from the data dir when first shown
        self.previous_runs: dict[str, RunRecord] = {}
        records = history.load_runs()  # oldest first; keep as many as max_runs
        too_old = [r.name for r in records[: max(0, len(records) - config.retention.max_runs)]]
        self._store(lambda h: h.delete_runs(too_old), "run evictions")
        self.pages.delete(too_old)
        for record in records[len(too_old):]:
            # A run that was running when the previous process died is not known to be alive.
            status = "lost" if record.status in ("running", "degraded") else record.status
            self.previous_runs[record.name] = dataclasses.replace(record, status=status)

    async def apply(self, events: list[Event]) -> None:
        for event in events:
            try:
                await self._apply(event)
            except Exception:  # a bug of ours must not cost the other events their effects
                self.stats.internal_errors["effect"] += 1
                log.exception("the effect of %s on run %s failed", type(event).__name__, event.run)
        # After the whole batch: an ending run's open alerts resolve in events after its end.
        for name in [e.run for e in events if isinstance(e, StatusChanged) and e.new in ENDED_STATUSES]:
            self._save_page(name)

    def save_runs(self) -> None:
        """Save every run's progress (periodically and at shutdown)."""
        records = [run_record(r) for r in self.registry.runs.values()]
        self._store(lambda h: h.save_runs(records), "run state")

    def save_pages(self) -> None:
        """Save every run's page history (at shutdown; an ended run's is saved as it ends)."""
        for name in self.registry.runs:
            self._save_page(name)

    def page(self, name: str) -> RunSeries | None:
        """What a run's page draws: a run in memory, or one a previous process saved."""
        run = self.registry.runs.get(name)
        if run is not None:
            return run.series
        if name in self.previous_runs and name not in self._previous_pages:
            self._previous_pages[name] = self.pages.load(name)
        return self._previous_pages.get(name)

    async def _apply(self, event: Event) -> None:
        if isinstance(event, AlertRaised):
            self._on_alert(event)
        elif isinstance(event, ActionIssued):
            await self._send_action(event)
        elif isinstance(event, ActionAcked):
            self._on_ack(event)
        elif isinstance(event, RunStarted):
            log.info("run %s started (world_size=%d%s%s)", event.run, event.world_size,
                     ", sharded" if event.sharded else "", ", actions on" if event.actions else "")
            previous = self.previous_runs.pop(event.run, None)
            self._previous_pages.pop(event.run, None)
            if previous is not None and previous.status == "lost":
                self._resume_page(event.run)
            self._save_run(event.run)
        elif isinstance(event, StatusChanged):
            level = logging.WARNING if event.new in ("lost", "degraded", "crashed") else logging.INFO
            log.log(level, "run %s %s (was %s): %s", event.run, event.new, event.old, event.reason)
            self._save_run(event.run)
        elif isinstance(event, RunEvicted):
            log.info("run %s evicted (max_runs=%d)", event.run, self.config.retention.max_runs)
            self._store(lambda h, run=event.run: h.delete_runs([run]), "a run eviction")
            self.pages.delete([event.run])
        elif isinstance(event, DetectorFailed):
            self.stats.internal_errors["detector"] += 1
            log.error("detector %s failed on run %s and is disabled for it: %s\n%s", event.kind, event.run,
                      event.error, event.traceback.rstrip())

    def _on_alert(self, event: AlertRaised) -> None:
        alert = event.alert
        state = "resolved" if alert.resolved else "fired"
        entry = HistoryEntry(
            run=event.run, event=state, kind=alert.kind, severity=alert.severity, step=alert.step,
            layer=alert.layer, message=alert.message, time=self.clock(), hint=alert.hint,
        )
        self._record(entry, "an alert")
        where = f" layer {alert.layer}" if alert.layer else ""
        level = logging.INFO if alert.resolved or alert.severity == "info" else logging.WARNING
        hint = f"; try: {alert.hint}" if alert.hint else ""
        log.log(level, "alert %s %s: run %s step %d%s: %s%s", alert.kind, state, event.run, alert.step, where,
                alert.message, hint)

    async def _send_action(self, event: ActionIssued) -> None:
        action = event.action
        peers = self.peers.of(event.run)
        log.info("action %s for run %s at step %d (%s), to %d rank(s)", action.kind, event.run, action.step,
                 event.alert_kind, len(peers))
        entry = HistoryEntry(
            run=event.run, event="action", kind=event.alert_kind, severity="info", step=action.step, layer=None,
            message=f"{action.kind} {json.dumps(action.params)} at step {action.step}: {action.reason}",
            time=self.clock(), action=action.kind, action_id=action.id, outcome="sent",
        )
        self._record(entry, "an action")
        frame = encode(action)
        # Bounded: a probe that stopped reading must not hold up the other runs (this can
        # run inside the periodic tick that finds lost runs).
        results = await asyncio.gather(
            *(asyncio.wait_for(p.ws.send(frame), ACTION_SEND_TIMEOUT) for p in peers), return_exceptions=True
        )
        for peer, result in zip(peers, results):
            if isinstance(result, BaseException):  # that rank is reconnecting or stuck; it will be lost or catch up
                log.warning("could not send action %s to run %s rank %d: %s", action.id, event.run,
                            peer.hello.rank, result)

    def _on_ack(self, event: ActionAcked) -> None:
        ack = event.ack
        why = f": {ack.reason}" if ack.reason else ""
        entry = HistoryEntry(
            run=event.run, event="ack", kind=event.alert_kind, severity="info", step=ack.step, layer=None,
            message=f"{ack.kind} {ack.outcome} by rank {event.rank}{why}", time=self.clock(),
            action=ack.kind, action_id=ack.id, outcome=ack.outcome, rank=event.rank,
        )
        self._record(entry, "an ack")
        log.info("action %s %s by run %s rank %d at step %d%s", ack.kind, ack.outcome, event.run, event.rank,
                 ack.step, why)

    def _record(self, entry: HistoryEntry, what: str) -> None:
        """An alert, action or ack: a row of the history and a mark on the run's page."""
        self._store(lambda h: h.record(entry), what)
        run = self.registry.runs.get(entry.run)
        if run is not None:
            run.series.mark(Marker(
                step=entry.step or 0, event=entry.event, kind=entry.kind, severity=entry.severity,
                message=entry.message, hint=entry.hint, layer=entry.layer, action=entry.action,
                outcome=entry.outcome, time=entry.time,
            ))

    def _resume_page(self, name: str) -> None:
        """A run the previous process lost while it ran, reconnecting: its page goes on
        from what was saved (steps it has already are not taken twice)."""
        run, saved = self.registry.runs.get(name), self.pages.load(name)
        if run is not None and saved is not None and run.series.version == 0:
            run.series = saved

    def _save_page(self, name: str) -> None:
        run = self.registry.runs.get(name)
        if run is None:
            return
        try:
            self.pages.save(name, run.series)
        except (OSError, ValueError) as err:  # a failing disk; ValueError: a bug of ours, not worth ingest
            log.error("could not save the page history of run %s to %s: %s", name, self.pages.path, err)

    def _save_run(self, name: str) -> None:
        run = self.registry.runs.get(name)
        if run is not None:
            record = run_record(run)
            self._store(lambda h: h.save_runs([record]), "run state")

    def _store(self, write: Callable[[History], object], what: str) -> None:
        """Write to the history; a failing disk is logged, and ingest goes on."""
        try:
            write(self.history)
        except sqlite3.Error as err:
            log.error("could not write %s to %s: %s", what, self.history.path, err)


def run_record(run: RunState) -> RunRecord:
    """What the history keeps of a run, and /api/runs lists."""
    # `started`: when training started by the probe's clock, if it said so (a run that
    # reconnects after a collector restart keeps its real start).
    started = run.hello.started if math.isfinite(run.hello.started) and run.hello.started > 0 else run.started
    return RunRecord(run.name, run.status, started, run.last_seen, max(run.last_merged_step, 0),
                     run.hello.world_size)
