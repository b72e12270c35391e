"""The web view's HTTP side: the pages, their static files, the run history as JSON and the
event streams that keep an open page live. Read-only, like the rest of the HTTP port.

Pages are static files (gradwatch/collector/web/) that read the JSON below; everything
they show from the network is set as text, and a strict Content-Security-Policy (scripts
and styles from the collector only, no inline script) stands behind that.

Streams (server-sent events): a page's stream starts with everything (`reset`), then sends
what changed since what it last sent, checked every PUSH_SECONDS and sent only when
something did; a comment every KEEPALIVE_SECONDS otherwise, so that a proxy keeps the
connection and a closed page is noticed.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from gradwatch.collector.series import RunSeries
from gradwatch.protocol import RUN_NAME_PATTERN

WEB_DIR = Path(__file__).with_name("web")
PUSH_SECONDS = 0.25  # a page is at most this (plus drawing) behind the collector
RUNS_PUSH_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

RunsSource = Callable[[], list[dict[str, Any]]]  # the /api/runs entries
SeriesSource = Callable[[str], RunSeries | None]  # a run's history, if one is kept


class WebView:
    def __init__(self, runs: RunsSource, series: SeriesSource) -> None:
        self.runs, self.series = runs, series
        self._closing = asyncio.Event()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/runs/{name}", self._run_page)
        app.router.add_static("/web/", WEB_DIR, follow_symlinks=False, show_index=False)
        app.router.add_get("/api/runs/stream", self._runs_stream)
        app.router.add_get("/api/runs/{name}/series", self._series_json)
        app.router.add_get("/api/runs/{name}/layers", self._layers_json)
        app.router.add_get("/api/runs/{name}/stream", self._run_stream)
        app.on_shutdown.append(self._close_streams)  # else open pages hold the shutdown up

    async def _close_streams(self, app: web.Application) -> None:
        self._closing.set()

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    async def _run_page(self, request: web.Request) -> web.FileResponse:
        _run_name(request)  # the page itself says when the collector does not know the run
        return web.FileResponse(WEB_DIR / "run.html", headers=PAGE_HEADERS)

    async def _series_json(self, request: web.Request) -> web.Response:
        name, series = self._known_series(request)
        data = series.since(_since(request))
        del data["layers"]
        return web.json_response({"run": name, **data}, dumps=_dumps)

    async def _layers_json(self, request: web.Request) -> web.Response:
        name, series = self._known_series(request)
        data = series.since(_since(request))
        return web.json_response({"run": name, **{k: data[k] for k in ("version", "reset", "layers")}}, dumps=_dumps)

    async def _run_stream(self, request: web.Request) -> web.StreamResponse:
        name, series = self._known_series(request)
        response = await self._open_stream(request)
        sent_version, sent_entry = 0, None
        sent_series: RunSeries | None = series

        async def push() -> bool:
            nonlocal sent_version, sent_entry, sent_series
            current = self.series(name)
            entry = _entry(self.runs(), name)
            if current is None:
                return False
            if current is not sent_series:  # a new training took the name: start over
                sent_series, sent_version = current, 0
            if current.version == sent_version and entry == sent_entry:
                return False
            message = current.since(sent_version) | {"run": entry}
            await response.write(f"data: {_dumps(message)}\n\n".encode())
            sent_version, sent_entry = current.version, entry
            return True

        await self._stream(response, push, PUSH_SECONDS)
        return response

    async def _runs_stream(self, request: web.Request) -> web.StreamResponse:
        response = await self._open_stream(request)
        sent: list[dict[str, Any]] | None = None

        async def push() -> bool:
            nonlocal sent
            runs = self.runs()
            if runs == sent:
                return False
            await response.write(f"data: {_dumps(runs)}\n\n".encode())
            sent = runs
            return True

        await self._stream(response, push, RUNS_PUSH_SECONDS)
        return response

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=STREAM_HEADERS)
        await response.prepare(request)
        return response

    async def _stream(self, response: web.StreamResponse, push: Callable[[], Awaitable[bool]], every: float) -> None:
        quiet = 0.0
        try:
            while not self._closing.is_set():
                if await push():
                    quiet = 0.0
                elif quiet >= KEEPALIVE_SECONDS:
                    await response.write(b": keepalive\n\n")
                    quiet = 0.0
                try:
                    await asyncio.wait_for(self._closing.wait(), every)
                except TimeoutError:
                    quiet += every
        except (ConnectionResetError, ConnectionError):
            pass  # the page was closed

    def _known_series(self, request: web.Request) -> tuple[str, RunSeries]:
        name = _run_name(request)
        series = self.series(name)
        if series is not None:
            return name, series
        known = sorted(r["name"] for r in self.runs())
        if name in known:
            raise _not_found(f"no history is kept for run {name!r} (it ended before this collector kept one)")
        listed = ", ".join(known[:20]) + (f" (+{len(known) - 20} more)" if len(known) > 20 else "")
        raise _not_found(f"no run named {name!r}; known runs: {listed or 'none yet'}")


def _run_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not re.fullmatch(RUN_NAME_PATTERN, name):
        raise _error(web.HTTPBadRequest, "run must be a run name (letters, digits and ._:@+- ; at most 128)")
    return name


def _since(request: web.Request) -> int:
    unknown = sorted(set(request.query) - {"since"})
    if unknown:
        raise _error(web.HTTPBadRequest, f"unknown query parameter {unknown[0]!r}; allowed: since")
    raw = request.query.get("since", "0")
    if not re.fullmatch(r"[0-9]{1,18}", raw):
        raise _error(web.HTTPBadRequest, "since must be a version: an integer from 0")
    return int(raw)


def _entry(runs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in runs if r["name"] == name), None)


def _not_found(error: str) -> web.HTTPNotFound:
    return _error(web.HTTPNotFound, error)


def _error(kind: type[web.HTTPClientError], error: str) -> web.HTTPClientError:
    return kind(text=json.dumps({"error": error}), content_type="application/json")


def _strict(value: Any) -> Any:
    """JSON a browser can parse: non-finite floats (a NaN loss in a run's entry) as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:  # rare: walk it only when something is not finite
        return json.dumps(_strict(value), separators=(",", ":"), allow_nan=False)
