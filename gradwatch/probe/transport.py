"""The probe's transport: one background thread per run that turns measured steps into
protocol messages and ships them, so that no I/O ever happens on the training thread.

- ``ws://`` / ``wss://``: the websockets library's sync client; batched ``steps`` frames,
  reconnection with exponential backoff, actions received from the collector.
- ``file:PATH``: the same frames as JSON lines (an offline spool for ``gradwatch ingest``);
  ranks of a distributed run write ``PATH.rank<N>``.

Sent records are kept until the collector confirms it took them in (``received``); after a
reconnect the unconfirmed ones are sent again (the collector ignores steps it already has),
so a collector killed mid-batch loses nothing. Memory is bounded: while the collector is
unreachable, records are buffered up to ``max_records``; per-layer detail is the first thing let go (oldest first, beyond
``max_detail_records``), then the oldest records. Every drop is counted and reported to
the collector with the next batch, and logged once the link is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from gradwatch import protocol
from gradwatch.protocol import (
    Action,
    Bye,
    Heartbeat,
    Hello,
    Received,
    StepRecord,
    Steps,
    Welcome,
)

log = logging.getLogger("gradwatch.probe")

Job = Callable[[], StepRecord | None]

_CLOSE_CODES_NOT_WORTH_RETRYING_SOON = {protocol.CLOSE_UNAUTHORIZED, protocol.CLOSE_UNSUPPORTED_VERSION}


class Transport:
    def __init__(
        self,
        url: str,
        hello: Hello,
        on_action: Callable[[Action], None],
        *,
        token: str | None = None,
        max_records: int = 10_000,
        max_detail_records: int = 500,
        max_backlog: int = 4_096,
        flush_interval: float = 0.25,
        heartbeat_interval: float = 5.0,
        batch_size: int = 200,
    ) -> None:
        self.url = url
        self.hello = hello
        self._on_action = on_action
        self._token = token
        self._max_records = max_records
        self._max_detail_records = max_detail_records
        self._max_backlog = max_backlog
        self._flush_interval = flush_interval
        self._heartbeat_interval = heartbeat_interval
        self._batch_size = batch_size

        self._backlog: deque[Job | protocol.Ack] = deque()  # training thread -> background thread
        self._buffer: deque[StepRecord] = deque()  # records waiting to be sent
        self._unconfirmed: deque[StepRecord] = deque()  # sent, not yet confirmed by `received`
        # Steps of sent records let go before their confirmation (to stay within max_records):
        # dropped only if the collector never confirms them (the link fails first).
        self._evicted_unconfirmed: deque[int] = deque()
        self._detail_in_buffer = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._bye: Bye | None = None

        self.dropped = 0  # records lost for good, over the whole run
        self.detail_dropped = 0  # records that lost their per-layer detail
        self._dropped_unreported = 0
        self.sent = 0

        self._ws: ClientConnection | None = None
        self._ws_context = ExitStack()  # holds the open connection's context manager
        self._spool: IO[str] | None = None
        self._backoff = 0.5
        self._next_attempt = 0.0
        self._outage_warned = False
        self._last_send = time.monotonic()

        self._thread = threading.Thread(target=self._loop, name=f"gradwatch-{hello.run}", daemon=True)
        self._thread.start()

    # ---- training-thread side: never blocks -------------------------------------------

    def backlog_full(self) -> bool:
        return len(self._backlog) >= self._max_backlog

    def submit(self, job: Job | protocol.Ack) -> None:
        if self.backlog_full():
            self.count_drop()
            return
        self._backlog.append(job)

    def count_drop(self) -> None:
        self.dropped += 1
        self._dropped_unreported += 1

    def close(self, status: str = "finished", reason: str = "", timeout: float = 5.0) -> None:
        """Flush what is buffered (for at most `timeout` seconds), say bye, stop the thread."""
        if self._stopping.is_set():
            return
        self._bye = Bye(status=status, reason=reason[:500], dropped=self.dropped)  # type: ignore[arg-type]
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "gradwatch: could not deliver %d buffered steps to %s within %.0fs; giving up",
                len(self._buffer) + len(self._backlog), self.url, timeout,
            )

    # ---- background thread ------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.wait(self._flush_interval)
                self._wake.clear()
                self._pump(final=False)
            self._pump(final=True)
            self._say_bye()
        except Exception:  # the probe must never take training down, even through its own bug
            log.exception("gradwatch: transport stopped by an internal error; training continues unmonitored")
        finally:
            self._disconnect()

    def _pump(self, final: bool) -> None:
        self._drain_backlog()
        if not self._ensure_link(final):
            return
        while self._buffer:
            if not self._send_batch():
                return
        self._receive()
        if self._ws is not None and time.monotonic() - self._last_send > self._heartbeat_interval:
            self._send_frame(protocol.encode(Heartbeat(time=time.time())))

    def _drain_backlog(self) -> None:
        while self._backlog:
            item = self._backlog.popleft()
            if isinstance(item, protocol.Ack):
                self._send_frame(protocol.encode(item))
                continue
            try:
                record = item()
            except Exception:
                log.exception("gradwatch: could not read a measured step; it is dropped")
                self.count_drop()
                continue
            if record is not None:
                self._buffer_record(record)

    def _buffer_record(self, record: StepRecord) -> None:
        self._buffer.append(record)
        if record.layer_grad_sq is not None:
            self._detail_in_buffer += 1
        if self._detail_in_buffer > self._max_detail_records:
            self._strip_oldest_detail()
        while len(self._buffer) + len(self._unconfirmed) > self._max_records:
            if self._unconfirmed:
                self._evicted_unconfirmed.append(self._unconfirmed.popleft().step)
                if len(self._evicted_unconfirmed) > self._max_records:
                    self._evicted_unconfirmed.popleft()
                    self.count_drop()
            else:
                old = self._buffer.popleft()
                self._detail_in_buffer -= old.layer_grad_sq is not None
                self.count_drop()

    def _strip_oldest_detail(self) -> None:
        for i, old in enumerate(self._buffer):
            if old.layer_grad_sq is not None:
                self._buffer[i] = old.model_copy(
                    update={"layer_grad_sq": None, "layer_weight_sq": None, "layer_update_sq": None,
                            "layer_frozen": None}
                )
                self._detail_in_buffer -= 1
                self.detail_dropped += 1
                return

    # ---- link management ----------------------------------------------------------------

    def _ensure_link(self, final: bool) -> bool:
        if self._ws is not None or self._spool is not None:
            return True
        now = time.monotonic()
        if now < self._next_attempt and not final:
            return False
        try:
            if self.url.startswith("file:"):
                self._open_spool()
            else:
                self._connect()
        except Exception as err:  # noqa: BLE001 - every failure to connect is handled alike
            self._on_link_failure(err)
            return False
        if self._outage_warned:
            log.warning(
                "gradwatch: reconnected to %s; sending %d buffered steps (%d dropped so far, %d "
                "stripped of per-layer detail)",
                self.url, len(self._buffer), self.dropped, self.detail_dropped,
            )
        self._outage_warned = False
        self._backoff = 0.5
        return True

    def _open_spool(self) -> None:
        path = Path(self.url[len("file:"):])
        if self.hello.world_size > 1:  # one spool per rank: lines of ranks never interleave
            path = path.with_name(f"{path.name}.rank{self.hello.rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._spool = path.open("a", encoding="utf-8")
        self._write_line(protocol.encode(self.hello))

    def _connect(self) -> None:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        with ExitStack() as stack:  # closes the connection unless the greeting succeeds
            # No permessage-deflate: a 200-layer detailed frame deflates from 13 KB to 4 KB, for
            # ~0.5 ms of this host's CPU and ~0.1 ms of the collector's (docs/performance.md).
            ws = stack.enter_context(connect(
                self.url, additional_headers=headers, open_timeout=5, close_timeout=2, max_size=2**22,
                compression=None,
            ))
            ws.send(protocol.encode(self.hello))
            welcome = protocol.decode_collector_message(ws.recv(timeout=5))
            if not isinstance(welcome, Welcome):
                raise ConnectionError(f"expected a welcome from the collector, got {welcome.type}")
            self._ws = ws
            self._ws_context = stack.pop_all()

    def _on_link_failure(self, err: BaseException) -> None:
        self._requeue_unconfirmed()
        reason = _explain(err)
        delay_cap = 30.0
        if isinstance(err, ConnectionClosed) and err.rcvd is not None and err.rcvd.code in _CLOSE_CODES_NOT_WORTH_RETRYING_SOON:
            delay_cap = 300.0
        if isinstance(err, InvalidStatus) and err.response.status_code in (401, 403):
            delay_cap = 300.0
        if not self._outage_warned:
            log.warning(
                "gradwatch: collector at %s is unreachable (%s); training continues, buffering up "
                "to %d steps and retrying in the background",
                self.url, reason, self._max_records,
            )
            self._outage_warned = True
        else:
            log.debug("gradwatch: reconnect to %s failed: %s", self.url, reason)
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, delay_cap)
        self._disconnect()

    def _requeue_unconfirmed(self) -> None:
        """Records the collector never confirmed go back to the front of the buffer (those
        already let go are dropped now)."""
        while self._evicted_unconfirmed:
            self._evicted_unconfirmed.popleft()
            self.count_drop()
        while self._unconfirmed:
            record = self._unconfirmed.pop()
            self._buffer.appendleft(record)
            self._detail_in_buffer += record.layer_grad_sq is not None

    def _disconnect(self) -> None:
        if self._ws is not None:
            try:
                self._ws_context.close()
            except Exception as err:  # noqa: BLE001 - closing a broken socket may fail in any way
                log.debug("gradwatch: closing the connection to %s: %s", self.url, err)
            self._ws = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # ---- frames -----------------------------------------------------------------------

    def _send_batch(self) -> bool:
        batch = [self._buffer[i] for i in range(min(self._batch_size, len(self._buffer)))]
        frame = protocol.encode(Steps(records=batch, dropped=self._dropped_unreported))
        if not self._send_frame(frame):
            return False
        for _ in batch:
            old = self._buffer.popleft()
            self._detail_in_buffer -= old.layer_grad_sq is not None
            if self._ws is not None:
                self._unconfirmed.append(old)
        self._dropped_unreported = 0
        self.sent += len(batch)
        return True

    def _send_frame(self, frame: str) -> bool:
        if self._spool is not None:
            self._write_line(frame)
            return True
        if self._ws is None:
            return False
        try:
            self._ws.send(frame)
        except (ConnectionClosed, OSError, WebSocketException) as err:
            self._on_link_failure(err)
            return False
        self._last_send = time.monotonic()
        return True

    def _write_line(self, frame: str) -> None:
        assert self._spool is not None
        self._spool.write(frame + "\n")
        self._spool.flush()

    def _receive(self, wait: float = 0.0) -> None:
        """Takes in what the collector sent: confirmations and actions."""
        if self._ws is None:
            return
        while True:
            try:
                data = self._ws.recv(timeout=wait)
            except TimeoutError:
                return
            except (ConnectionClosed, OSError, WebSocketException) as err:
                self._on_link_failure(err)
                return
            try:
                message = protocol.decode_collector_message(data)
            except protocol.ProtocolError as err:
                log.warning("gradwatch: ignoring a message from the collector: %s", err.reason)
                continue
            if isinstance(message, Received):
                while self._unconfirmed and self._unconfirmed[0].step <= message.step:
                    self._unconfirmed.popleft()
                while self._evicted_unconfirmed and self._evicted_unconfirmed[0] <= message.step:
                    self._evicted_unconfirmed.popleft()
                if wait and not self._unconfirmed and not self._evicted_unconfirmed:
                    return
            elif isinstance(message, Action):
                self._on_action(message)

    def _say_bye(self) -> None:
        deadline = time.monotonic() + 2.0
        while (self._unconfirmed or self._evicted_unconfirmed) and self._ws is not None and time.monotonic() < deadline:
            self._receive(wait=0.1)
        undelivered = len(self._unconfirmed) + len(self._buffer) + len(self._evicted_unconfirmed)
        if undelivered:
            log.warning("gradwatch: %d steps could not be delivered to %s before detach; counted as dropped",
                        undelivered, self.url)
            for _ in range(undelivered):
                self.count_drop()
            self._unconfirmed.clear()
            self._evicted_unconfirmed.clear()
            self._buffer.clear()
        if self._bye is None or not self._ensure_link(final=True):
            return
        bye = self._bye.model_copy(update={"dropped": self.dropped})
        self._send_frame(protocol.encode(bye))


def _explain(err: BaseException) -> str:
    if isinstance(err, ConnectionClosed) and err.rcvd is not None:
        return f"closed by the collector with code {err.rcvd.code}: {err.rcvd.reason or 'no reason given'}"
    if isinstance(err, InvalidStatus):
        status = err.response.status_code
        hint = " (set GRADWATCH_TOKEN to the collector's token)" if status in (401, 403) else ""
        return f"HTTP {status} during the websocket handshake{hint}"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused: is `gradwatch collector` running there?"
    return f"{type(err).__name__}: {err}"

