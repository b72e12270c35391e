"""Hostile input: whatever a probe or an HTTP client sends, the collector answers it with a
clear refusal (a close code and a reason, or HTTP 400), stays up, keeps other runs flowing,
keeps its memory bounded and keeps /metrics valid exposition.

Part 1 fuzzes the pure decoder (fast, many examples); part 2 drives a real collector
subprocess (a sample of frames, fewer examples)."""

from __future__ import annotations

import http.client
import json
import math
import re
import signal
import socket
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gradwatch.protocol import (
    CLOSE_INVALID_MESSAGE,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_VERSION,
    LAYER_NAME_PATTERN,
    PROTOCOL_VERSION,
    RUN_NAME_PATTERN,
    SCALAR_NAME_PATTERN,
    Bye,
    Hello,
    ProtocolError,
    Received,
    StepRecord,
    Steps,
    decode_collector_message,
    decode_probe_message,
    encode,
)
from tests.test_collector_server import closed_with, promtool_check, series

DECODER_CODES = {CLOSE_INVALID_MESSAGE}  # the decoder alone only ever says "invalid"
HANG_GUARD_SECONDS = 60  # not a timing assertion: only turns a hang into a failure


@contextmanager
def no_hang(seconds: int = HANG_GUARD_SECONDS) -> Iterator[None]:
    def hung(signum: int, frame: Any) -> None:
        raise AssertionError(f"decoding did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_decoded(data: str | bytes) -> object:
    """The decoder's whole contract: a valid model, or ProtocolError(code, reason)."""
    with no_hang():
        try:
            message = decode_probe_message(data)
        except ProtocolError as err:
            assert err.code in DECODER_CODES, err.code
            assert isinstance(err.reason, str) and err.reason.strip(), "empty reason"
            # a reason, not an echo of the frame: one bounded line of printable ASCII
            assert len(err.reason) <= 450 and re.fullmatch(r"[\x20-\x7e]+", err.reason), err.reason
            return err
    # Whatever was accepted is safe to put in labels, SQLite and log lines.
    if isinstance(message, Hello):
        assert re.fullmatch(RUN_NAME_PATTERN, message.run)
        assert all(re.fullmatch(LAYER_NAME_PATTERN, layer) for layer in message.layers)
        assert all(re.fullmatch(SCALAR_NAME_PATTERN, key) for key in message.tags)
    if isinstance(message, Steps):
        for record in message.records:
            assert all(re.fullmatch(SCALAR_NAME_PATTERN, key) for key in record.scalars)
            assert 0 <= record.step < 2**63  # fits SQLite INTEGER and Prometheus
    # ... and survives its own encoding (what the collector echoes or stores).
    assert decode_probe_message(encode(message)).type == message.type  # type: ignore[arg-type]
    return message


# --- part 1: the decoder -----------------------------------------------------------------------

VALID = {
    "hello": {"type": "hello", "v": PROTOCOL_VERSION, "run": "r", "rank": 0, "world_size": 1,
              "layers": ["embed", "head"], "param_groups": 1, "tags": {"team": "x"}},
    "steps": {"type": "steps", "records": [{"step": 1, "time": 1.0, "loss": 0.5, "lr": [0.1],
                                            "scalars": {"val_loss": 0.6}, "layer_grad_sq": [1.0, None]}]},
    "heartbeat": {"type": "heartbeat", "time": 1.0},
    "ack": {"type": "ack", "id": "a1", "kind": "reduce_lr", "step": 3, "outcome": "applied"},
    "bye": {"type": "bye", "status": "finished"},
}

HOSTILE_STRINGS = [
    "", " ", "a\"b", "a\nb", "a\rb", "a\\b", "a\x00b", "a{b}", 'x="y",z', "é", "日本語", "\u202etxt",
    "\ud7ff", "🔥" * 50, "a" * 129, "a" * 300, "run=\"x\"} 1\nevil_metric 1", "# HELP x y", "\t", "-x",
]
HOSTILE_NUMBERS = [
    math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0, -1, 2**31, 2**63 - 1, 2**63, 2**64,
    10**30, -(10**30), 10**400,
]
leaf = st.one_of(
    st.none(), st.booleans(), st.sampled_from(HOSTILE_NUMBERS), st.integers(), st.floats(),
    st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40),
)
json_value = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


def _dumps(value: object) -> str:
    # allow_nan: NaN/Infinity travel as JSON constants; integers beyond float range as digits.
    return json.dumps(value, allow_nan=True)


@st.composite
def mutated_message(draw: st.DrawFn) -> str:
    """A valid message with one to three fields replaced, removed or added."""
    kind = draw(st.sampled_from(sorted(VALID)))
    message: dict[str, Any] = json.loads(json.dumps(VALID[kind]))
    target = message
    if kind == "steps" and draw(st.booleans()):
        target = message["records"][0]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted({*target, "v", "run", "layers", "scalars", "step", "extra"})))
        what = draw(st.sampled_from(["replace", "delete", "name"]))
        if what == "delete":
            target.pop(key, None)
        elif what == "name" and key in ("layers",):
            target[key] = draw(st.lists(st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=20), max_size=5))
        elif what == "name":
            target[key] = {draw(st.sampled_from(HOSTILE_STRINGS)): draw(leaf)}
        else:
            target[key] = draw(json_value)
    return _dumps(message)


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


DEEP = [
    nested(100_000),  # 100k nested arrays
    nested(100_000)[:-1],  # ... unterminated
    '{"a":' * 100_000 + "1" + "}" * 100_000,  # 100k nested objects
    '{"type":"hello","v":4,"run":"r","layers":' + nested(100_000) + "}",
    '{"type":"steps","records":[{"step":1,"time":1,"scalars":' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}]}",
]


@pytest.mark.parametrize("frame", DEEP, ids=["arrays", "unterminated", "objects", "in-layers", "in-scalars"])
def test_deep_nesting_is_refused_without_recursing(frame: str) -> None:
    result = check_decoded(frame)
    assert isinstance(result, ProtocolError)
    assert "recursion limit" in result.reason  # the parser stops at depth 200, long before the stack


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=200))
@example(b"\xff\xfe\x00")
@example("")
@example('{"type":"hello"')
def test_arbitrary_text_and_bytes(data: str | bytes) -> None:
    check_decoded(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_message())
@example(_dumps({**VALID["hello"], "v": 99, "new_field": {"x": [1]}}))  # unknown version, extra field
@example(_dumps({**VALID["hello"], "v": "1"}))  # version as a string
@example(_dumps({**VALID["hello"], "run": "a\x00b"}))
@example(_dumps({**VALID["hello"], "layers": ["a\nb", 'x"y']}))
@example(_dumps({"type": "steps", "records": [{"step": 10**30, "time": 1.0}]}))  # beyond SQLite INTEGER
@example(_dumps({"type": "steps", "records": [{"step": 1, "time": 1.0, "scalars": {"ünï": 1.0}}]}))
@example(_dumps({"type": "steps", "records": [{"step": 1, "time": math.nan, "loss": 10**400}]}))
@example(_dumps({"type": "ack", "id": "x" * 65, "kind": "reduce_lr", "step": 1, "outcome": "applied"}))
@example(_dumps({"type": "steps", "records": [{"step": 1, "time": 1.0}] * 1001}))
def test_structured_hostile_json(frame: str) -> None:
    check_decoded(frame)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(HOSTILE_NUMBERS) | st.floats() | st.integers(),
    st.sampled_from(["step", "time", "loss", "grad_norm_sq", "loss_scale", "step_time", "nonfinite_layers"]),
)
def test_hostile_numbers_in_every_numeric_field(value: object, key: str) -> None:
    record: dict[str, Any] = {"step": 1, "time": 1.0, key: value}
    result = check_decoded(_dumps({"type": "steps", "records": [record]}))
    if isinstance(result, Steps) and key in ("step", "nonfinite_layers"):
        assert getattr(result.records[0], key) == value  # integers are taken exactly or refused


# --- part 2: a live collector ------------------------------------------------------------------

pytest_live = pytest.mark.slow


def _hello(run: str, **kw: object) -> str:
    return encode(Hello(v=PROTOCOL_VERSION, run=run, layers=kw.pop("layers", ["a", "b"]), **kw))  # type: ignore[arg-type]


def _steps(step: int, **kw: object) -> str:
    return encode(Steps(records=[StepRecord(step=step, time=time.time(), loss=1.0, grad_norm_sq=1.0, **kw)]))  # type: ignore[arg-type]


RAW_STEPS = '{{"type":"steps","records":[{{"step":{step},"time":1.0{extra}}}]}}'

HOSTILE_FRAMES: list[tuple[str, list[str | bytes], set[int]]] = [
    # (name, frames, acceptable close codes)
    ("100k nested arrays", [nested(100_000)], {CLOSE_INVALID_MESSAGE}),
    ("nested layers in hello", ['{"type":"hello","v":4,"run":"r","layers":' + nested(20_000) + "}"],
     {CLOSE_INVALID_MESSAGE}),
    ("invalid utf-8 binary frame", [b"\xff\xfe{\x00"], {CLOSE_INVALID_MESSAGE}),
    ("empty frame", [""], {CLOSE_INVALID_MESSAGE}),
    ("NUL in run name", ['{"type":"hello","v":4,"run":"a\\u0000b","layers":[]}'], {CLOSE_INVALID_MESSAGE}),
    ("series injection in layer",
     ['{"type":"hello","v":4,"run":"inj","layers":["x\\"} 1\\nevil 1"]}'], {CLOSE_INVALID_MESSAGE}),
    ("unicode run name", ['{"type":"hello","v":4,"run":"日本","layers":[]}'], {CLOSE_INVALID_MESSAGE}),
    ("NaN version", ['{"type":"hello","v":NaN,"run":"r","layers":[]}'], {CLOSE_INVALID_MESSAGE}),
    ("version as string", ['{"type":"hello","v":"999","run":"r","layers":[]}'],
     {CLOSE_INVALID_MESSAGE, CLOSE_UNSUPPORTED_VERSION}),  # lax: "999" reads as version 999
    ("huge version", ['{"type":"hello","v":' + "9" * 30 + ',"run":"r","layers":[]}'],
     {CLOSE_INVALID_MESSAGE, CLOSE_UNSUPPORTED_VERSION}),
    ("rank beyond world", [_hello("ranky", rank=5, world_size=2)], {CLOSE_POLICY}),
    ("digits beyond int limits", [_hello("digits"), RAW_STEPS.format(step="9" * 5000, extra="")],
     {CLOSE_INVALID_MESSAGE}),
    ("step beyond 2**63", [_hello("bigstep"), RAW_STEPS.format(step=10**30, extra=',"nonfinite_layers":1')],
     {CLOSE_INVALID_MESSAGE}),
    ("1001 records", [_hello("many"), _dumps({"type": "steps", "records": [{"step": 1, "time": 1.0}] * 1001})],
     {CLOSE_INVALID_MESSAGE}),
    ("unicode scalar", [_hello("uscalar"), RAW_STEPS.format(step=1, extra=',"scalars":{"ü":1}')],
     {CLOSE_INVALID_MESSAGE}),
    ("layer vector too long", [_hello("vec"), RAW_STEPS.format(step=1, extra=',"layer_grad_sq":' + "[1.0" + ",1.0" * 20_000 + "]")],
     {CLOSE_INVALID_MESSAGE}),
    ("extra field after hello", [_hello("extra"), '{"type":"heartbeat","time":1,"evil":true}'],
     {CLOSE_INVALID_MESSAGE}),
    ("second hello", [_hello("twice"), _hello("twice")], {CLOSE_POLICY}),
    ("log forging in type", ['{"type":"x\\nFORGED 1 ERROR gradwatch.collector: fake"}'], {CLOSE_INVALID_MESSAGE}),
    ("log forging in key", [_hello("forge"), '{"type":"heartbeat","time":1,"\\r\\nFORGED\\u0000":1}'],
     {CLOSE_INVALID_MESSAGE}),
]


@pytest_live
def test_hostile_frames_are_refused_while_a_good_client_streams(start_collector) -> None:
    collector = start_collector("[server]\nmax_frame_bytes = 1048576\n")
    refused: dict[str, tuple[int, str]] = {}
    with connect(collector.ws_url) as good:
        good.send(_hello("good"))
        good.recv(timeout=10)  # welcome
        for step, (name, frames, codes) in enumerate(HOSTILE_FRAMES, start=1):
            good.send(_steps(step))
            with connect(collector.ws_url, max_size=None) as bad:
                try:
                    for frame in frames:
                        bad.send(frame)
                except ConnectionClosed:
                    pass
                code, reason = closed_with(bad)
            refused[name] = (code, reason)
            # The good client's step was taken in meanwhile (confirmed by `received`).
            assert decode_collector_message(good.recv(timeout=10)) == Received(step=step), name
            assert code in codes, (name, code, reason)
            assert reason.strip(), name
        good.send(_steps(len(HOSTILE_FRAMES) + 1))
        good.send(encode(Bye()))
    print("\nrefusals:", json.dumps(refused, indent=1, ensure_ascii=False))
    runs = collector.wait_for(
        lambda: [r for r in collector.get_json("/api/runs") if r["name"] == "good" and r["status"] == "finished"],
        what="the good run to finish")
    assert runs[0]["last_step"] == len(HOSTILE_FRAMES) + 1  # every step of the good client arrived
    metrics = collector.metrics()
    promtool_check(metrics)
    assert series(metrics, "gradwatch_steps_total", run="good") == len(HOSTILE_FRAMES) + 1
    assert "evil" not in metrics and "Traceback" not in collector.logs()
    assert not any(line.startswith("FORGED") for line in collector.logs().splitlines())  # no forged log line
    assert collector.proc.poll() is None
    # Nothing the refused connections sent reached the alert history: runs that said a valid
    # hello and were then refused are only ever marked lost (no bye).
    assert {e["kind"] for e in collector.get_json("/api/alerts")} <= {"run_lost"}


EXTREMES = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0]


@pytest_live
def test_metrics_stay_valid_after_hostile_but_valid_values(collector) -> None:
    # The widest names the protocol allows: every permitted punctuation, maximum lengths.
    run = "R0._:@+-" + "z" * 120
    layers = ["x[0]<lambda>/y:z-_.", "L" * 200, "a.b.c", "0"]
    scalars = {"a/b.c:d-e": math.inf, "_": math.nan, "s" * 64: -1e308}
    tags = {"team": 'é"\n\\ 日本 \x00 🔥', "x": "} 1\nevil 1"}  # tag values are free text (never labels)
    with connect(collector.ws_url) as ws:
        ws.send(encode(Hello(v=PROTOCOL_VERSION, run=run, layers=layers, param_groups=2, tags=tags,
                             started=math.nan, host="h\n\"ost")))
        ws.recv(timeout=10)
        for step, value in enumerate(EXTREMES, start=1):
            ws.send(encode(Steps(records=[StepRecord(
                step=step, time=value, step_time=abs(value) if not math.isnan(value) else None, loss=value,
                grad_norm_sq=value, grad_norm_preclip=value, loss_scale=value, lr=[value, 1e-300],
                momentum=[value, None], weight_decay=[None, value], scalars=scalars, nonfinite_layers=step,
                layer_grad_sq=[value, None, value, 0.0], layer_weight_sq=[value] * 4, layer_update_sq=[value] * 4,
            )], dropped=2**62)))

        def all_steps() -> str | None:
            metrics = collector.metrics()
            return metrics if series(metrics, "gradwatch_steps_total", run=run) == len(EXTREMES) else None

        metrics = collector.wait_for(all_steps, what="all extreme steps")
    promtool_check(metrics)
    assert "evil" not in metrics
    [listed] = [r for r in collector.get_json("/api/runs") if r["name"] == run]
    assert listed["tags"] == tags  # returned as JSON data, intact
    assert collector.get_json(f"/api/alerts?run={urllib.parse.quote(run)}")  # nonfinite fired, stored, served
    assert collector.proc.poll() is None


def _raw_get(collector, path: str) -> tuple[int, bytes]:
    host, port = collector.http_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _raw_request_line(collector, line: bytes) -> int:
    """Send one request with a raw request line; the status code of the answer."""
    host, port = collector.http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


query_key = st.one_of(st.sampled_from(["run", "after", "limit", "status"]),
                      st.sampled_from(["Run", "run[]", "", "évil", "a" * 300, "run\x00"]), st.text(max_size=8))
query_value = st.one_of(
    st.text(max_size=30), st.sampled_from(HOSTILE_STRINGS),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from(["0", "1", "10000", "10001", "-1", "1e3", "0x10", " 1", "1 ", "NaN", "inf", "9" * 25,
                     "2" * 19, "running", "lost", "a" * 129, "a" * 128]),
)
raw_query = st.sampled_from([
    "%ff%fe", "run=%00", "run=%0a", "a=%", "&&&", "=", "run", "run=&run=x", ";;", "limit=1;after=2", "%",
    "run=" + "%e2%80%ae" * 20, "after=" + "9" * 5000, "limit=" + "1" * 100,
])


@pytest_live
def test_fuzzed_query_parameters_get_200_or_400_json(collector) -> None:
    with connect(collector.ws_url) as ws:  # something to list
        ws.send(_hello("listed"))
        ws.recv(timeout=10)
        ws.send(_steps(1, nonfinite_layers=1))
        collector.wait_for(lambda: collector.get_json("/api/alerts"), what="an alert")
    answers: dict[int, int] = {}

    def check(path: str) -> None:
        status, body = _raw_get(collector, path)
        answers[status] = answers.get(status, 0) + 1
        assert status in (200, 400), (path, status, body[:300])
        if path.startswith("/api/"):
            parsed = json.loads(body)
            assert isinstance(parsed, list) if status == 200 else parsed["error"], (path, body[:300])

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["/api/alerts", "/api/runs", "/metrics"]),
           st.lists(st.tuples(query_key, query_value), max_size=3), raw_query | st.just(""))
    def fuzz(endpoint: str, pairs: list[tuple[str, str]], raw: str) -> None:
        query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
        check(endpoint + "?" + "&".join(q for q in (query, raw) if q))

    fuzz()
    for path in ("/api/alerts?run=listed&after=0&limit=10000", "/api/alerts?limit=10001", "/api/runs?status=lost",
                 "/api/alerts?after=" + str(2**62 + 1), "/api/alerts?run=listed&run=listed"):
        check(path)
    # Malformed below the query string (raw bytes, NUL, a request line over aiohttp's 8190
    # bytes) is refused by the HTTP parser itself: a plain-text 400, and the collector stays up.
    for target in (b"/api/alerts?run=" + b"a" * 10_000, b"/api/alerts?run=\xff\xfe", b"/api/runs?status=\x00"):
        status = _raw_request_line(collector, b"GET " + target + b" HTTP/1.1")
        answers[status] = answers.get(status, 0) + 1
        assert status == 400, (target[:40], status)
    print("\nHTTP answers by status:", answers)
    assert collector.proc.poll() is None
    assert collector.get_json("/healthz")["status"] == "ok"
    assert "Traceback" not in collector.logs() and "Error handling request" not in collector.logs()


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest_live
@pytest.mark.parametrize("max_frame, code", [(None, CLOSE_TOO_BIG), (32 * 2**20, CLOSE_INVALID_MESSAGE)],
                         ids=["default-frame-limit", "32MiB-frame-limit"])
def test_a_million_layers_is_refused_with_bounded_memory(start_collector, max_frame, code) -> None:
    collector = start_collector(f"[server]\nmax_frame_bytes = {max_frame}\n" if max_frame else "")
    pid = collector.proc.pid
    before = _rss_kib(pid)
    frame = encode(Hello.model_construct(v=PROTOCOL_VERSION, run="wide", layers=[f"l{i}" for i in range(1_000_000)]))
    with connect(collector.ws_url) as good:  # a live neighbour keeps flowing meanwhile
        good.send(_hello("neighbour"))
        good.recv(timeout=10)
        with connect(collector.ws_url, max_size=None, close_timeout=30) as bad:
            try:
                bad.send(frame)
            except ConnectionClosed:
                pass
            got, reason = closed_with(bad)
        good.send(_steps(1))
        good.send(encode(Bye()))
    after, peak = _rss_kib(pid), _rss_kib(pid, "VmHWM")
    print(f"\n1M-layer hello ({len(frame) / 2**20:.1f} MiB, max_frame_bytes={max_frame}): closed {got} "
          f"{reason!r}; collector RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")
    assert got == code and reason
    assert peak < 1024 * 1024, f"collector peak RSS {peak} KiB"
    collector.wait_for(lambda: any(r["name"] == "neighbour" and r["last_step"] == 1
                                   for r in collector.get_json("/api/runs")), what="the neighbour's step")
    assert all(r["name"] != "wide" for r in collector.get_json("/api/runs"))
    promtool_check(collector.metrics())

