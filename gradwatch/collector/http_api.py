"""The read-only HTTP side: /metrics, /healthz, /api/* (each with its parameter checks) and
the web view's pages and streams (webview.py).

Every answer but /metrics is JSON, errors included (`{"error": "..."}`). An exception in a
handler is logged with its traceback, counted
(gradwatch_collector_internal_errors_total{where="http"}) and answered 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client.exposition import choose_encoder, gzip_accepted

from gradwatch.collector.effects import run_record
from gradwatch.collector.history import History, RunRecord
from gradwatch.collector.metrics import IngestStats, MetricsCollector, exposition_chunks
from gradwatch.collector.registry import RUN_STATUSES, Registry
from gradwatch.collector.run_state import RunState
from gradwatch.collector.webview import SeriesSource, WebView
from gradwatch.protocol import RUN_NAME_PATTERN

log = logging.getLogger("gradwatch.collector")

RENDER_SLICE_SECONDS = 0.02  # /metrics formatting yields to ingest this often
# Exposition is repetitive: level 1 compresses it 7x in a third of level 6's time (and a
# fifteenth of level 9's), for a body about 13% larger.
GZIP_LEVEL = 1

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


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


MALFORMED_HTTP = _MalformedHttpRequests()  # for the "aiohttp.server" logger


class HttpApi:
    """The handlers over the collector's state; `app()` routes them, and a web view's
    routes can join those (`runs()` is the run list it shows)."""

    def __init__(
        self,
        registry: Registry,
        history: History,
        previous_runs: Mapping[str, RunRecord],
        metrics: MetricsCollector,
        stats: IngestStats,
        pages: SeriesSource,
    ) -> None:
        self.registry, self.history, self.previous_runs = registry, history, previous_runs
        self.metrics, self.stats, self.pages = metrics, stats, pages

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_failures])
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/healthz", self._get_healthz)
        app.router.add_get("/api/runs", self._get_runs)
        app.router.add_get("/api/alerts", self._get_alerts)
        WebView(self.runs, self.pages).add_routes(app)
        return app

    @web.middleware
    async def _count_failures(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:  # an answer (400, 404), not a failure
            raise
        except Exception:
            self.stats.internal_errors["http"] += 1
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": "internal error; the collector's log says more"}, status=500)

    async def _get_metrics(self, request: web.Request) -> web.Response:
        # `name[]` (repeatable) restricts the families, as prometheus_client's own handler
        # does: a cheap way to watch a few series of a collector with thousands.
        unknown = sorted(set(request.query) - {"name[]"})
        if unknown:
            raise _bad_request(f"unknown query parameter {unknown[0]!r}; allowed: name[] (repeatable)")
        wanted = set(request.query.getall("name[]", [])) or None
        # Format and compression as prometheus_client's own handler negotiates them.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        gzip = None
        if gzip_accepted(request.headers.get("Accept-Encoding", "")):
            gzip = zlib.compressobj(GZIP_LEVEL, wbits=31)  # wbits 31: the gzip container
        families = list(self.metrics.collect(wanted))  # a consistent snapshot, taken on the loop
        # Formatted (and compressed) on the loop in slices, ingest running in between. A
        # render thread would not spare ingest: it takes the GIL for 5 ms each time the loop
        # waits on a socket.
        chunks, sliced_at = [], time.perf_counter()
        for chunk in exposition_chunks(families, encoder):
            chunks.append(gzip.compress(chunk) if gzip else chunk)
            if time.perf_counter() - sliced_at >= RENDER_SLICE_SECONDS:
                await asyncio.sleep(0)
                sliced_at = time.perf_counter()
        headers = {"Content-Type": content_type}
        if gzip:
            chunks.append(gzip.flush())
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=b"".join(chunks), headers=headers)

    async def _get_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "runs": len(self.registry.runs),
                                  "connections": self.stats.connections})

    def runs(self) -> list[dict[str, Any]]:
        """The /api/runs entries, oldest first: the runs in memory and those a previous
        collector process left in the history."""
        runs = [_run_json(r) for r in self.previous_runs.values() if r.name not in self.registry.runs]
        runs += [
            {**_run_json(run_record(r)), "ranks": r.ranks_reporting, "tags": r.hello.tags,
             "sharded": r.hello.sharded, "actions": r.hello.actions, "frozen_layers": len(r.frozen_layers),
             **_live_json(r)}
            for r in self.registry.runs.values()
        ]
        runs.sort(key=lambda r: r["started"])
        return runs

    async def _get_runs(self, request: web.Request) -> web.Response:
        params = _check_params(request, {"status"})
        status = params.get("status")
        if status is not None and status not in RUN_STATUSES:
            raise _bad_request(f"status must be one of {', '.join(RUN_STATUSES)}")
        return web.json_response([r for r in self.runs() if status is None or r["status"] == status])

    async def _get_alerts(self, request: web.Request) -> web.Response:
        params = _check_params(request, {"run", "after", "limit"})
        run = params.get("run")
        if run is not None and not re.fullmatch(RUN_NAME_PATTERN, run):
            raise _bad_request("run must be a run name (letters, digits and ._:@+- ; at most 128)")
        after = _int_param(params, "after", 0, 0, 2**62)
        limit = _int_param(params, "limit", 10_000, 1, 10_000)
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


def _live_json(run: RunState) -> dict[str, Any]:
    """What only a run in memory can say: its pace, its last loss, its open alerts, and the
    memory its page's history takes."""
    loss = run.latest.loss
    if loss is not None and not math.isfinite(loss):  # a finding: said as a string JSON can carry
        loss = "NaN" if math.isnan(loss) else "Infinity" if loss > 0 else "-Infinity"  # type: ignore[assignment]
    severities = [a.severity for a in run.active_alerts.values()]
    return {
        "steps_per_second": run.steps_per_second(),
        "last_loss": loss,
        "open_alerts": len(severities),
        "worst_severity": max(severities, key=SEVERITY_RANK.__getitem__, default=None),
        "series_bytes": run.series.nbytes,
    }


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
