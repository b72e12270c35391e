"""The probe's transport: one background thread per run that turns measured steps into
protocol messages and ships them, so that no I/O ever happens on the training thread.

What to send, send again, shed and count is the outbox's (`outbox.py`, pure); this module is
the shell around it: the thread, the clock, and a sink, one of

- `WebSocketSink` (``ws://`` / ``wss://``): the websockets library's sync client; batched
  ``steps`` frames the collector confirms (``received``), heartbeats, actions received;
- `FileSink` (``file:PATH``): the same frames as JSON lines (an offline spool for
  ``gradwatch ingest``), delivered once written; ranks of a distributed run write ``PATH.rank<N>``.

Failures: a network failure (`NETWORK_ERRORS`) is retried with exponential backoff, the
records the collector never confirmed are sent again after the reconnect, and the outage is
logged once. A collector that refuses the token, or an address that answers plain HTTP, is
said once, with the fix, and not retried. Any other exception is a bug of the probe: logged
once with its traceback, after which the transport switches itself off. Switched off,
training goes on and every record it cannot send is counted as dropped.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Protocol

from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.sync.client import ClientConnection, connect

from gradwatch import protocol
from gradwatch.probe.outbox import Outbox, encode_frame
from gradwatch.protocol import Action, Bye, EncodedRecord, Hello, Received

log = logging.getLogger("gradwatch.probe")

Job = Callable[[], EncodedRecord | None]
# Messages that ride between the records, in order, unconfirmed (see outbox.py).
MESSAGES = (protocol.Ack, protocol.LRFind, protocol.Landscape)
Message = protocol.Ack | protocol.LRFind | protocol.Landscape

# A failure of the link, worth retrying; any other exception in the transport is a bug.
NETWORK_ERRORS = (OSError, TimeoutError, ConnectionClosed, InvalidURI, InvalidHandshake)

_CLOSE_CODES_NOT_WORTH_RETRYING_SOON = {protocol.CLOSE_UNAUTHORIZED, protocol.CLOSE_UNSUPPORTED_VERSION}
_CONFIRM_WAIT = 2.0  # seconds detach waits for the collector's last confirmations


class Sink(Protocol):
    """Where frames go: `open` (the hello included), `send`, `receive` what comes back until
    nothing more does within `wait` seconds, `keepalive` an idle link, `close`. The first
    three raise one of NETWORK_ERRORS when the link fails."""

    confirms: bool  # True: records stay in flight until the collector confirms them

    def open(self) -> None: ...
    def send(self, frame: str) -> None: ...
    def receive(self, wait: float) -> Iterator[Received | Action]: ...
    def keepalive(self) -> None: ...
    def close(self) -> None: ...


class WebSocketSink:
    confirms = True

    def __init__(self, url: str, hello: Hello, token: str | None, heartbeat_interval: float) -> None:
        self.url = url
        self._hello = hello
        self._headers = {"Authorization": f"Bearer {token}"} if token else None
        self._heartbeat_interval = heartbeat_interval
        self._ws: ClientConnection | None = None
        self._context = ExitStack()  # holds the open connection's context manager
        self._last_send = 0.0
        self._announced = False  # the run's page was said (once, not after each reconnect)

    def open(self) -> None:
        with ExitStack() as stack:  # closes the connection unless the greeting succeeds
            # No permessage-deflate: a 200-layer detailed frame deflates from 13 KB to 4 KB, for
            # ~0.5 ms of this host's CPU and ~0.1 ms of the collector's (docs/performance.md).
            ws = stack.enter_context(connect(
                self.url, additional_headers=self._headers, open_timeout=5, close_timeout=2, max_size=2**22,
                compression=None,
            ))
            ws.send(protocol.encode(self._hello))
            try:
                welcome = protocol.decode_collector_message(ws.recv(timeout=5))
            except protocol.ProtocolError as err:  # a websocket server, but not a collector
                raise ConnectionError(f"not a collector's greeting: {err.reason}") from err
            if not isinstance(welcome, protocol.Welcome):
                raise ConnectionError(f"expected a welcome from the collector, got {welcome.type}")
            self._ws = ws
            self._context = stack.pop_all()
        self._last_send = time.monotonic()
        if not self._announced:
            self._announced = True
            announce(welcome, self.url, self._hello.rank)

    def send(self, frame: str) -> None:
        assert self._ws is not None, "send before open"
        self._ws.send(frame)
        self._last_send = time.monotonic()

    def receive(self, wait: float) -> Iterator[Received | Action]:
        assert self._ws is not None, "receive before open"
        while True:
            try:
                data = self._ws.recv(timeout=wait)
            except TimeoutError:
                return  # nothing more for now
            try:
                message = protocol.decode_collector_message(data)
            except protocol.ProtocolError as err:
                log.warning("gradwatch: ignoring a message from the collector: %s", err.reason)
                continue
            yield message

    def keepalive(self) -> None:
        if time.monotonic() - self._last_send > self._heartbeat_interval:
            self.send(protocol.encode(protocol.Heartbeat(time=time.time())))

    def close(self) -> None:
        if self._ws is None:
            return
        self._ws = None
        try:
            self._context.close()
        except Exception:  # closing a broken socket may fail in any way; it is gone either way
            log.debug("gradwatch: closing the connection to %s failed", self.url, exc_info=True)


def announce(welcome: protocol.Welcome, url: str, rank: int) -> None:
    """One line on stderr once connected, naming the run and its page: a log record at INFO
    would be invisible under Python's default WARNING level. Rank 0 only; GRADWATCH_QUIET=1
    silences it."""
    if rank != 0 or os.environ.get("GRADWATCH_QUIET", "").lower() in ("1", "true", "yes"):
        return
    where = f"{welcome.http_url}/runs/{urllib.parse.quote(welcome.run, safe=':@+')}" if welcome.http_url else url
    print(f"gradwatch: run {welcome.run} is live at {where}", file=sys.stderr, flush=True)


class FileSink:
    confirms = False  # written is delivered

    def __init__(self, path: Path, hello: Hello) -> None:
        self.path = path
        self._hello = hello
        self._file: IO[str] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self.send(protocol.encode(self._hello))

    def send(self, frame: str) -> None:
        assert self._file is not None, "send before open"
        self._file.write(frame + "\n")
        self._file.flush()

    def receive(self, wait: float) -> Iterator[Received | Action]:
        return iter(())  # a file answers nothing

    def keepalive(self) -> None:
        """A file needs no heartbeat."""

    def close(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()
        except OSError:  # the write that failed already said why; the file is gone either way
            log.debug("gradwatch: closing the spool %s failed", self.path, exc_info=True)


def make_sink(url: str, hello: Hello, token: str | None, heartbeat_interval: float) -> Sink:
    if not url.startswith("file:"):
        return WebSocketSink(url, hello, token, heartbeat_interval)
    path = Path(url[len("file:"):])
    if hello.world_size > 1:  # one spool per rank: lines of ranks never interleave
        path = path.with_name(f"{path.name}.rank{hello.rank}")
    return FileSink(path, hello)


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
        self._on_action = on_action
        self._max_backlog = max_backlog
        self._flush_interval = flush_interval
        self._sink = make_sink(url, hello, token, heartbeat_interval)
        self._outbox = Outbox(max_records=max_records, max_detail_records=max_detail_records, batch_records=batch_size)
        # The outbox is not thread-safe: the background thread uses it under this lock, and
        # the training thread takes it only to count a drop.
        self._lock = threading.Lock()
        self._backlog: deque[Job | Message] = deque()  # training thread -> background thread
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._off = False  # switched off for the rest of the run: nothing is sent any more
        self._bye = Bye()

        self._thread = threading.Thread(target=self._loop, name=f"gradwatch-{hello.run}", daemon=True)
        self._thread.start()

    # ---- training-thread side: never blocks -------------------------------------------

    @property
    def dropped(self) -> int:
        """Records lost for good, over the whole run."""
        return self._outbox.dropped

    def backlog_full(self) -> bool:
        return self._off or len(self._backlog) >= self._max_backlog

    def submit(self, job: Job | Message) -> None:
        if self.backlog_full():
            if not isinstance(job, MESSAGES):  # a message is not a step: no drop to count
                self.count_drop()
            return
        self._backlog.append(job)

    def count_drop(self) -> None:
        with self._lock:
            self._outbox.count_drop()

    def close(self, status: str = "finished", reason: str = "", timeout: float = 5.0) -> None:
        """Flush what is buffered (for at most `timeout` seconds), say bye, stop the thread."""
        if self._stopping.is_set():
            return
        self._bye = Bye(status=status, reason=reason[:500])  # type: ignore[arg-type]
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            held = self._outbox.waiting + self._outbox.in_flight + len(self._backlog)
            log.warning("gradwatch: could not deliver %d buffered steps to %s within %.0fs; giving up",
                        held, self.url, timeout)
        elif self._off:
            self._discard_backlog()  # submitted as it switched off

    # ---- background thread ------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set() and not self._off:
                self._wake.wait(self._flush_interval)
                self._wake.clear()
                self._pump(final=False)
            if not self._off:
                self._pump(final=True)
                self._say_bye()
        except Exception:  # a bug of the probe must never take training down, nor be retried
            log.exception("gradwatch: the transport to %s failed on an internal error and is switched off; "
                          "training continues unmonitored, its steps counted as dropped", self.url)
            self._switch_off()
        finally:
            self._sink.close()

    def _pump(self, final: bool) -> None:
        self._drain_backlog()
        if self._connect(final):
            self._guarded(self._exchange)

    def _drain_backlog(self) -> None:
        while self._backlog:
            item = self._backlog.popleft()
            if isinstance(item, MESSAGES):
                with self._lock:
                    self._outbox.add_message(item)
                continue
            try:
                record = item()
            except Exception:  # the run's reading of one step failed: that step is lost, not the run
                log.exception("gradwatch: could not read a measured step; it is dropped")
                self.count_drop()
                continue
            if record is not None:
                with self._lock:
                    self._outbox.add(record)

    def _exchange(self) -> None:
        """Send what is ready, take in what came back, keep the link alive."""
        while True:
            with self._lock:
                frame = self._outbox.next_frame()
            if frame is None:
                break
            self._sink.send(encode_frame(frame))
            with self._lock:
                self._outbox.sent(frame, confirmed=not self._sink.confirms)
        self._receive(wait=0.0)
        self._sink.keepalive()

    def _receive(self, wait: float) -> None:
        for message in self._sink.receive(wait):
            if isinstance(message, Received):
                with self._lock:
                    self._outbox.confirm(message.step)
                    settled = not self._outbox.in_flight
                if wait and settled:
                    return
            else:
                self._on_action(message)

    def _say_bye(self) -> None:
        deadline = time.monotonic() + _CONFIRM_WAIT
        while self._outbox.in_flight and self._outbox.linked and time.monotonic() < deadline:
            self._guarded(lambda: self._receive(wait=0.1))
        with self._lock:
            undelivered = self._outbox.close()
        if undelivered:
            log.warning("gradwatch: %d steps could not be delivered to %s before detach; counted as dropped",
                        undelivered, self.url)
        if self._connect(final=True):
            bye = self._bye.model_copy(update={"dropped": self._outbox.dropped})
            self._guarded(lambda: self._sink.send(protocol.encode(bye)))

    # ---- the link -----------------------------------------------------------------------

    def _connect(self, final: bool) -> bool:
        """Whether the link is up, opening it when the backoff allows (or `final`)."""
        if self._off:
            return False
        with self._lock:
            if self._outbox.linked:
                return True
            if not (final or self._outbox.may_connect(time.monotonic())):
                return False
        if not self._guarded(self._sink.open):
            return False
        with self._lock:
            outage_ended = self._outbox.connected()
            waiting, dropped, stripped = self._outbox.waiting, self._outbox.dropped, self._outbox.detail_dropped
        if outage_ended:
            log.warning("gradwatch: reconnected to %s; sending %d buffered steps (%d dropped so far, %d "
                        "stripped of per-layer detail)", self.url, waiting, dropped, stripped)
        return True

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run one I/O step; False when the link failed (handled here)."""
        try:
            step()
        except NETWORK_ERRORS as err:
            self._link_failed(err)
            return False
        return True

    def _link_failed(self, err: Exception) -> None:
        self._sink.close()
        refusal = _refusal(err, self.url)
        if refusal is not None:
            log.warning("%s", refusal)
            self._switch_off()
            return
        slow = (isinstance(err, ConnectionClosed) and err.rcvd is not None
                and err.rcvd.code in _CLOSE_CODES_NOT_WORTH_RETRYING_SOON)
        with self._lock:
            outage_started = self._outbox.link_lost(time.monotonic(), slow=slow)
        if outage_started:
            log.warning(
                "gradwatch: collector at %s is unreachable (%s); training continues, buffering up "
                "to %d steps and retrying in the background",
                self.url, _explain(err), self._outbox.max_records,
            )
        else:
            log.debug("gradwatch: reconnect to %s failed: %s", self.url, _explain(err))

    def _switch_off(self) -> None:
        """Nothing more is sent for the rest of the run; what is held, and every step from
        now on, is counted as dropped."""
        self._off = True
        with self._lock:
            self._outbox.close()
        self._discard_backlog()
        self._sink.close()

    def _discard_backlog(self) -> None:
        while self._backlog:
            if not isinstance(self._backlog.popleft(), MESSAGES):
                self.count_drop()


def _refusal(err: Exception, url: str) -> str | None:
    """The one line to say when retrying cannot help: a refused token, or an HTTP server."""
    if not isinstance(err, InvalidStatus):
        return None
    status = err.response.status_code
    if status in (401, 403):
        return (f"gradwatch: the collector at {url} refused this probe's token (HTTP {status}); set "
                "GRADWATCH_TOKEN (or attach(token=...)) to the collector's token. Not retrying: training "
                "continues unmonitored, its steps counted as dropped")
    if status < 500 and status not in (408, 429):  # 5xx, timeouts and rate limits pass: retried
        return (f"gradwatch: {url} answered plain HTTP {status}, not a collector's websocket; point "
                "GRADWATCH_URL at the collector's ingest port, ws://HOST:8765 (its --port, not its "
                "--http-port). Not retrying: training continues unmonitored, its steps counted as dropped")
    return None


def _explain(err: Exception) -> str:
    if isinstance(err, ConnectionClosed) and err.rcvd is not None:
        return f"closed by the collector with code {err.rcvd.code}: {err.rcvd.reason or 'no reason given'}"
    if isinstance(err, InvalidStatus):
        return f"HTTP {err.response.status_code} during the websocket handshake"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused: is `gradwatch collector` running there?"
    return f"{type(err).__name__}: {err}"
