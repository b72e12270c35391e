"""Outbox tables: event sequences in, frames sent and drop counts out.

Events, as the transport (or `gradwatch ingest`) would feed them:

    ("record", 1, 3)      records of steps 1 to 3; ("record", 4, "*") a record with per-layer detail
    ("ack", "a")          a message (an action's ack)
    ("drop", n)           n records lost before they reached the outbox
    ("send",)             send every frame the outbox offers, until it offers none
    ("write",)            the same on a file: written is delivered
    ("confirm", step)     the collector's `received`
    ("link_lost",), ("reconnect",), ("close",)

Frames are written as the steps they carry ("1-3 4*": steps 1 to 3, then step 4 with its
detail), "+N dropped" when they report drops, or "ack a". After every event the harness
checks the outbox's invariants (its docstring): conservation, bounds, order. At the end, the
shell around it (`transport.py`): what it retries, and what it says once and stops.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.probe.outbox import (
    FIRST_RETRY,
    MAX_RETRY,
    MAX_SLOW_RETRY,
    Batch,
    Frame,
    Outbox,
)
from gradwatch.probe.transport import Transport
from gradwatch.protocol import PROTOCOL_VERSION, Ack, EncodedRecord, Hello, StepRecord


def record(step: int, detail: bool = False) -> EncodedRecord:
    layers = [1.0, 2.0] if detail else None
    return EncodedRecord.of(StepRecord(step=step, time=float(step), loss=1.0, layer_grad_sq=layers,
                                       layer_weight_sq=layers, layer_update_sq=layers,
                                       layer_frozen=[] if detail else None))


def describe(frame: Frame) -> str:
    if not isinstance(frame, Batch):
        assert isinstance(frame, Ack)
        return f"ack {frame.id}"
    runs: list[list[Any]] = []  # [first, last, detail]
    for r in frame.records:
        detail = r.detail
        if runs and runs[-1][1] == r.step - 1 and runs[-1][2] == detail:
            runs[-1][1] = r.step
        else:
            runs.append([r.step, r.step, detail])
    parts = [(f"{a}" if a == b else f"{a}-{b}") + ("*" if d else "") for a, b, d in runs]
    if frame.dropped:
        parts.append(f"+{frame.dropped} dropped")
    return " ".join(parts)


@dataclass
class Harness:
    """Feeds events to an outbox, collects what it sends, checks its invariants."""

    outbox: Outbox
    added: int = 0
    lost_before: int = 0  # count_drop's
    sent: list[str] = field(default_factory=list)
    confirmed_steps: set[int] = field(default_factory=set)
    in_flight_steps: list[int] = field(default_factory=list)  # sent, not confirmed, in order sent
    now: float = 0.0

    def feed(self, event: tuple[Any, ...]) -> None:
        kind, *args = event
        box = self.outbox
        if kind == "record":
            first, *rest = args
            last = next((a for a in rest if isinstance(a, int)), first)
            for step in range(first, last + 1):
                box.add(record(step, detail="*" in rest))
                self.added += 1
        elif kind == "ack":
            box.add_message(Ack(id=args[0], kind="reduce_lr", step=1, outcome="applied"))
        elif kind == "drop":
            box.count_drop(args[0])
            self.lost_before += args[0]
        elif kind in ("send", "write"):
            self.send_all(confirmed=kind == "write")
        elif kind == "confirm":
            box.confirm(args[0])
            self.confirmed_steps.update(s for s in self.in_flight_steps if s <= args[0])
            self.in_flight_steps = [s for s in self.in_flight_steps if s > args[0]]
        elif kind == "link_lost":
            box.link_lost(self.now)
            self.in_flight_steps = []
        elif kind == "reconnect":
            box.connected()
        elif kind == "close":
            box.close()
        else:
            raise AssertionError(f"unknown event {event}")
        self.check()

    def send_all(self, confirmed: bool = False) -> None:
        while (frame := self.outbox.next_frame()) is not None:
            assert self.outbox.next_frame() == frame  # offered, not taken, until sent
            self.outbox.sent(frame, confirmed=confirmed)
            self.sent.append(describe(frame))
            if isinstance(frame, Batch):
                steps = [r.step for r in frame.records]
                assert not set(steps) & self.confirmed_steps, f"confirmed steps sent again: {frame}"
                assert steps == sorted(steps) and (not self.in_flight_steps or not steps
                                                  or steps[0] > self.in_flight_steps[-1])
                if confirmed:
                    self.confirmed_steps.update(steps)
                else:
                    self.in_flight_steps += steps

    def check(self) -> None:
        box = self.outbox
        assert self.added + self.lost_before == box.delivered + box.dropped + box.waiting + box.in_flight
        assert box.waiting + len(box._unconfirmed) <= box.max_records
        assert box.in_flight <= box.max_records
        assert box._waiting.detailed == sum(r.detail for r in box._waiting)
        assert box._waiting.detailed <= box.max_detail_records
        waiting = [r.step for r in box._waiting]
        assert waiting == sorted(waiting)
        assert 0 <= box.unreported <= box.dropped


def run(events: list[tuple[Any, ...]], **options: Any) -> Harness:
    harness = Harness(Outbox(**{"batch_records": 2, **options}))
    for event in events:
        harness.feed(event)
    return harness


@dataclass
class Case:
    name: str
    events: list[tuple[Any, ...]]
    sent: list[str]
    dropped: int = 0
    detail_dropped: int = 0
    delivered: int | None = None  # None: not checked
    options: dict[str, Any] = field(default_factory=dict)


CASES = [
    # --- delivery and replay after a link loss
    Case("batches go in order and confirmed ones never again",
         [("record", 1, 5), ("send",), ("confirm", 5), ("link_lost",), ("reconnect",), ("send",)],
         sent=["1-2", "3-4", "5"], delivered=5),
    Case("after a link loss everything never confirmed is sent again, in order",
         [("record", 1, 6), ("send",), ("confirm", 2), ("link_lost",), ("record", 7), ("reconnect",), ("send",),
          ("confirm", 7)],
         sent=["1-2", "3-4", "5-6", "3-4", "5-6", "7"], delivered=7),
    Case("records buffered while the link is down go out once it is back",
         [("record", 1, 2), ("link_lost",), ("record", 3), ("reconnect",), ("send",)],
         sent=["1-2", "3"]),
    Case("two link losses in a row: the same records once more, nothing doubled",
         [("record", 1, 3), ("send",), ("link_lost",), ("reconnect",), ("send",), ("link_lost",), ("reconnect",),
          ("send",), ("confirm", 3)],
         sent=["1-2", "3", "1-2", "3", "1-2", "3"], delivered=3),
    Case("a file delivers what it writes: nothing to send again",
         [("record", 1, 3), ("write",), ("link_lost",), ("reconnect",), ("write",)],
         sent=["1-2", "3"], delivered=3),
    # --- messages keep their place
    Case("a message goes between the records added before and after it",
         [("record", 1, 2), ("ack", "a"), ("record", 3), ("send",)],
         sent=["1-2", "ack a", "3"]),
    Case("a message waits for the records before it that are sent again",
         [("record", 1, 2), ("send",), ("ack", "a"), ("link_lost",), ("reconnect",), ("send",)],
         sent=["1-2", "1-2", "ack a"]),
    Case("a message sent is gone: not sent again after a link loss",
         [("record", 1), ("ack", "a"), ("send",), ("link_lost",), ("reconnect",), ("send",)],
         sent=["1", "ack a", "1"]),
    # --- a full buffer: detail first, then the oldest records, counted exactly
    Case("the oldest waiting records are dropped beyond max_records, and the count rides along",
         [("record", 1, 5), ("reconnect",), ("send",)],
         sent=["3-4 +2 dropped", "5"], dropped=2, options={"max_records": 3}),
    Case("per-layer detail goes before any step is dropped, oldest first",
         [("record", 1, 3, "*"), ("send",)],
         sent=["1-2", "3*"], detail_dropped=2, options={"max_records": 4, "max_detail_records": 1}),
    Case("then whole steps: a dropped record's detail was already gone",
         [("record", 1, 5, "*"), ("send",)],
         sent=["2-3 +1 dropped", "4 5*"], dropped=1, detail_dropped=4,
         options={"max_records": 4, "max_detail_records": 1}),
    Case("records put back after a link loss are shed of detail too",
         [("record", 1, 2, "*"), ("send",), ("record", 3, "*"), ("link_lost",), ("reconnect",), ("send",)],
         sent=["1 2*", "1-2", "3*"], detail_dropped=2, options={"max_detail_records": 1}),
    Case("records in flight evicted to make room count as delivered when confirmed",
         [("record", 1, 3), ("send",), ("record", 4, 5), ("send",), ("confirm", 3), ("send",)],
         sent=["1-3", "4-5"], delivered=3, options={"max_records": 3, "batch_records": 3}),
    Case("records in flight evicted to make room are dropped when the link is lost",
         [("record", 1, 3), ("send",), ("record", 4, 5), ("link_lost",), ("reconnect",), ("send",)],
         sent=["1-3", "3-5 +2 dropped"], dropped=2, options={"max_records": 3, "batch_records": 3}),
    Case("no more than max_records in flight: the newest wait, the oldest waiting are dropped",
         [("record", 1, 2), ("send",), ("record", 3, 5), ("send",), ("confirm", 2), ("send",)],
         sent=["1-2", "+1 dropped", "4-5"], dropped=1, delivered=2, options={"max_records": 2}),
    # --- drops counted before the outbox
    Case("drops counted elsewhere ride on the next batch, or on one of their own",
         [("drop", 2), ("record", 1), ("send",), ("drop", 1), ("send",), ("send",)],
         sent=["1 +2 dropped", "+1 dropped"], dropped=3),
    # --- the end
    Case("close: what is held counts as dropped, and so does every later record",
         [("record", 1, 4), ("send",), ("confirm", 2), ("record", 5), ("ack", "a"), ("close",), ("record", 6),
          ("send",)],
         sent=["1-2", "3-4"], dropped=4, delivered=2),
    Case("close after everything was confirmed drops nothing",
         [("record", 1, 3), ("ack", "a"), ("send",), ("confirm", 3), ("close",)],
         sent=["1-2", "3", "ack a"], delivered=3),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outbox(case: Case) -> None:
    harness = run(case.events, **case.options)
    box = harness.outbox
    assert harness.sent == case.sent
    assert (box.dropped, box.detail_dropped) == (case.dropped, case.detail_dropped)
    if case.delivered is not None:
        assert box.delivered == case.delivered


def test_batches_end_at_the_record_that_reaches_batch_bytes() -> None:
    size = len(record(1).text)
    harness = run([("record", 1, 5), ("send",)], batch_records=10, batch_bytes=size + 1)
    assert harness.sent == ["1-2", "3-4", "5"]


def test_sent_refuses_a_frame_that_is_no_longer_the_next() -> None:
    box = Outbox(batch_records=2)
    box.add(record(1))
    stale = box.next_frame()
    assert stale is not None
    box.sent(stale)
    with pytest.raises(ValueError):
        box.sent(stale)
    assert (box.waiting, box.in_flight) == (0, 1)


# --- the link: backoff, and each outage said once --------------------------------------------

BACKOFF = [  # ("lost", seconds until the next attempt), ("slow", ...): a refusal retrying soon won't fix
    ("doubles from the first retry", [("lost", FIRST_RETRY), ("lost", 1), ("lost", 2), ("lost", 4)]),
    ("capped", [("lost", d) for d in (0.5, 1, 2, 4, 8, 16, MAX_RETRY, MAX_RETRY)]),
    ("a slow refusal may wait longer",
     [("slow", d) for d in (0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_SLOW_RETRY, MAX_SLOW_RETRY)]),
    ("back to the usual cap after a slow refusal", [("slow", 0.5), ("slow", 1), ("lost", 2), ("lost", 4)]),
    ("a connect starts over", [("lost", 0.5), ("lost", 1), ("lost", 2), ("connected",), ("lost", FIRST_RETRY)]),
]


@pytest.mark.parametrize("events", [e for _, e in BACKOFF], ids=[n for n, _ in BACKOFF])
def test_backoff(events: list[tuple[Any, ...]]) -> None:
    box = Outbox()
    now = 100.0
    assert box.may_connect(now)
    for kind, *delay in events:
        if kind == "connected":
            box.connected()
            continue
        box.link_lost(now, slow=kind == "slow")
        assert not box.may_connect(now + delay[0] - 1e-6) and box.may_connect(now + delay[0])
        now += delay[0]


def test_an_outage_starts_and_ends_once() -> None:
    box = Outbox()
    assert [box.link_lost(0.0), box.link_lost(1.0), box.connected(), box.connected(), box.link_lost(2.0)] == [
        True, False, True, False, True]
    assert not box.linked


# --- any sequence: the invariants hold, and the count is exact at the end ------------------

EVENT = st.one_of(
    st.tuples(st.just("record"), st.integers(1, 4), st.sampled_from(["", "*"])),
    st.tuples(st.just("ack")),
    st.tuples(st.just("drop"), st.integers(1, 3)),
    st.tuples(st.just("send")),
    st.tuples(st.just("confirm")),
    st.tuples(st.just("link_lost")),
    st.tuples(st.just("reconnect")),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(EVENT, max_size=60), max_records=st.integers(1, 8), max_detail=st.integers(0, 4),
       batch=st.integers(1, 4))
def test_any_sequence_keeps_the_invariants_and_counts_exactly(
    events: list[tuple[Any, ...]], max_records: int, max_detail: int, batch: int
) -> None:
    harness = Harness(Outbox(max_records=max_records, max_detail_records=max_detail, batch_records=batch))
    step = 0
    acks = 0
    for kind, *args in events:
        if kind == "record":
            count, detail = args
            harness.feed(("record", step + 1, step + count, detail))
            step += count
        elif kind == "ack":
            acks += 1
            harness.feed(("ack", f"a{acks}"))
        elif kind == "confirm":  # the collector confirms the oldest batch in flight
            if harness.in_flight_steps:
                harness.feed(("confirm", harness.in_flight_steps[min(batch, len(harness.in_flight_steps)) - 1]))
        else:
            harness.feed((kind, *args))
    harness.feed(("close",))
    box = harness.outbox
    assert harness.added + harness.lost_before == box.delivered + box.dropped
    assert box.delivered == len(harness.confirmed_steps)


# --- the transport around the outbox: what it retries and what it does not ------------------


def _transport(url: str, **kw: Any) -> Transport:
    hello = Hello(v=PROTOCOL_VERSION, run="shell", layers=["w"])
    return Transport(url, hello, lambda action: None, flush_interval=0.02, **kw)


def _submit_and_close(transport: Transport, steps: int) -> None:
    for step in range(1, steps + 1):
        transport.submit(lambda step=step: record(step))
        time.sleep(0.01)
    deadline = time.monotonic() + 10
    while not transport.backlog_full() and time.monotonic() < deadline:  # switched off: the backlog refuses
        time.sleep(0.01)
    transport.close(timeout=10)


def _said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("gradwatch")]


def test_a_bug_in_the_transport_is_logged_once_with_its_traceback_and_switches_it_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, spool: Path
) -> None:
    def broken(self: Outbox, frame: Frame, *, confirmed: bool = False) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Outbox, "sent", broken)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        transport = _transport(f"file:{spool}")
        _submit_and_close(transport, 5)
    [said] = _said(caplog)
    assert said.levelno == logging.ERROR and said.exc_info and said.exc_info[0] is ZeroDivisionError
    assert "switched off" in said.getMessage()
    assert transport.dropped == 5  # held when it failed, or refused after: every step counted


@pytest.mark.slow
@pytest.mark.parametrize("where, says", [
    ("the ingest port, without the token", "refused this probe's token (HTTP 401); set GRADWATCH_TOKEN"),
    ("the HTTP port", "answered plain HTTP 200, not a collector's websocket; point GRADWATCH_URL at"),  # GET / is the web view
])
def test_a_refusal_retrying_cannot_fix_is_said_once_and_not_retried(
    caplog: pytest.LogCaptureFixture, start_collector: Any, where: str, says: str
) -> None:
    collector = start_collector(env={"GRADWATCH_TOKEN": "s3cret"})
    url = collector.ws_url if "ingest" in where else collector.http_url.replace("http://", "ws://")
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        transport = _transport(url)
        _submit_and_close(transport, 5)
    [said] = _said(caplog)
    assert says in said.getMessage() and "Not retrying" in said.getMessage() and "\n" not in said.getMessage()
    assert not any("reconnect" in r.getMessage() or "unreachable" in r.getMessage() for r in caplog.records)
    assert transport.dropped == 5
