"""The collector process: websocket ingest and HTTP endpoints around the pure registry.

One asyncio loop runs everything: the websockets server (probes), the aiohttp app
(/metrics, /healthz, /api/*), and a periodic tick (heartbeat timeouts). Registry calls are
synchronous and short; their events are logged, stored in the history and, for actions,
sent to every connection of the run.

A connection is refused with a websocket close code and a reason text that says what was
wrong (see gradwatch.protocol); each refusal is logged once and counted by reason. Nothing a
connection sends can affect another connection or another run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import re
import shutil
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gradwatch.collector.actions import ActionPlanner
from gradwatch.collector.config import CollectorConfig, ConfigError
from gradwatch.collector.detectors import build_detectors
from gradwatch.collector.detectors.base import Detector
from gradwatch.collector.history import History, HistoryEntry, RunRecord
from gradwatch.collector.metrics import (
    IngestStats,
    MetricsCollector,
    exposition_chunks,
)
from gradwatch.collector.registry import (
    RUN_STATUSES,
    ActionAcked,
    ActionIssued,
    AlertRaised,
    DetectorFailed,
    Event,
    Registry,
    Run,
    RunEvicted,
    RunStarted,
    StatusChanged,
)
from gradwatch.protocol import (
    CLOSE_INVALID_MESSAGE,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_VERSION,
    PROTOCOL_VERSION,
    RUN_NAME_PATTERN,
    Ack,
    Bye,
    Heartbeat,
    Hello,
    ProtocolError,
    Received,
    Steps,
    check_version,
    decode_probe_message,
    encode,
)

log = logging.getLogger("gradwatch.collector")

ACTION_SEND_TIMEOUT = 2.0  # seconds an action may wait on one rank's connection
RUN_STATE_SAVE_SECONDS = 10.0  # how often running runs' progress is written to the data dir
RENDER_SLICE_SECONDS = 0.02  # /metrics formatting yields to ingest this often
_REASON_BY_CODE = {
    CLOSE_INVALID_MESSAGE: "invalid_message",
    CLOSE_UNSUPPORTED_VERSION: "unsupported_version",
    CLOSE_TOO_BIG: "too_big",
}


class _MalformedHttpRequests(logging.Filter):
    """aiohttp logs a request its parser refuses (bad bytes, a request line over 8190 bytes;
    already answered 400) as an ERROR with a traceback: anyone who reaches the HTTP port
    could fill the log with them. Log one WARNING line instead, like refused probes."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, BadHttpMessage):
            record.msg, record.args = "refused a malformed HTTP request (400): %s", (type(err).__name__,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_MALFORMED_HTTP = _MalformedHttpRequests()


class Refused(Exception):
    """Close this connection with `code` and `reason`; counted under `label`."""

    def __init__(self, code: int, label: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.label, self.reason = code, label, reason

    @classmethod
    def from_protocol(cls, err: ProtocolError, label: str | None = None) -> Refused:
        return cls(err.code, label or _REASON_BY_CODE.get(err.code, "invalid_message"), err.reason)


class RateLimit:
    """Token bucket: `rate` messages per second, bursts of up to twice that."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate, self.capacity = rate, 2 * rate
        self.tokens, self.updated = self.capacity, now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(eq=False)
class Peer:
    """One probe connection, bound to (run, rank) by its hello."""

    ws: ServerConnection
    hello: Hello
    run: Run
    limit: RateLimit = field(repr=False)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class CollectorServer:
    def __init__(
        self,
        config: CollectorConfig,
        detectors: Callable[[], list[Detector]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.stats = IngestStats()
        self.registry = Registry(
            config.retention,
            detectors or (lambda: build_detectors(config.detectors)),
            ActionPlanner(config.actions),
        )
        self.metrics = MetricsCollector(self.registry, self.stats, config, clock)
        self.history: History | None = None
        self.previous_runs: dict[str, RunRecord] = {}  # runs a previous collector process knew
        self._peers: dict[str, dict[int, Peer]] = {}
        self._ws_server: Server | None = None
        self._http_runner: web.AppRunner | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.ws_url = ""
        self.http_url = ""

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the history and bind both ports. Raises HistoryError, ConfigError (TLS files)
        or OSError (a port in use)."""
        cfg = self.config.server
        self.history = History(cfg.data_dir)
        records = self.history.load_runs()  # oldest first; keep as many as max_runs
        too_old = [r.name for r in records[: max(0, len(records) - self.config.retention.max_runs)]]
        self._store(lambda h: h.delete_runs(too_old), "run evictions")
        for record in records[len(too_old):]:
            # A run that was running when the previous process died is not known to be alive.
            status = "lost" if record.status in ("running", "degraded") else record.status
            self.previous_runs[record.name] = dataclasses.replace(record, status=status)
        tls = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"cannot load tls_cert/tls_key: {err}") from None
        self._ws_server = await serve(
            self._serve_connection,
            cfg.host,
            cfg.port,
            max_size=cfg.max_frame_bytes,
            # Frames are handled as they arrive; a short queue bounds memory per connection
            # (max_queue x max_frame_bytes) when hundreds of probes connect.
            max_queue=4,
            # No keepalive pings: under load a pong waits behind unread frames and the ping
            # timeout would drop every connection at once. A silent probe is found by the
            # registry's heartbeat timeout instead (probes send heartbeats when idle).
            ping_interval=None,
            process_request=self._check_token,
            ssl=tls,
            server_header="gradwatch",
        )
        ws_port = self._ws_server.sockets[0].getsockname()[1]
        http_sock = socket.create_server((cfg.host, cfg.http_port), reuse_port=False)
        logging.getLogger("aiohttp.server").addFilter(_MALFORMED_HTTP)
        self._http_runner = web.AppRunner(self._http_app(), access_log=None)
        await self._http_runner.setup()
        await web.SockSite(self._http_runner, http_sock).start()
        http_port = http_sock.getsockname()[1]
        self.ws_url = f"{'wss' if tls else 'ws'}://{url_host(cfg.host)}:{ws_port}"
        self.http_url = f"http://{url_host(cfg.host)}:{http_port}"
        self._tick_task = asyncio.create_task(self._tick_forever())
        log.info("gradwatch collector listening %s %s", self.ws_url, self.http_url)

    async def close(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self._ws_server is not None:
            self._ws_server.close()  # closes probe connections with 1001 (going away)
            await self._ws_server.wait_closed()
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        if self.history is not None:
            self._save_runs()
            self.history.close()
            self.history = None

    async def _tick_forever(self) -> None:
        interval = min(1.0, self.config.retention.heartbeat_timeout / 4)
        last_save = self.clock()
        while True:
            await asyncio.sleep(interval)
            try:
                await self._handle(self.registry.tick(self.clock()))
                if self.clock() - last_save >= RUN_STATE_SAVE_SECONDS:
                    self._save_runs()
                    last_save = self.clock()
            except Exception:  # the tick must outlive any one bad event
                log.exception("collector tick failed")

    # --- websocket ingest ----------------------------------------------------------------------

    def _check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        token = self.config.server.token
        if token is None:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        self.stats.rejected["unauthorized"] += 1
        log.warning("refused connection from %s: missing or wrong token", _address(connection))
        return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")

    async def _serve_connection(self, ws: ServerConnection) -> None:
        self.stats.connections += 1
        peer: Peer | None = None
        try:
            peer = await self._greet(ws)
            async for frame in ws:
                if not peer.limit.allow(time.monotonic()):
                    rate = self.config.server.max_messages_per_second
                    raise Refused(CLOSE_POLICY, "rate_limited", f"rate limit exceeded: over {rate:g} messages/s")
                await self._dispatch(peer, decode_probe_message(frame))
        except Refused as refusal:
            await self._refuse(ws, refusal, peer)
        except ProtocolError as err:
            await self._refuse(ws, Refused.from_protocol(err), peer)
        except ConnectionClosed as closed:
            # websockets enforces max_size itself and closes with 1009; count and log it here.
            if closed.sent is not None and closed.sent.code == CLOSE_TOO_BIG:
                self._count_refusal(ws, Refused(CLOSE_TOO_BIG, "too_big", closed.sent.reason), peer)
        finally:
            self.stats.connections -= 1
            if peer is not None:
                self._forget(peer)

    async def _greet(self, ws: ServerConnection) -> Peer:
        timeout = self.config.retention.heartbeat_timeout
        try:
            async with asyncio.timeout(timeout):
                frame = await ws.recv()
        except TimeoutError:
            raise Refused(CLOSE_POLICY, "no_hello", f"no hello within {timeout:g} s") from None
        try:
            message = decode_probe_message(frame)
        except ProtocolError:
            _refuse_other_version(frame)
            raise
        if not isinstance(message, Hello):
            raise Refused(CLOSE_POLICY, "no_hello", f"the first message must be a hello, not {message.type}")
        check_version(message)
        try:
            joined = self.registry.hello(message, self.clock())
        except ProtocolError as err:
            raise Refused.from_protocol(err, "run_refused") from None
        self.stats.messages["hello"] += 1
        run = self.registry.runs[message.run]
        peer = Peer(ws, message, run, RateLimit(self.config.server.max_messages_per_second, time.monotonic()))
        previous = self._peers.setdefault(message.run, {}).get(message.rank)
        self._peers[message.run][message.rank] = peer
        if previous is not None:
            # A probe reconnecting before its old connection was noticed dead.
            closing = asyncio.create_task(previous.ws.close(CLOSE_POLICY, "superseded by a newer connection"))
            self._closing.add(closing)  # keep a reference until it is done
            closing.add_done_callback(self._closing.discard)
        await ws.send(encode(joined.welcome))
        for action in joined.actions:
            await ws.send(encode(action))
        await self._handle(joined.events)
        return peer

    async def _dispatch(self, peer: Peer, message: Hello | Steps | Heartbeat | Ack | Bye) -> None:
        if self.registry.runs.get(peer.hello.run) is not peer.run:
            raise Refused(CLOSE_POLICY, "run_refused", f"run {peer.hello.run!r} was restarted or evicted")
        now = self.clock()
        name, rank = peer.hello.run, peer.hello.rank
        if isinstance(message, Hello):
            raise Refused(CLOSE_POLICY, "no_hello", "hello sent twice on one connection")
        if isinstance(message, Steps):
            if message.records:
                self.stats.ingest_lag_seconds = now - max(r.time for r in message.records)
            events = self.registry.steps(name, rank, message, now)
        elif isinstance(message, Heartbeat):
            events = self.registry.heartbeat(name, rank, now)
        elif isinstance(message, Ack):
            events = self.registry.ack(name, rank, message, now)
        else:
            events = self.registry.bye(name, rank, message, now)
        self.stats.messages[message.type] += 1
        await self._handle(events)
        if isinstance(message, Steps) and message.records:
            # Only now (alerts written to history) may the probe forget these records. A
            # probe that already closed must not cut short the frames it sent before (a bye).
            with contextlib.suppress(ConnectionClosed):
                await peer.ws.send(encode(Received(step=max(r.step for r in message.records))))

    async def _refuse(self, ws: ServerConnection, refusal: Refused, peer: Peer | None) -> None:
        self._count_refusal(ws, refusal, peer)
        # A close frame's reason must fit in 123 bytes of UTF-8.
        closing = asyncio.create_task(ws.close(refusal.code, refusal.reason.encode()[:123].decode(errors="ignore")))
        # Discard what the peer sent before it saw our close frame: with the incoming queue
        # full, websockets stops reading and would never see the peer's close reply.
        try:
            async for _ in ws:
                pass
        except ConnectionClosed:
            pass
        await closing

    def _count_refusal(self, ws: ServerConnection, refusal: Refused, peer: Peer | None) -> None:
        self.stats.rejected[refusal.label] += 1
        who = f"run {peer.hello.run} rank {peer.hello.rank}" if peer else "a new connection"
        log.warning("closed %s from %s (%d, %s): %s", who, _address(ws), refusal.code, refusal.label, refusal.reason)

    def _forget(self, peer: Peer) -> None:
        peers = self._peers.get(peer.hello.run, {})
        if peers.get(peer.hello.rank) is peer:
            del peers[peer.hello.rank]
            if not peers:
                del self._peers[peer.hello.run]
            if self.registry.runs.get(peer.hello.run) is peer.run:
                self.registry.disconnect(peer.hello.run, peer.hello.rank)

    # --- registry events -------------------------------------------------------------------------

    async def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, AlertRaised):
                self._on_alert(event)
            elif isinstance(event, ActionIssued):
                await self._send_action(event)
            elif isinstance(event, ActionAcked):
                self._on_ack(event)
            elif isinstance(event, RunStarted):
                log.info("run %s started (world_size=%d%s%s)", event.run, event.world_size,
                         ", sharded" if event.sharded else "", ", actions on" if event.actions else "")
                self.previous_runs.pop(event.run, None)
                self._save_run(event.run)
            elif isinstance(event, StatusChanged):
                level = logging.WARNING if event.new in ("lost", "degraded", "crashed") else logging.INFO
                log.log(level, "run %s %s (was %s): %s", event.run, event.new, event.old, event.reason)
                self._save_run(event.run)
            elif isinstance(event, RunEvicted):
                log.info("run %s evicted (max_runs=%d)", event.run, self.config.retention.max_runs)
                self._store(lambda h, run=event.run: h.delete_runs([run]), "a run eviction")
            elif isinstance(event, DetectorFailed):
                log.error("detector %s failed on run %s and is disabled for it: %s", event.kind, event.run, event.error)

    def _on_alert(self, event: AlertRaised) -> None:
        alert = event.alert
        state = "resolved" if alert.resolved else "fired"
        entry = HistoryEntry(
            run=event.run, event=state, kind=alert.kind, severity=alert.severity, step=alert.step,
            layer=alert.layer, message=alert.message, time=self.clock(), hint=alert.hint,
        )
        self._store(lambda h: h.record(entry), "an alert")
        where = f" layer {alert.layer}" if alert.layer else ""
        level = logging.INFO if alert.resolved or alert.severity == "info" else logging.WARNING
        hint = f"; try: {alert.hint}" if alert.hint else ""
        log.log(level, "alert %s %s: run %s step %d%s: %s%s", alert.kind, state, event.run, alert.step, where,
                alert.message, hint)

    async def _send_action(self, event: ActionIssued) -> None:
        action = event.action
        peers = list(self._peers.get(event.run, {}).values())
        log.info("action %s for run %s at step %d (%s), to %d rank(s)", action.kind, event.run, action.step,
                 event.alert_kind, len(peers))
        entry = HistoryEntry(
            run=event.run, event="action", kind=event.alert_kind, severity="info", step=action.step, layer=None,
            message=f"{action.kind} {json.dumps(action.params)} at step {action.step}: {action.reason}",
            time=self.clock(), action=action.kind, action_id=action.id, outcome="sent",
        )
        self._store(lambda h: h.record(entry), "an action")
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
        self._store(lambda h: h.record(entry), "an ack")
        log.info("action %s %s by run %s rank %d at step %d%s", ack.kind, ack.outcome, event.run, event.rank,
                 ack.step, why)

    def _store(self, write: Callable[[History], object], what: str) -> None:
        """Write to the history; a failing disk is logged, and ingest goes on."""
        assert self.history is not None, "CollectorServer.start() opens the history"
        try:
            write(self.history)
        except sqlite3.Error as err:
            log.error("could not write %s to %s: %s", what, self.history.path, err)

    def _run_record(self, run: Run) -> RunRecord:
        # `started`: when training started by the probe's clock, if it said so (a run that
        # reconnects after a collector restart keeps its real start).
        started = run.hello.started if math.isfinite(run.hello.started) and run.hello.started > 0 else run.started
        return RunRecord(run.name, run.status, started, run.last_seen, max(run.last_merged_step, 0),
                         run.hello.world_size)

    def _save_run(self, name: str) -> None:
        run = self.registry.runs.get(name)
        if run is not None:
            record = self._run_record(run)
            self._store(lambda h: h.save_runs([record]), "run state")

    def _save_runs(self) -> None:
        records = [self._run_record(r) for r in self.registry.runs.values()]
        self._store(lambda h: h.save_runs(records), "run state")

    # --- HTTP ---------------------------------------------------------------------------------

    def _http_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._get_healthz)
        app.router.add_get("/api/runs", self._get_runs)
        app.router.add_get("/api/alerts", self._get_alerts)
        return app

    async def _get_metrics(self, request: web.Request) -> web.Response:
        # `name[]` (repeatable) restricts the families, as prometheus_client's own handler
        # does: a cheap way to watch a few series of a collector with thousands.
        unknown = sorted(set(request.query) - {"name[]"})
        if unknown:
            raise _bad_request(f"unknown query parameter {unknown[0]!r}; allowed: name[] (repeatable)")
        wanted = set(request.query.getall("name[]", [])) or None
        families = list(self.metrics.collect(wanted))  # a consistent snapshot, taken on the loop
        layer_rows = self.metrics.layer_rows(wanted)
        # Formatted on the loop in slices, ingest running in between. A render thread would
        # not spare ingest: it takes the GIL for 5 ms each time the loop waits on a socket.
        chunks, sliced_at = [], time.perf_counter()
        for chunk in exposition_chunks(families, layer_rows, wanted):
            chunks.append(chunk)
            if time.perf_counter() - sliced_at >= RENDER_SLICE_SECONDS:
                await asyncio.sleep(0)
                sliced_at = time.perf_counter()
        body = b"".join(chunks)
        return web.Response(body=body,
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _get_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "runs": len(self.registry.runs),
                                  "connections": self.stats.connections})

    async def _get_runs(self, request: web.Request) -> web.Response:
        params = _check_params(request, {"status"})
        status = params.get("status")
        if status is not None and status not in RUN_STATUSES:
            raise _bad_request(f"status must be one of {', '.join(RUN_STATUSES)}")
        runs = [_run_json(r) for r in self.previous_runs.values() if r.name not in self.registry.runs]
        runs += [
            {**_run_json(self._run_record(r)), "ranks": r.ranks_reporting, "tags": r.hello.tags,
             "sharded": r.hello.sharded, "actions": r.hello.actions, "frozen_layers": len(r.frozen_layers)}
            for r in self.registry.runs.values()
        ]
        runs.sort(key=lambda r: r["started"])
        return web.json_response([r for r in runs if status is None or r["status"] == status])

    async def _get_alerts(self, request: web.Request) -> web.Response:
        params = _check_params(request, {"run", "after", "limit"})
        run = params.get("run")
        if run is not None and not re.fullmatch(RUN_NAME_PATTERN, run):
            raise _bad_request("run must be a run name (letters, digits and ._:@+- ; at most 128)")
        after = _int_param(params, "after", 0, 0, 2**62)
        limit = _int_param(params, "limit", 10_000, 1, 10_000)
        assert self.history is not None
        entries = self.history.entries(run, after, limit)
        if run is not None and not entries and run not in self.registry.runs:
            known = sorted({*self.registry.runs, *(r.name for r in self.history.load_runs())})
            if run not in known:  # a typo must not read like a run without alerts
                listed = ", ".join(known[:20]) + (f" (+{len(known) - 20} more)" if len(known) > 20 else "")
                raise web.HTTPNotFound(
                    text=json.dumps({"error": f"no run named {run!r}; known runs: {listed or 'none yet'}"}),
                    content_type="application/json",
                )
        return web.json_response([e.to_json() for e in entries])


def _run_json(record: RunRecord) -> dict[str, Any]:
    return {"name": record.name, "status": record.status, "last_step": record.last_step, "ranks": 0,
            "world_size": record.world_size, "started": record.started, "last_seen": record.last_seen}


def _bad_request(error: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": error}), content_type="application/json")


def _check_params(request: web.Request, allowed: set[str]) -> dict[str, str]:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        hint = f"; allowed: {', '.join(sorted(allowed))}" if allowed else "; this endpoint takes none"
        raise _bad_request(f"unknown query parameter {unknown[0]!r}{hint}")
    if any(len(request.query.getall(k)) > 1 for k in request.query):
        raise _bad_request("each query parameter may be given once")
    return dict(request.query)


def _int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not low <= int(raw) <= high:
        raise _bad_request(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _refuse_other_version(frame: str | bytes) -> None:
    """A hello from another protocol version may not validate against this version's models;
    answer it with 'unsupported version' rather than a confusing validation error."""
    try:
        data = json.loads(frame)
        version = data["v"] if isinstance(data, dict) and data.get("type") == "hello" else None
    except (ValueError, RecursionError):  # not JSON, too deep: the validation error stands
        return
    if isinstance(version, int) and version != PROTOCOL_VERSION:
        raise ProtocolError(
            CLOSE_UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this collector speaks {PROTOCOL_VERSION}"
            " (upgrade the older of probe and collector)",
        )


def _address(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"


# --- running it ---------------------------------------------------------------------------------


class EmbeddedCollector:
    """A collector running in a daemon thread of this process (the demo, tests)::

        with EmbeddedCollector() as collector:
            run = gradwatch.attach(model, opt, url=collector.ws_url)
            ...
            requests.get(collector.http_url + "/metrics")

    Without a config it listens on free loopback ports and keeps its history in a temporary
    directory removed by `stop()`.
    """

    def __init__(self, config: CollectorConfig | None = None, start_timeout: float = 30.0) -> None:
        self._tempdir: str | None = None
        if config is None:
            self._tempdir = tempfile.mkdtemp(prefix="gradwatch-")
            config = CollectorConfig.model_validate(
                {"server": {"port": 0, "http_port": 0, "data_dir": self._tempdir}}
            )
        self.server = CollectorServer(config)
        self._start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="gradwatch-collector", daemon=True)

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    def start(self) -> EmbeddedCollector:
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise RuntimeError("the embedded collector did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as err:  # noqa: BLE001 - handed to the starting thread, which raises it
            self._error = err
            self._ready.set()
            await self.server.close()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()
