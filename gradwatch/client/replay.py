"""`gradwatch ingest FILE...`: replay offline spools (the probe's `file:` mode) into a collector.

A distributed run spools one file per rank (`PATH.rank0`, `PATH.rank1`, ...): give them all
in one command, they are replayed concurrently so that the collector merges the ranks' steps
as it would have live. Each line of the spool is one probe frame, as it would have been sent over the socket; a
`hello` line starts a new connection. Lines are validated here first (a bad line is
reported and skipped, not sent, so it cannot cut the rest of its connection short), and
consecutive `steps` frames are coalesced into batches so a long spool stays well under the
collector's per-connection message rate. The probe's outbox does the batching, keeps every
other message in its place among the records, and tracks the collector's confirmations: a
connection ends once every record sent on it is confirmed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from gradwatch.probe.outbox import Batch, Frame, Outbox, encode_frame
from gradwatch.protocol import (
    MAX_RECORDS_PER_BATCH,
    Ack,
    Bye,
    EncodedRecord,
    Heartbeat,
    Hello,
    Landscape,
    LRFind,
    ProtocolError,
    Received,
    Steps,
    decode_collector_message,
    decode_probe_message,
    encode,
)

DEFAULT_WS_URL = "ws://127.0.0.1:8765"
MAX_BATCH_BYTES = 1024 * 1024  # stays well under the collector's default 4 MiB frame limit
PROGRESS_SECONDS = 0.5
CONFIRM_SECONDS = 10.0  # the longest wait for the collector's next confirmation

FollowUp = Steps | Heartbeat | Ack | Bye | LRFind | Landscape  # what a connection sends after its hello


@dataclass
class Summary:
    lines: int = 0
    sent: int = 0  # frames sent (after coalescing)
    connections: int = 0
    confirmed: int = 0  # records the collector confirmed
    rejected: list[str] = field(default_factory=list)  # "line N: why"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", metavar="FILE", type=Path, nargs="+",
                        help="JSONL spool written with GRADWATCH_URL=file:PATH (all ranks' files of a run together)")
    parser.add_argument("--url", default=DEFAULT_WS_URL, help=f"the collector's websocket address (default {DEFAULT_WS_URL})")
    parser.add_argument("--token", default=None, help="shared secret for the collector (default: $GRADWATCH_TOKEN)")
    parser.add_argument("--rate", type=float, default=500.0,
                        help="most frames sent per second per connection (default 500)")


def main(args: argparse.Namespace) -> int:
    """Replay offline JSONL spools into a collector, as if the probes had been connected."""
    token = args.token if args.token is not None else os.environ.get("GRADWATCH_TOKEN") or None
    spools = {}
    for path in args.files:
        try:
            spools[path] = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            print(f"gradwatch ingest: cannot read {path}: {err.strerror or err}", file=sys.stderr)
            return 2
    progress = sys.stderr if len(spools) == 1 else None  # one progress line makes sense for one file
    with ThreadPoolExecutor(max_workers=len(spools)) as pool:
        futures = {path: pool.submit(replay, lines, args.url, token, args.rate, progress)
                   for path, lines in spools.items()}
    failed = False
    for path, future in futures.items():
        try:
            summary = future.result()
        except (OSError, InvalidURI, InvalidStatus, TimeoutError) as err:
            print(f"gradwatch ingest: no collector at {args.url}: {err}", file=sys.stderr)
            return 1
        failed = failed or bool(summary.rejected)
        print(f"ingested {path}: {summary.lines} lines, {summary.sent} messages sent over "
              f"{summary.connections} connection(s), {len(summary.rejected)} rejected; "
              f"{summary.confirmed} steps confirmed by the collector")
        for reason in summary.rejected[:20]:
            print(f"  rejected {reason}")
        if len(summary.rejected) > 20:
            print(f"  ... and {len(summary.rejected) - 20} more")
    return 1 if failed else 0


def replay(lines: list[str], url: str, token: str | None, rate: float, progress: TextIO | None = None) -> Summary:
    """Send `lines` to the collector at `url`, one connection per hello, at most `rate`
    frames per second; each connection ends once the collector confirmed its records."""
    summary = Summary(lines=len(lines))
    pacer = _Pacer(rate)
    last_progress = 0.0
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for (hello_number, hello), segment in _segments(lines, summary):
        summary.connections += 1
        outbox, line_of = _fill(segment)
        with connect(url, additional_headers=headers, max_size=None, open_timeout=10) as ws:
            number = hello_number
            try:
                pacer.wait()
                ws.send(encode(hello))
                summary.sent += 1
                ws.recv(timeout=10)  # the welcome, or the hello's refusal
                while (frame := outbox.next_frame()) is not None:
                    number = _line(frame, line_of, number)
                    pacer.wait()
                    ws.send(encode_frame(frame))
                    outbox.sent(frame)
                    summary.sent += 1
                    _take_confirmations(ws, outbox, wait=0.0)
                    if progress is not None and time.monotonic() - last_progress >= PROGRESS_SECONDS:
                        last_progress = time.monotonic()
                        print(f"\ringest: line {number}/{summary.lines}, {summary.sent} messages sent, "
                              f"{len(summary.rejected)} rejected", end="", file=progress, flush=True)
                if outbox.in_flight:
                    _take_confirmations(ws, outbox, wait=CONFIRM_SECONDS)
                ws.close()
            except ConnectionClosed:
                pass
            if ws.close_code != 1000:  # the collector closed it: a refusal with its reason
                summary.rejected.append(f"line {number}: connection closed by the collector: "
                                        f"{ws.close_code} {ws.close_reason}")
            elif outbox.in_flight:
                summary.rejected.append(f"line {number}: {outbox.in_flight} steps sent but not confirmed by the "
                                        f"collector within {CONFIRM_SECONDS:g} s")
        summary.confirmed += outbox.delivered
    if progress is not None:
        print(file=progress)  # end the progress line
    return summary


def _fill(segment: list[tuple[int, FollowUp]]) -> tuple[Outbox, dict[int, int]]:
    """An outbox holding one connection's frames (large enough to never drop or shed one),
    and the spool line of each record and message, by id."""
    records = sum(len(message.records) for _, message in segment if isinstance(message, Steps))
    outbox = Outbox(max_records=max(1, records), max_detail_records=records,
                    batch_records=MAX_RECORDS_PER_BATCH, batch_bytes=MAX_BATCH_BYTES)
    line_of: dict[int, int] = {}
    for number, message in segment:
        if isinstance(message, Steps):
            for record in message.records:
                encoded = EncodedRecord.of(record)
                outbox.add(encoded)
                line_of[id(encoded)] = number
            outbox.count_drop(message.dropped)  # the probe's drops, forwarded with the next batch
        else:
            outbox.add_message(message)
            line_of[id(message)] = number
    return outbox, line_of


def _line(frame: Frame, line_of: dict[int, int], default: int) -> int:
    """The spool line a frame ends with (a batch of drops only: the line before)."""
    last = frame.records[-1] if isinstance(frame, Batch) and frame.records else frame
    return line_of.get(id(last), default)


def _take_confirmations(ws: ClientConnection, outbox: Outbox, wait: float) -> None:
    """Take in the collector's confirmations (actions are not replayed) until all came, or
    nothing more comes within `wait` seconds."""
    while outbox.in_flight:
        try:
            data = ws.recv(timeout=wait)
        except TimeoutError:
            return
        try:
            message = decode_collector_message(data)
        except ProtocolError as err:
            print(f"gradwatch ingest: ignoring a message from the collector: {err.reason}", file=sys.stderr)
            continue
        if isinstance(message, Received):
            outbox.confirm(message.step)


class _Pacer:
    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_send = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if self.next_send > now:
            time.sleep(self.next_send - now)
        self.next_send = max(now, self.next_send) + self.interval


def _segments(lines: list[str], summary: Summary) -> Iterator[tuple[tuple[int, Hello], list[tuple[int, FollowUp]]]]:
    """(line number, hello) and the validated messages that follow it, per connection."""
    hello: tuple[int, Hello] | None = None
    segment: list[tuple[int, FollowUp]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            message = decode_probe_message(line)
        except ProtocolError as err:
            summary.rejected.append(f"line {number}: {err.reason}")
            continue
        if isinstance(message, Hello):
            if hello is not None:
                yield hello, segment
            hello, segment = (number, message), []
        elif hello is None:
            summary.rejected.append(f"line {number}: {message.type} before any hello")
        else:
            segment.append((number, message))
    if hello is not None:
        yield hello, segment
