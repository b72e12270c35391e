"""The probe's delivery core, pure: no sockets, no files, no threads, no clock reads.

Records and messages go in, the frames to send come out, and what became of the link comes
back in. The outbox decides what to send next and what to send again, lets per-layer detail
go before whole records when memory runs short, and counts every record it loses.
`transport.py` runs it behind a websocket or a file; `gradwatch ingest` batches spools with it.

Events in (each returns at once; `now` is any monotonic clock, in seconds):

    add(record)            a measured step; steps increase in the order records are added
    add_message(message)   a frame without records (ack, heartbeat, bye)
    count_drop(n)          records lost before they reached the outbox
    sent(frame)            the frame `next_frame()` offered went out (`confirmed=True`: a
                           file, where written is delivered)
    confirm(step)          the collector took in every record up to `step` (`received`)
    link_lost(now)         the link failed (or could not be opened)
    connected()            the link is up
    close()                the end: whatever is still held counts as dropped, and nothing
                           more is offered

Out: `next_frame()` (a `Batch` of records, a message, or None), `may_connect(now)` (exponential
backoff), and the counters `dropped`, `detail_dropped`, `delivered` and `unreported`.

A record is *waiting* (not sent yet), then *in flight* (sent, not confirmed: kept whole, or
only its step once evicted to make room), then *delivered* or *dropped*. After every event:

1. Conservation: records added + `count_drop`'s == delivered + dropped + waiting + in
   flight. Nothing is counted twice: an evicted record counts as delivered if its
   confirmation comes, as dropped if its link is lost or the outbox closes first.
2. Memory: waiting + in flight kept whole <= max_records (beyond it, the oldest in-flight
   record is evicted, else the oldest waiting one dropped); in flight <= max_records (no
   batch is offered beyond that window), so the evicted steps are bounded as well.
3. Detail first: at most max_detail_records waiting records carry per-layer detail; beyond
   it, the oldest of them lose it (`detail_dropped`, not a drop). With max_detail_records
   below max_records (500 and 10 000 by default), detail goes long before whole records do.
4. Order: waiting and in-flight records keep the order they were added in; a lost link puts
   the in-flight ones back in front of the waiting ones, so they are sent again in order,
   and a confirmed record is never offered again.
5. A message leaves after the records added before it (still held) and before those added
   after it. Messages are not confirmed: once sent, they are gone. They are few (an ack
   per action the collector sent, an LR range test's verdict, a landscape grid per
   `run.landscape` call) and not bounded here.
6. `unreported` drops ride on the next batch offered (`Batch.dropped`, an empty batch if no
   record is ready), so the collector's count of the drops is the outbox's.

Records are `EncodedRecord`s, JSON text written once: a batch is their text joined
(`Batch.encode`), however often it is sent again, and shedding a record's detail cuts its
text short.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

from gradwatch.protocol import (
    MAX_RECORDS_PER_BATCH,
    Ack,
    Bye,
    EncodedRecord,
    Heartbeat,
    Landscape,
    LRFind,
    encode,
    encode_steps,
)

Message = Ack | Heartbeat | Bye | LRFind | Landscape

FIRST_RETRY = 0.5  # seconds before the first reconnect; doubled after each failure
MAX_RETRY = 30.0
MAX_SLOW_RETRY = 300.0  # after a refusal that retrying soon will not fix (e.g. a version refused)


@dataclass(frozen=True)
class Batch:
    """A `steps` frame the outbox offers: records it holds and the drops to report
    (`Steps.dropped`)."""

    records: tuple[EncodedRecord, ...]
    dropped: int = 0

    def encode(self) -> str:
        return encode_steps(self.records, self.dropped)


Frame = Batch | Message


def encode_frame(frame: Frame) -> str:
    return frame.encode() if isinstance(frame, Batch) else encode(frame)


def _has_detail(record: EncodedRecord) -> bool:
    return record.detail


class _Waiting:
    """Records not sent yet, oldest first; the only place that counts those with detail."""

    def __init__(self) -> None:
        self._records: deque[EncodedRecord] = deque()
        self.detailed = 0
        self._plain = 0  # how many records at the front are known to carry no detail

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[EncodedRecord]:
        return iter(self._records)

    def first(self) -> EncodedRecord | None:
        return self._records[0] if self._records else None

    def append(self, record: EncodedRecord) -> None:
        self._records.append(record)
        self.detailed += _has_detail(record)

    def put_back(self, records: deque[EncodedRecord]) -> None:
        """Older records, in order, in front of the others."""
        self._records.extendleft(reversed(records))
        self.detailed += sum(map(_has_detail, records))
        self._plain = 0

    def popleft(self) -> EncodedRecord:
        record = self._records.popleft()
        self.detailed -= _has_detail(record)
        self._plain = max(0, self._plain - 1)
        return record

    def strip_oldest_detail(self) -> None:
        # Frozen records: the stripped copy takes the record's place. The scan starts past
        # the records already known plain, so a long outage does not rescan the whole buffer.
        for i, record in enumerate(islice(self._records, self._plain, None), start=self._plain):
            if _has_detail(record):
                self._records[i] = record.without_detail()
                self.detailed -= 1
                self._plain = i + 1
                return

    def clear(self) -> None:
        self._records.clear()
        self.detailed = self._plain = 0


class Outbox:
    """What to send, what to send again, what to let go: see the module's docstring."""

    def __init__(
        self,
        *,
        max_records: int = 10_000,
        max_detail_records: int = 500,
        batch_records: int = 200,
        batch_bytes: int | None = None,
    ) -> None:
        """`batch_bytes`: a batch ends with the record that brings its encoded size there
        (None: batches are bounded by `batch_records` only, and nothing is encoded here)."""
        if max_records < 1 or max_detail_records < 0 or not 1 <= batch_records <= MAX_RECORDS_PER_BATCH:
            raise ValueError("need max_records >= 1, max_detail_records >= 0, "
                             f"1 <= batch_records <= {MAX_RECORDS_PER_BATCH}")
        self.max_records = max_records
        self.max_detail_records = max_detail_records
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes

        self._waiting = _Waiting()
        self._unconfirmed: deque[EncodedRecord] = deque()  # in flight, kept whole
        self._evicted: deque[int] = deque()  # steps of in-flight records let go to make room
        self._messages: deque[tuple[int, Message]] = deque()  # (last step added before it, message)
        self._last_step = -1
        self._closed = False

        self.dropped = 0  # records lost for good (changed in _drop only)
        self.detail_dropped = 0  # records that lost their per-layer detail
        self.delivered = 0  # records the collector confirmed (changed in confirm only)
        self._reported = 0  # drops carried by sent batches

        self.linked = False
        self._outage = False  # a link loss not followed by a connect yet
        self._retry_in = FIRST_RETRY
        self._next_attempt = -math.inf

    # ---- what it holds ----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._unconfirmed) + len(self._evicted)

    @property
    def unreported(self) -> int:
        return self.dropped - self._reported

    # ---- events in --------------------------------------------------------------------

    def add(self, record: EncodedRecord) -> None:
        if self._closed:
            self._drop(1)
            return
        self._last_step = record.step
        self._waiting.append(record)
        self._keep_bounds()

    def add_message(self, message: Message) -> None:
        if not self._closed:
            self._messages.append((self._last_step, message))

    def count_drop(self, n: int = 1) -> None:
        self._drop(n)

    def sent(self, frame: Frame, *, confirmed: bool = False) -> None:
        """`frame`, the one `next_frame()` offered, went out. A mismatch (the outbox changed
        in between) is a bug of the caller: ValueError, and nothing is changed."""
        if not isinstance(frame, Batch):
            if not self._messages or self._messages[0][1] is not frame:
                raise ValueError("sent() a message that is not the next one")
            self._messages.popleft()
            return
        head = list(islice(self._waiting, len(frame.records)))
        if len(head) != len(frame.records) or any(a is not b for a, b in zip(head, frame.records)):
            raise ValueError("sent() a batch that is not the next one")
        for _ in head:
            self._unconfirmed.append(self._waiting.popleft())
        self._reported += frame.dropped
        if confirmed and head:
            self.confirm(head[-1].step)

    def confirm(self, step: int) -> None:
        taken = 0
        while self._unconfirmed and self._unconfirmed[0].step <= step:
            self._unconfirmed.popleft()
            taken += 1
        while self._evicted and self._evicted[0] <= step:
            self._evicted.popleft()
            taken += 1
        self.delivered += taken

    def link_lost(self, now: float, *, slow: bool = False) -> bool:
        """What was never confirmed waits to be sent again (evicted records, gone, are
        dropped); the next attempt is backed off. True when this starts an outage."""
        self._drop(len(self._evicted))
        self._evicted.clear()
        self._waiting.put_back(self._unconfirmed)
        self._unconfirmed.clear()
        self._keep_bounds()
        self.linked = False
        self._next_attempt = now + self._retry_in
        self._retry_in = min(self._retry_in * 2, MAX_SLOW_RETRY if slow else MAX_RETRY)
        started, self._outage = not self._outage, True
        return started

    def connected(self) -> bool:
        """True when this ends an outage."""
        self.linked = True
        self._retry_in = FIRST_RETRY
        ended, self._outage = self._outage, False
        return ended

    def close(self) -> int:
        """Everything still held is dropped, and so is every later record; returns how many
        records were held."""
        held = self.waiting + self.in_flight
        self._drop(held)
        self._waiting.clear()
        self._unconfirmed.clear()
        self._evicted.clear()
        self._messages.clear()
        self._closed = True
        return held

    # ---- out --------------------------------------------------------------------------

    def may_connect(self, now: float) -> bool:
        return now >= self._next_attempt

    def next_frame(self) -> Frame | None:
        """What to send now, left in place until `sent(frame)`; None when nothing can go
        (after `close`, nothing: the bye carries the final count)."""
        if self._closed:
            return None
        barrier = self._messages[0][0] if self._messages else math.inf
        limit = min(self.batch_records, self.max_records - self.in_flight)
        records: list[EncodedRecord] = []
        size = 0
        for record in self._waiting:
            if len(records) >= limit or record.step > barrier:
                break
            records.append(record)
            if self.batch_bytes is not None:
                size += len(record.text)
                if size >= self.batch_bytes:
                    break
        if records or self.unreported:
            return Batch(tuple(records), self.unreported)
        first = self._waiting.first()
        if self._messages and (first is None or first.step > barrier):
            return self._messages[0][1]
        return None

    # ---- bookkeeping ------------------------------------------------------------------

    def _drop(self, n: int) -> None:
        self.dropped += n

    def _keep_bounds(self) -> None:
        # Records first: a record dropped now does not need its detail stripped.
        while len(self._waiting) + len(self._unconfirmed) > self.max_records:
            if self._unconfirmed:
                self._evicted.append(self._unconfirmed.popleft().step)
            else:
                self._waiting.popleft()
                self._drop(1)
        while self._waiting.detailed > self.max_detail_records:
            self._waiting.strip_oldest_detail()
            self.detail_dropped += 1
