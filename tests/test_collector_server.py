"""End to end: a real collector subprocess, real websocket clients speaking the protocol."""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import shutil
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

import pytest
from prometheus_client import parser as text_parser
from prometheus_client.openmetrics import parser as openmetrics_parser
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gradwatch.collector.detectors.runbook import hint
from gradwatch.collector.embedded import EmbeddedCollector
from gradwatch.collector.history import DB_NAME
from gradwatch.protocol import (
    CLOSE_INVALID_MESSAGE,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_VERSION,
    PROTOCOL_VERSION,
    Ack,
    Action,
    Bye,
    Heartbeat,
    Hello,
    Landscape,
    LRFind,
    Received,
    StepRecord,
    Steps,
    Welcome,
    decode_collector_message,
    encode,
)

if TYPE_CHECKING:
    from conftest import CollectorProcess

pytestmark = pytest.mark.slow

LAYERS = ["embed", "block.0.attn", "head"]


@pytest.fixture
def open_probe() -> Iterator[Callable[..., tuple[ClientConnection, list]]]:
    """open_probe(url, run, token=None, **hello) connects, says hello and returns the
    connection and the collector's welcome; connections are closed after the test."""
    with ExitStack() as stack:
        yield lambda url, run, token=None, **hello: _hello(stack, url, run, token, **hello)


def _hello(stack: ExitStack, url: str, run: str, token: str | None, **hello: object) -> tuple[ClientConnection, list]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ws = stack.enter_context(connect(url, additional_headers=headers))
    ws.send(encode(Hello(v=PROTOCOL_VERSION, run=run, layers=hello.pop("layers", LAYERS), **hello)))
    answers = [decode_collector_message(ws.recv(timeout=10))]
    assert isinstance(answers[0], Welcome)
    return ws, answers


def next_action(ws: ClientConnection, timeout: float = 10) -> Action:
    """The next action from the collector, past the `received` confirmations."""
    while True:
        message = decode_collector_message(ws.recv(timeout=timeout))
        if not isinstance(message, Received):
            return message


def steps(*records: StepRecord, dropped: int = 0) -> str:
    return encode(Steps(records=list(records), dropped=dropped))


def rec(step: int, **kw: object) -> StepRecord:
    layer = {"layer_grad_sq": [0.25, 1.0, 4.0], "layer_weight_sq": [100.0, 100.0, 100.0],
             "layer_update_sq": [0.01, 0.01, 0.01]}
    return StepRecord(**{"step": step, "time": time.time(), "loss": 2.0 - step * 0.01, "grad_norm_sq": 5.25,
                         "lr": [0.1], "step_time": 0.05, **layer, **kw})


def metrics_when(collector: CollectorProcess, predicate: Callable[[str], bool], what: str) -> str:
    """Poll /metrics until `predicate` holds on it; that exposition."""
    def matching() -> str | None:
        metrics = collector.metrics()
        return metrics if predicate(metrics) else None

    return collector.wait_for(matching, what=what)


def series(metrics: str, name: str, **labels: str) -> float | None:
    """The value of one series in an exposition, or None when it is absent."""
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if line.split("{")[0].split(" ")[0] == name and found == labels:
            return float(line.rsplit(" ", 1)[1])
    return None


def promtool_check(metrics: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=metrics.encode(), capture_output=True,
                            check=False)
    # promtool exits 3 for lint warnings only (e.g. HELP style); 1 means invalid exposition.
    assert result.returncode in (0, 3), result.stderr.decode() + result.stdout.decode()
    assert b"error" not in result.stderr.lower(), result.stderr.decode()


def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Wait for the collector to close `ws`; its close code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None, "the collector closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


def test_ingest_to_metrics_runs_and_alerts(collector, open_probe):
    ws, _ = open_probe(collector.ws_url, "train-1", param_groups=1)
    ws.send(steps(*[rec(s, scalars={"val_loss": 2.5}) for s in range(1, 6)], dropped=3))
    ws.send(steps(rec(6, loss=math.nan, grad_norm_sq=math.inf, nonfinite_layers=1)))
    ws.send(encode(Heartbeat(time=time.time())))
    metrics = metrics_when(collector, lambda m: series(m, "gradwatch_run_step", run="train-1") == 6, "step 6")
    promtool_check(metrics)
    expected = {
        ("gradwatch_run_up", ()): 1.0,
        ("gradwatch_run_status", (("status", "running"),)): 1.0,
        ("gradwatch_steps_total", ()): 6.0,
        ("gradwatch_grad_norm", ()): math.inf,
        ("gradwatch_loss", (("split", "val"),)): 2.5,
        ("gradwatch_learning_rate", (("group", "0"),)): 0.1,
        ("gradwatch_layer_grad_norm", (("layer", "head"),)): 2.0,
        ("gradwatch_layer_weight_norm", (("layer", "embed"),)): 10.0,
        ("gradwatch_layer_update_ratio", (("layer", "embed"),)): 0.01,
        ("gradwatch_nonfinite_layers", ()): 1.0,
        ("gradwatch_nonfinite_steps_total", ()): 1.0,
        ("gradwatch_step_duration_seconds", (("rank", "0"),)): 0.05,
        ("gradwatch_probe_dropped_records_total", (("rank", "0"),)): 3.0,
        ("gradwatch_alert_active", (("kind", "nonfinite"), ("severity", "critical"))): 1.0,
        ("gradwatch_alert_active", (("kind", "plateau"), ("severity", "warning"))): 0.0,
        ("gradwatch_alerts_total", (("kind", "nonfinite"),)): 1.0,
    }
    for (name, labels), value in expected.items():
        assert series(metrics, name, run="train-1", **dict(labels)) == value, name
    assert math.isnan(series(metrics, "gradwatch_loss", run="train-1", split="train"))
    assert series(metrics, "gradwatch_collector_messages_total", type="steps") == 2
    assert series(metrics, "gradwatch_collector_connections") == 1
    status, body = collector.get("/metrics?name[]=gradwatch_run_step&name[]=gradwatch_layer_grad_norm")
    assert status == 200 and set(re.findall(r"^(\w+)\{", body.decode(), re.MULTILINE)) == {
        "gradwatch_run_step", "gradwatch_layer_grad_norm"}

    ws.send(encode(Bye()))
    ws.close()
    run = collector.wait_for(
        lambda: next((r for r in collector.get_json("/api/runs") if r["status"] == "finished"), None),
        what="run finished",
    )
    assert {k: run[k] for k in ("name", "last_step", "world_size")} == {"name": "train-1", "last_step": 6,
                                                                         "world_size": 1}
    alert, ended = collector.get_json("/api/alerts?run=train-1")
    assert {k: alert[k] for k in ("run", "kind", "severity", "step", "layer", "event")} == {
        "run": "train-1", "kind": "nonfinite", "severity": "critical", "step": 6, "layer": None, "event": "fired"}
    # the run ended, so its open alert resolved with it
    assert (ended["kind"], ended["event"], ended["message"]) == ("nonfinite", "resolved", "resolved: run finished")
    assert alert["message"] and alert["time"] > 0 and alert["id"] == 1
    assert alert["hint"] == hint("nonfinite")
    status, body = collector.get("/api/alerts?run=other")  # a run the collector never saw
    assert status == 404 and json.loads(body) == {"error": "no run named 'other'; known runs: train-1"}
    assert f"alert nonfinite fired: run train-1 step 6: {alert['message']}; try: {alert['hint']}" in collector.logs()


def test_sharded_ranks_sum_squared_norms(collector, open_probe):
    ranks = [open_probe(collector.ws_url, "fsdp", rank=r, world_size=2, sharded=True)[0] for r in (0, 1)]
    for ws, grad_sq in zip(ranks, (9.0, 16.0)):
        ws.send(steps(rec(1, grad_norm_sq=grad_sq, layer_grad_sq=[grad_sq, 0.0, 0.0])))
    metrics = metrics_when(collector, lambda m: series(m, "gradwatch_steps_total", run="fsdp") == 1, "merged step")
    assert series(metrics, "gradwatch_grad_norm", run="fsdp") == 5.0
    assert series(metrics, "gradwatch_layer_grad_norm", run="fsdp", layer="embed") == 5.0
    assert series(metrics, "gradwatch_run_ranks", run="fsdp") == 2
    assert series(metrics, "gradwatch_run_world_size", run="fsdp") == 2


BAD_INPUT = [
    # (name, frames sent after connecting, close code, reason contains, rejects label)
    ("not json", ["{nope"], CLOSE_INVALID_MESSAGE, "invalid", "invalid_message"),
    ("wrong types", ['{"type":"hello","v":4,"run":"x","layers":"embed"}'], CLOSE_INVALID_MESSAGE, "layers",
     "invalid_message"),
    ("unknown type", ['{"type":"gimme"}'], CLOSE_INVALID_MESSAGE, "invalid", "invalid_message"),
    ("bad run name", ['{"type":"hello","v":4,"run":"a\\"b\\nc","layers":[]}'], CLOSE_INVALID_MESSAGE, "run",
     "invalid_message"),
    ("future version", ['{"type":"hello","v":99,"run":"x","layers":[],"new_field":1}'], CLOSE_UNSUPPORTED_VERSION,
     "version 99", "unsupported_version"),
    ("no hello", [encode(Heartbeat(time=1.0))], CLOSE_POLICY, "first message must be a hello", "no_hello"),
    ("oversize", ["x" * 70_000], CLOSE_TOO_BIG, "exceeds limit", "too_big"),
    ("bad steps after hello", [encode(Hello(v=PROTOCOL_VERSION, run="bad", layers=[])), '{"type":"steps"}'],
     CLOSE_INVALID_MESSAGE, "records", "invalid_message"),
    ("flood", [encode(Hello(v=PROTOCOL_VERSION, run="flood", layers=[]))]
     + [encode(Heartbeat(time=1.0))] * 200, CLOSE_POLICY, "rate limit", "rate_limited"),
]


def test_bad_input_is_refused_with_a_reason_while_a_good_client_streams(start_collector, open_probe):
    collector = start_collector("[server]\nmax_frame_bytes = 65536\nmax_messages_per_second = 30\n")
    good, _ = open_probe(collector.ws_url, "good")
    step = 0
    for name, frames, code, reason, _ in BAD_INPUT:
        step += 1
        good.send(steps(rec(step)))
        with connect(collector.ws_url, max_size=None) as bad:
            try:
                for frame in frames:
                    bad.send(frame)
            except ConnectionClosed:
                pass  # the flood is cut off mid-way
            got_code, got_reason = closed_with(bad)
        assert got_code == code, (name, got_reason)
        assert reason in got_reason, (name, got_reason)
    good.send(steps(rec(step + 1)))
    good.send(encode(Bye()))
    good.close()
    collector.wait_for(lambda: any(r["status"] == "finished" for r in collector.get_json("/api/runs")),
                       what="the good run to finish")
    metrics = collector.metrics()
    promtool_check(metrics)
    assert series(metrics, "gradwatch_steps_total", run="good") == len(BAD_INPUT) + 1  # nothing lost
    expected = {}
    for *_, label in BAD_INPUT:
        expected[label] = expected.get(label, 0) + 1
    for label, count in expected.items():
        assert series(metrics, "gradwatch_collector_rejected_messages_total", reason=label) == count, label
    # one log line per refused connection
    assert collector.logs().count("closed ") == len(BAD_INPUT)


def test_token_is_required_when_configured(start_collector, open_probe):
    collector = start_collector(env={"GRADWATCH_TOKEN": "s3cret"})
    for token in (None, "wrong"):
        with pytest.raises(InvalidStatus) as info:
            open_probe(collector.ws_url, "r", token=token)
        assert info.value.response.status_code == 401
    ws, _ = open_probe(collector.ws_url, "r", token="s3cret")
    ws.close()
    assert series(collector.metrics(), "gradwatch_collector_rejected_messages_total", reason="unauthorized") == 2


def test_silent_run_is_lost_after_heartbeat_timeout(collector, open_probe):
    ws, _ = open_probe(collector.ws_url, "silent")
    ws.send(steps(rec(1)))
    ws.close()  # no bye: the training process died
    collector.wait_for(lambda: collector.get_json("/api/runs")[0]["status"] == "lost", what="run lost")
    [alert] = collector.get_json("/api/alerts?run=silent")
    assert (alert["kind"], alert["severity"], alert["event"]) == ("run_lost", "critical", "fired")
    assert alert["hint"] == hint("run_lost")
    metrics = collector.metrics()
    assert series(metrics, "gradwatch_alert_active", run="silent", kind="run_lost", severity="critical") == 1
    assert series(metrics, "gradwatch_run_up", run="silent") == 0
    assert "run silent lost" in collector.logs()


def test_ended_run_series_disappear_after_grace(collector, open_probe):
    ws, _ = open_probe(collector.ws_url, "done")
    ws.send(steps(rec(1)))
    ws.send(encode(Bye()))
    ws.close()
    collector.wait_for(lambda: series(collector.metrics(), "gradwatch_run_up", run="done") == 0, what="run ended")
    collector.wait_for(lambda: 'run="done"' not in collector.metrics(), what="series gone after grace")
    assert series(collector.metrics(), "gradwatch_collector_runs", status="finished") == 1
    assert collector.get_json("/api/runs")[0]["name"] == "done"  # still listed


def test_frozen_layers_are_counted_in_runs_and_metrics(collector, open_probe):
    ws, _ = open_probe(collector.ws_url, "fine-tune")
    frozen_embed = {"layer_grad_sq": [None, 1.0, 4.0], "layer_weight_sq": [None, 100.0, 100.0],
                    "layer_update_sq": [None, 0.01, 0.01], "layer_frozen": [0]}
    ws.send(steps(rec(1, **frozen_embed)))
    run = collector.wait_for(lambda: next((r for r in collector.get_json("/api/runs") if r["last_step"] == 1), None),
                             what="the step merged")
    assert run["frozen_layers"] == 1
    metrics = collector.metrics()
    assert series(metrics, "gradwatch_run_frozen_layers", run="fine-tune") == 1
    assert series(metrics, "gradwatch_layer_grad_norm", run="fine-tune", layer="embed") is None
    assert series(metrics, "gradwatch_layer_grad_norm", run="fine-tune", layer="head") == 2.0


def test_layer_cap(start_collector, open_probe):
    collector = start_collector("[metrics]\nlayer_cap = 2\n")
    ws, _ = open_probe(collector.ws_url, "wide")
    ws.send(steps(rec(1)))
    metrics = metrics_when(collector, lambda m: series(m, "gradwatch_steps_total", run="wide") == 1, "the step")
    assert series(metrics, "gradwatch_layers_dropped", run="wide") == 1
    assert series(metrics, "gradwatch_collector_layer_cap") == 2
    assert len(re.findall(r"^gradwatch_layer_grad_norm\{", metrics, re.MULTILINE)) == 2
    ws.close()


def test_history_survives_kill_9_and_restart(collector, open_probe):
    ws, _ = open_probe(collector.ws_url, "durable")
    ws.send(steps(rec(1), rec(2, nonfinite_layers=2)))
    before = collector.wait_for(lambda: collector.get_json("/api/alerts"), what="the alert")
    collector.kill()
    collector.start()
    assert collector.get_json("/api/alerts") == before
    [run] = collector.get_json("/api/runs")
    assert (run["name"], run["status"]) == ("durable", "lost")  # not known to be alive any more


# The alert history as the first collectors wrote it, before alerts had a hint.
OLD_HISTORY_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, run TEXT NOT NULL, event TEXT NOT NULL,
    kind TEXT NOT NULL, severity TEXT NOT NULL, step INTEGER, layer TEXT, message TEXT NOT NULL,
    action TEXT, action_id TEXT, outcome TEXT, rank INTEGER
);
CREATE TABLE runs (
    name TEXT PRIMARY KEY, status TEXT NOT NULL, started REAL NOT NULL, last_seen REAL NOT NULL,
    last_step INTEGER NOT NULL, world_size INTEGER NOT NULL
);
INSERT INTO events (time, run, event, kind, severity, step, message)
    VALUES (1.0, 'old', 'fired', 'plateau', 'warning', 500, 'loss has not improved');
INSERT INTO runs VALUES ('old', 'finished', 0.5, 2.0, 900, 1);
"""


def test_an_older_history_without_hints_opens_and_keeps_its_rows(start_collector, open_probe, tmp_path):
    data = tmp_path / "old-data"
    data.mkdir()
    with sqlite3.connect(data / DB_NAME) as db:
        db.executescript(OLD_HISTORY_SCHEMA)
    collector = start_collector(args=["--data", str(data)])
    [old] = collector.get_json("/api/alerts")
    assert (old["run"], old["kind"], old["step"], old["message"], old["hint"]) == (
        "old", "plateau", 500, "loss has not improved", "")
    assert collector.get_json("/api/runs")[0]["last_step"] == 900
    ws, _ = open_probe(collector.ws_url, "new")
    ws.send(steps(rec(1, nonfinite_layers=1)))
    new = collector.wait_for(lambda: collector.get_json("/api/alerts?run=new"), what="the new alert")
    assert [(a["kind"], a["hint"]) for a in new] == [("nonfinite", hint("nonfinite"))]
    collector.kill()  # a migrated history opens again as it is
    collector.start()
    assert [a["hint"] for a in collector.get_json("/api/alerts")] == ["", hint("nonfinite")]


POLICY = """
[detectors.nonfinite]
resolve_after = 1
[actions.nonfinite]
action = "reduce_lr"
factor = 0.25
cooldown = 100
[actions.loss_spike]
action = "skip_step"
"""


def test_actions_go_only_to_runs_that_opted_in_and_respect_cooldown(start_collector, open_probe):
    collector = start_collector(POLICY)
    with_actions, answers = open_probe(collector.ws_url, "acting", actions=True)
    without, quiet = open_probe(collector.ws_url, "passive", actions=False)
    assert answers[0].actions is True and quiet[0].actions is False
    armed = decode_collector_message(with_actions.recv(timeout=10))
    assert (armed.kind, armed.params) == ("skip_step", {"on": "loss_spike"})

    # non-finite at 2 (action), resolved at 3, again at 10: inside the 100-step cooldown
    trace = [rec(1), rec(2, nonfinite_layers=1), rec(3), rec(10, nonfinite_layers=1), rec(11)]
    for ws in (with_actions, without):
        ws.send(steps(*trace))
    action = next_action(with_actions)
    assert (action.kind, action.params) == ("reduce_lr", {"factor": 0.25, "min_lr": 1e-6})
    assert action.step == 11 + 1  # one process: the next step after the highest seen
    with_actions.send(encode(Ack(id=action.id, kind="reduce_lr", step=action.step, outcome="applied")))
    for ws in (with_actions, without):
        ws.send(encode(Bye()))
    collector.wait_for(
        lambda: sum(r["status"] == "finished" for r in collector.get_json("/api/runs")) == 2, what="both finished"
    )
    for ws in (with_actions, without):  # nothing more was sent to either
        with pytest.raises(TimeoutError):
            next_action(ws, timeout=0.2)
        ws.close()

    events = [(e["event"], e["kind"], e["action"], e["outcome"]) for e in collector.get_json("/api/alerts?run=acting")]
    assert events == [
        ("fired", "nonfinite", None, None), ("action", "nonfinite", "reduce_lr", "sent"),
        ("resolved", "nonfinite", None, None), ("fired", "nonfinite", None, None),
        ("resolved", "nonfinite", None, None), ("ack", "nonfinite", "reduce_lr", "applied"),
    ]
    assert all(e["event"] in ("fired", "resolved") for e in collector.get_json("/api/alerts?run=passive"))
    metrics = collector.metrics()
    for outcome, count in (("armed", 1), ("sent", 1), ("applied", 1)):
        action_kind = "skip_step" if outcome == "armed" else "reduce_lr"
        assert series(metrics, "gradwatch_actions_total", run="acting", action=action_kind, outcome=outcome) == count
    assert not re.search(r'^gradwatch_actions_total\{[^}]*run="passive"', metrics, re.MULTILINE)


BAD_QUERIES = [
    ("/api/alerts?run=a%22b", "run must be"),
    ("/api/alerts?limit=-1", "limit must be"),
    ("/api/alerts?after=1e9", "after must be"),
    ("/api/alerts?bogus=1", "unknown query parameter 'bogus'"),
    ("/api/alerts?run=a&run=b", "once"),
    ("/api/runs?status=zombie", "status must be"),
    ("/metrics?x=1", "allowed: name[]"),
]


def test_bad_query_parameters_get_400_with_a_reason(collector):
    for path, error in BAD_QUERIES:
        status, body = collector.get(path)
        assert (status, error in json.loads(body)["error"]) == (400, True), (path, body)
    assert collector.get("/healthz")[0] == 200


def test_embedded_collector_serves_in_a_thread(open_probe):
    with EmbeddedCollector() as embedded:
        data_dir = embedded.server.config.server.data_dir
        ws, _ = open_probe(embedded.ws_url, "embedded")
        ws.send(steps(rec(1)))
        ws.send(encode(Bye()))
        ws.close()

        def finished_run() -> dict | None:
            with urllib.request.urlopen(embedded.http_url + "/api/runs", timeout=10) as response:
                return next((r for r in json.load(response) if r["status"] == "finished"), None)

        deadline = time.monotonic() + 20
        while (run := finished_run()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run is not None and (run["name"], run["last_step"]) == ("embedded", 1)
    assert not data_dir.exists()  # its temporary data dir is removed on stop


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and raw body (urllib leaves a gzip body as it came)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def samples_of(families: Iterator) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {(s.name, tuple(sorted(s.labels.items())), s.value) for family in families for s in family.samples}


OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def streamed(ws: ClientConnection, *records: StepRecord) -> None:
    """Send `records`; return once the collector confirmed them (their effects are done)."""
    ws.send(steps(*records))
    last = max(r.step for r in records)
    while not (isinstance(m := decode_collector_message(ws.recv(timeout=10)), Received) and m.step == last):
        pass


def test_metrics_negotiate_gzip_and_openmetrics(open_probe):
    # In process, with the default heartbeat timeout: nothing changes between the scrapes.
    with EmbeddedCollector() as embedded:
        ws, _ = open_probe(embedded.ws_url, "formats", param_groups=1)
        streamed(ws, rec(1), rec(2, loss=math.inf, scalars={"val_loss": 2.5}))
        url = embedded.http_url + "/metrics"
        status, headers, plain = get(url)
        assert (status, headers["Content-Type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert "Content-Encoding" not in headers
        status, headers, body = get(url, **{"Accept-Encoding": "gzip"})
        assert (status, headers["Content-Encoding"]) == (200, "gzip")
        assert gzip.decompress(body) == plain
        status, headers, body = get(url, Accept=OPENMETRICS, **{"Accept-Encoding": "gzip"})
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        openmetrics = gzip.decompress(body).decode()
        assert openmetrics.endswith("\n# EOF\n") and openmetrics.count("# EOF") == 1
        # The same series in both formats, the OpenMetrics text read by its strict parser.
        assert samples_of(openmetrics_parser.text_string_to_metric_families(openmetrics)) == samples_of(
            text_parser.text_string_to_metric_families(plain.decode()))
        status, _, body = get(url + "?name[]=gradwatch_run_step", Accept=OPENMETRICS)
        assert body.decode().splitlines() == [
            "# HELP gradwatch_run_step last merged optimizer step", "# TYPE gradwatch_run_step gauge",
            'gradwatch_run_step{run="formats"} 2.0', "# EOF"]


def test_both_formats_pass_promtool(collector, open_probe):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus; CI installs it)")
    ws, _ = open_probe(collector.ws_url, "linted", param_groups=1)
    ws.send(steps(rec(1), rec(2, loss=math.nan, grad_norm_sq=math.inf, nonfinite_layers=1)))
    metrics_when(collector, lambda m: series(m, "gradwatch_run_step", run="linted") == 2, "step 2")
    status, _, body = get(collector.http_url + "/metrics")
    assert status == 200
    promtool_check(body.decode())
    status, _, body = get(collector.http_url + "/metrics", Accept=OPENMETRICS)
    assert status == 200
    openmetrics = body.decode()
    # promtool reads OpenMetrics as the classic text format, where a counter's samples
    # (NAME_total) do not belong to its HELP and TYPE (NAME): it warns of exactly that (exit
    # 3, lint only), and of nothing else.
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
    counters = re.findall(r"^# TYPE (\w+) counter$", openmetrics, re.MULTILINE)
    assert counters and lint.returncode in (0, 3), lint.stderr.decode()
    assert set(lint.stderr.decode().splitlines()) <= {f"{name}_total no help text" for name in counters}


def test_failures_keep_their_traceback_and_are_counted(open_probe, caplog):
    def broken(*args: object) -> None:
        raise RuntimeError("broken on purpose")

    with EmbeddedCollector() as embedded, caplog.at_level(logging.ERROR, logger="gradwatch.collector"):
        server = embedded.server
        ws, _ = open_probe(embedded.ws_url, "failing")
        # An effect: the alert's history row cannot be written; ingest goes on.
        record = server.history.record
        server.history.record = broken
        streamed(ws, rec(1, nonfinite_layers=1))
        server.history.record = record
        streamed(ws, rec(2))
        # A detector: switched off for this run, the others go on; its traceback in the log.
        server.registry.runs["failing"].detectors[0].observe = broken
        streamed(ws, rec(3))
        # An HTTP handler: answered 500 with a JSON reason; the other endpoints still answer.
        status_counts = server.registry.status_counts
        server.registry.status_counts = broken
        status, _, body = get(embedded.http_url + "/metrics")
        assert status == 500 and "internal error" in json.loads(body)["error"]
        assert get(embedded.http_url + "/healthz")[0] == 200
        server.registry.status_counts = status_counts
        metrics = get(embedded.http_url + "/metrics")[2].decode()
    assert series(metrics, "gradwatch_run_step", run="failing") == 3
    assert {where: series(metrics, "gradwatch_collector_internal_errors_total", where=where)
            for where in ("effect", "http", "connection", "tick", "detector")} == {
        "effect": 1, "http": 1, "connection": 0, "tick": 0, "detector": 1}
    [detector_log] = [r.getMessage() for r in caplog.records if "is disabled for it" in r.getMessage()]
    assert "RuntimeError: broken on purpose" in detector_log and "Traceback (most recent call last)" in detector_log
    failures = [r for r in caplog.records if r.exc_info]
    assert [(r.getMessage(), str(r.exc_info[1])) for r in failures] == [
        ("the effect of AlertRaised on run failing failed", "broken on purpose"),
        ("GET /metrics failed", "broken on purpose"),
    ]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_serves_wss(start_collector, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    collector = start_collector(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    assert collector.ws_url.startswith("wss://")
    client_tls = ssl.create_default_context(cafile=str(cert))
    with connect(collector.ws_url, ssl=client_tls) as ws:
        ws.send(encode(Hello(v=PROTOCOL_VERSION, run="secure", layers=LAYERS)))
        assert isinstance(decode_collector_message(ws.recv(timeout=10)), Welcome)


def test_lr_find_and_landscape_results_are_kept_served_and_survive_a_restart(collector, open_probe):
    ws, _ = open_probe(collector.ws_url, "exp-lr-find", tags={"kind": "lr-find"})
    ws.send(steps(rec(1), rec(2)))
    ws.send(encode(LRFind(lrs=[1e-4, 1e-3], losses=[2.0, math.nan], smoothed=[2.0, math.nan], suggested_lr=1e-4,
                          alternative_lr=1e-5, min_loss_lr=1e-4, reason="the LR at the minimum / 10")))
    ws.send(encode(Landscape(step=2, alphas=[-1.0, 0.0, 1.0], losses=[[2.0, 1.0, 3.0]], centre=1.0,
                             directions=["random"], radius=1.0)))
    ws.send(encode(Bye()))
    ws.close()

    def results() -> dict | None:
        found = collector.get_json("/api/runs/exp-lr-find/series")["results"]
        return found if len(found) == 2 else None

    served = collector.wait_for(results, what="both results")
    assert served["lr_find"]["losses"] == [2.0, None] and served["lr_find"]["reason"] == "the LR at the minimum / 10"
    assert served["landscape"]["losses"] == [[2.0, 1.0, 3.0]]
    assert series(collector.metrics(), "gradwatch_collector_messages_total", type="lr_find") == 1
    collector.wait_for(lambda: collector.get_json("/api/runs")[0]["status"] == "finished", what="run finished")
    collector.kill()
    collector.start()
    assert collector.get_json("/api/runs/exp-lr-find/series")["results"] == served
