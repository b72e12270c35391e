"""End to end against real servers: a collector subprocess, Prometheus scraping it every
second with gradwatch's rules, Alertmanager notifying a webhook in this test, and a real CPU
training run with the probe whose loss turns NaN halfway.

Asserts that every PromQL expression of every dashboard (panels, annotations, variables)
returns data, that the pathology's rule fires in Prometheus, and that its notification
reaches the webhook. Started through `gradwatch.stack`, the code behind `gradwatch up`.
"""

from __future__ import annotations

import json
import math
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from gradwatch.dashboards.boards import all_dashboards
from gradwatch.stack import (
    ALERTMANAGER_NAMES,
    PROMETHEUS_NAMES,
    SOURCE_RULES,
    Stack,
    StackSettings,
    find_binary,
)

PROMETHEUS_BIN = find_binary(PROMETHEUS_NAMES)
ALERTMANAGER_BIN = find_binary(ALERTMANAGER_NAMES)
MISSING_MODULES = [m for m in ("torch", "gradwatch.collector.cli", "gradwatch.probe") if find_spec(m) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(PROMETHEUS_BIN is None or ALERTMANAGER_BIN is None,
                       reason="needs Prometheus and Alertmanager (Debian packages prometheus and "
                       "prometheus-alertmanager; CI installs them)"),
    pytest.mark.skipif(bool(MISSING_MODULES), reason=f"modules not in this tree: {', '.join(MISSING_MODULES)}"),
]

RUN = "stack-it"
NAN_FROM_STEP = 40
# What Grafana would substitute; windows fit a 1 s scrape interval.
SUBSTITUTIONS = {"$run": RUN, "$rank": ".*", "$layer": ".*", "$__rate_interval": "5s", "$__interval": "1s"}
# The detectors judge AMP-skipped steps as GradScaler's business by default; here the NaN loss
# must count as the `nonfinite` pathology it is.
COLLECTOR_CONFIG = "[detectors.nonfinite]\ntolerate_amp_skips = false\n"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_for(what: str, check: Callable[[], Any], timeout: float, diagnose: Callable[[], str] = lambda: "") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` and a diagnosis."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")


class Webhook(BaseHTTPRequestHandler):
    """Alertmanager's webhook receiver: queues every notification's JSON body."""

    received: queue.Queue[dict[str, Any]]

    def do_POST(self) -> None:
        self.received.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, queue.Queue[dict[str, Any]]]]:
    received: queue.Queue[dict[str, Any]] = queue.Queue()
    handler = type("TestWebhook", (Webhook,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def stack(tmp_path: Path, webhook: tuple[str, queue.Queue[dict[str, Any]]]) -> Iterator[Stack]:
    config = tmp_path / "collector.toml"
    config.write_text(COLLECTOR_CONFIG)
    settings = StackSettings(
        state_dir=tmp_path / "state", ws_port=0, http_port=0, prometheus_port=0, alertmanager_port=0,
        scrape_interval="1s", rules=SOURCE_RULES, webhook_url=webhook[0], group_wait="1s", group_interval="2s",
        collector_config=config, prometheus=PROMETHEUS_BIN, alertmanager=ALERTMANAGER_BIN,
    )
    with Stack(settings) as started:
        yield started


class Training(threading.Thread):
    """A small MLP trained with SGD (two param groups), GradScaler and clipping, logging a
    validation loss; from NAN_FROM_STEP on its loss is NaN. Runs until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.steps = 0

    def run(self) -> None:
        try:
            self._train()
        except BaseException as err:  # noqa: BLE001 - reported by the test, not lost in the thread
            self.error = err

    def _train(self) -> None:
        import torch

        import gradwatch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        optimizer = torch.optim.SGD([
            {"params": model[0].parameters(), "lr": 0.05},
            {"params": model[2].parameters(), "lr": 0.01, "weight_decay": 1e-4},
        ], momentum=0.9)
        scaler = torch.amp.GradScaler("cpu")
        x, y = torch.randn(256, 8), torch.randn(256, 1)
        run = gradwatch.attach(model, optimizer, scaler=scaler, url=self.url, name=RUN, every=1)
        try:
            while not self.stop_event.is_set():
                batch = torch.randint(0, 256, (32,))
                loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
                if self.steps >= NAN_FROM_STEP:
                    loss = loss * float("nan")
                run.log(loss=loss)  # the model returns predictions, so the probe cannot see the loss
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                if self.steps % 5 == 0:
                    with torch.no_grad():
                        val = torch.nn.functional.mse_loss(model(x[:64]), y[:64]).item()
                    run.log(val_loss=val, val_acc=1.0 / (1.0 + val))
                self.steps += 1
                time.sleep(0.02)
        finally:
            run.detach()


def promql_cases() -> list[tuple[str, str, bool]]:
    """(where, expression, instant) for every PromQL text of every dashboard."""
    cases = []
    for d in all_dashboards():
        for panel in d.panels:
            cases += [(f"{d.uid} / {panel.title} / {t.refId}", t.expr, t.instant) for t in panel.targets]
        cases += [(f"{d.uid} / annotation {a.name}", a.expr, False) for a in d.annotations.list]
    return cases


def label_values_cases() -> list[tuple[str, str, str]]:
    """(where, series selector, label) for every label_values() variable."""
    cases = []
    for d in all_dashboards():
        for v in d.templating.list:
            if v.type == "query":
                match = re.fullmatch(r"label_values\((.+), (\w+)\)", v.query)
                assert match, f"{d.uid}: variable {v.name} is not label_values(): {v.query}"
                cases.append((f"{d.uid} / variable {v.name}", match.group(1), match.group(2)))
    return cases


def substitute(text: str, range_s: int) -> str:
    text = text.replace("$__range", f"{range_s}s")
    for variable, value in SUBSTITUTIONS.items():
        text = text.replace(variable, value)
    assert "$" not in text, f"unsubstituted variable in {text}"
    return text


def test_dashboards_alerts_and_notifications_against_real_servers(
    stack: Stack, webhook: tuple[str, queue.Queue[dict[str, Any]]]
) -> None:
    prometheus = stack.urls["prometheus"]
    started = time.time()
    training = Training(stack.urls["collector"])
    training.start()

    def diagnose() -> str:
        alerts = get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        targets = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        return (f"training: {training.steps} steps, error {training.error!r}\n"
                f"scrape targets: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}\n"
                f"prometheus alerts: {[(a['labels'].get('alertname'), a['state']) for a in alerts]}\n"
                + "\n".join(f"--- {s.name}\n{s.log_tail()}" for s in stack.servers))

    try:
        # 1. The pathology's rule fires in Prometheus...
        def firing() -> list[dict[str, Any]]:
            assert training.error is None, training.error
            return [a for a in get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
                    if a["labels"].get("alertname") == "GradwatchNonfinite" and a["state"] == "firing"]

        [alert] = wait_for("GradwatchNonfinite to fire in Prometheus", firing, 90, diagnose)
        assert alert["labels"]["run"] == RUN and alert["labels"]["severity"] == "critical"
        assert training.steps >= NAN_FROM_STEP

        # 2. ...and its notification arrives at the webhook.
        def notified() -> dict[str, Any] | None:
            try:
                body = webhook[1].get(timeout=0.5)
            except queue.Empty:
                return None
            names = {a["labels"]["alertname"] for a in body["alerts"] if a["status"] == "firing"}
            return body if "GradwatchNonfinite" in names else None

        body = wait_for("the GradwatchNonfinite notification at the webhook", notified, 30, diagnose)
        assert body["commonLabels"]["run"] == RUN
        assert "non-finite" in body["alerts"][0]["annotations"]["summary"]

        # 3. Every dashboard query returns data. Retried together: a series can trail the
        # first scrape that carries its run by a scrape or two.
        def empty_queries() -> list[str]:
            now = time.time()
            range_s = max(10, math.ceil(now - started))
            empty = []
            for where, expr, instant in promql_cases():
                promql = substitute(expr, range_s)
                if instant:
                    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": now})
                else:
                    url = f"{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(
                        {"query": promql, "start": started, "end": now, "step": 1})
                answer = get_json(url)
                assert answer["status"] == "success", f"{where}: {promql}: {answer}"
                if not answer["data"]["result"]:
                    empty.append(f"{where}: {promql}")
            for where, selector, label in label_values_cases():
                url = f"{prometheus}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                    {"match[]": substitute(selector, 0), "start": started, "end": now})
                if not get_json(url)["data"]:
                    empty.append(f"{where}: label_values({selector}, {label})")
            return empty

        last_empty: list[str] = []

        def all_return_data() -> bool:
            last_empty[:] = empty_queries()
            return not last_empty

        wait_for("every dashboard query to return data", all_return_data, 30,
                 lambda: "queries without data:\n" + "\n".join(last_empty) + "\n" + diagnose())

        # 4. The run ends with its alert open: the alert resolves in the collector's history,
        # stops firing in Prometheus and Alertmanager sends the resolution; the run's other
        # series stay for the grace period, so dashboards show how it ended.
        training.stop_event.set()
        training.join(timeout=30)
        collector = stack.urls["metrics"].rsplit("/metrics", 1)[0]

        def resolved_in_history() -> bool:
            entries = get_json(f"{collector}/api/alerts?run={RUN}")
            return any(e["kind"] == "nonfinite" and e["event"] == "resolved" and e["message"] == "resolved: run finished"
                       for e in entries)

        wait_for("the open alert to resolve when the run finished", resolved_in_history, 15, diagnose)
        wait_for("GradwatchNonfinite to stop firing in Prometheus", lambda: not firing(), 30, diagnose)

        def resolution_notified() -> dict[str, Any] | None:
            try:
                body = webhook[1].get(timeout=0.5)
            except queue.Empty:
                return None
            resolved = {a["labels"]["alertname"] for a in body["alerts"] if a["status"] == "resolved"}
            return body if "GradwatchNonfinite" in resolved else None

        wait_for("the GradwatchNonfinite resolution at the webhook", resolution_notified, 60, diagnose)
        step_series = get_json(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode(
            {"query": f'gradwatch_run_step{{run="{RUN}"}}'}))["data"]["result"]
        assert step_series, "the ended run's series vanished before its grace period"
    finally:
        training.stop_event.set()
        training.join(timeout=30)
    assert training.error is None, training.error



@pytest.mark.parametrize("with_binaries", [True, False], ids=["full-stack", "collector-only"])
def test_gradwatch_up_prints_urls_and_stops_everything_on_ctrl_c(tmp_path: Path, with_binaries: bool) -> None:
    binaries = [str(PROMETHEUS_BIN), str(ALERTMANAGER_BIN)] if with_binaries else ["", ""]
    up = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "up", "--state-dir", str(tmp_path), "--port", "0", "--http-port", "0",
         "--prometheus-port", "0", "--alertmanager-port", "0",
         "--prometheus", binaries[0], "--alertmanager", binaries[1]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        urls = {}
        assert up.stdout is not None and up.stderr is not None
        for line in up.stdout:
            if line.startswith("train with"):
                break
            name, url = line.split()
            urls[name] = url
        expected = ["alertmanager", "collector", "metrics", "prometheus"] if with_binaries else ["collector", "metrics"]
        assert sorted(urls) == expected
        for name in set(urls) - {"collector"}:
            urllib.request.urlopen(urls[name], timeout=5).close()
        children = [int(pid) for pid in Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split()]
        assert len(children) == len(expected) - 1
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists(), f"server {pid} outlived gradwatch up"
        if not with_binaries:
            assert "apt-get install prometheus prometheus-alertmanager" in up.stderr.read()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
