"""The web view's HTTP side (collector/webview.py) over a fake collector state: what each
route answers, and the event stream that keeps a page live."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gradwatch.collector.detectors.base import Observation
from gradwatch.collector.series import Marker, RunSeries
from gradwatch.collector.webview import WebView
from gradwatch.protocol import Landscape, LRFind

RUN = "exp-1:lr@3e-4"


def state() -> tuple[list[dict[str, Any]], dict[str, RunSeries]]:
    series = RunSeries()
    for step in range(5):
        series.observe(Observation(step=step, time=float(step), loss=1.0 / (step + 1), layers=("a", "b"),
                                   layer_grad_norm=(1.0, 2.0)))
    runs = [{"name": RUN, "status": "running", "last_step": 4, "last_loss": float("nan")},
            {"name": "older", "status": "finished", "last_step": 9}]
    return runs, {RUN: series}


def serve(test: Callable[[TestClient, list[dict[str, Any]], dict[str, RunSeries]], Awaitable[None]]) -> None:
    async def main() -> None:
        runs, series = state()
        app = web.Application()
        WebView(lambda: [dict(r) for r in runs], series.get).add_routes(app)
        async with TestClient(TestServer(app)) as client:
            await test(client, runs, series)

    asyncio.run(main())


ROUTE_CASES = [
    # (path, status, content type, a piece of the body)
    ("/", 200, "text/html", "gradwatch runs"),
    (f"/runs/{RUN}", 200, "text/html", 'id="heatmap"'),
    ("/runs/no-such-run", 200, "text/html", 'id="heatmap"'),  # the page says it, from the JSON's 404
    ("/runs/bad%20name", 400, "application/json", "run must be a run name"),
    ("/web/vendor/uPlot.iife.min.js", 200, "application/javascript", "uPlot"),
    ("/web/vendor/LICENSE", 200, "", "MIT License"),
    ("/web/../webview.py", 404, "", ""),
    ("/web/%2e%2e/webview.py", 404, "", ""),
    (f"/api/runs/{RUN}/series", 200, "application/json", '"reset":true'),
    (f"/api/runs/{RUN}/series?since=3", 200, "application/json", '"from":3'),
    (f"/api/runs/{RUN}/layers", 200, "application/json", '"rows":["a","b"]'),
    ("/api/runs/older/series", 404, "application/json", "no history is kept for run 'older'"),
    ("/api/runs/nope/series", 404, "application/json", "known runs: exp-1:lr@3e-4, older"),
    (f"/api/runs/{RUN}/series?since=-1", 400, "application/json", "since must be a version"),
    (f"/api/runs/{RUN}/series?step=1", 400, "application/json", "unknown query parameter 'step'"),
]


@pytest.mark.parametrize(("path", "status", "content_type", "piece"), ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_routes(path: str, status: int, content_type: str, piece: str) -> None:
    async def test(client: TestClient, runs: Any, series: Any) -> None:
        response = await client.get(path)
        body = await response.text()
        assert (response.status, piece in body) == (status, True), body[:300]
        assert response.headers.get("Content-Type", "").startswith(content_type)

    serve(test)


def test_pages_carry_a_strict_content_security_policy() -> None:
    async def test(client: TestClient, runs: Any, series: Any) -> None:
        for path in ("/", f"/runs/{RUN}"):
            policy = (await client.get(path)).headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "unsafe" not in policy

    serve(test)


def test_series_json_is_what_the_series_says() -> None:
    async def test(client: TestClient, runs: Any, series: dict[str, RunSeries]) -> None:
        data = await (await client.get(f"/api/runs/{RUN}/series")).json()
        expected = series[RUN].since(0)
        assert data["run"] == RUN and "layers" not in data
        assert data["curves"] == json.loads(json.dumps(expected["curves"]))

    serve(test)


async def next_event(response: Any) -> Any:
    while True:
        chunk = (await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)).decode()
        if chunk.startswith("data: "):
            return json.loads(chunk[len("data: "):])


def test_a_run_stream_starts_with_everything_then_sends_what_changed() -> None:
    async def test(client: TestClient, runs: list[dict[str, Any]], series: dict[str, RunSeries]) -> None:
        response = await client.get(f"/api/runs/{RUN}/stream")
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await next_event(response)
        assert (first["reset"], first["last_step"], first["run"]["name"]) == (True, 4, RUN)
        assert first["run"]["last_loss"] == "NaN"  # strict JSON for the browser
        series[RUN].mark(Marker(5, "fired", "loss_spike", "warning", "loss <b>9</b>", "lower the LR"))
        series[RUN].observe(Observation(step=5, time=5.0, loss=9.0))
        second = await next_event(response)
        assert (second["reset"], second["curves"]["from"], second["curves"]["step"]) == (False, 5, [5])
        assert [m["message"] for m in second["markers"]] == ["loss <b>9</b>"]
        series[RUN] = RunSeries()  # a new training took the name
        series[RUN].observe(Observation(step=0, time=9.0, loss=3.0))
        third = await next_event(response)
        assert (third["reset"], third["last_step"]) == (True, 0)
        response.close()

    serve(test)


def test_the_runs_stream_sends_the_list_when_it_changes() -> None:
    async def test(client: TestClient, runs: list[dict[str, Any]], series: Any) -> None:
        response = await client.get("/api/runs/stream")
        assert [r["name"] for r in await next_event(response)] == [RUN, "older"]
        runs[0] = {**runs[0], "last_step": 5}
        assert (await next_event(response))[0]["last_step"] == 5
        response.close()

    serve(test)


def test_results_reach_the_series_json_and_the_stream() -> None:
    lr_find = LRFind(lrs=[1e-4, 1e-3, 1e-2], losses=[2.0, 1.0, float("nan")], smoothed=[2.0, 1.5, float("nan")],
                     suggested_lr=1e-3, alternative_lr=1e-4, min_loss_lr=1e-3, reason="steepest <b>descent</b>")
    grid = Landscape(step=4, alphas=[-1.0, 0.0, 1.0], losses=[[2.0, 1.0, 2.5]], centre=1.0, directions=["random"],
                     radius=1.0)

    async def test(client: TestClient, runs: Any, series: dict[str, RunSeries]) -> None:
        response = await client.get(f"/api/runs/{RUN}/stream")
        assert (await next_event(response))["results"] == {}
        series[RUN].keep(lr_find)
        sent = (await next_event(response))["results"]
        assert list(sent) == ["lr_find"] and sent["lr_find"]["losses"] == [2.0, 1.0, None]
        response.close()
        series[RUN].keep(grid)
        data = await (await client.get(f"/api/runs/{RUN}/series")).json()
        assert data["results"]["lr_find"]["reason"] == "steepest <b>descent</b>"
        assert data["results"]["lr_find"]["suggested_lr"] == 1e-3
        assert data["results"]["landscape"] == {
            "type": "landscape", "step": 4, "alphas": [-1.0, 0.0, 1.0], "betas": [], "losses": [[2.0, 1.0, 2.5]],
            "centre": 1.0, "directions": ["random"], "radius": 1.0}

    serve(test)
