"""One probe's websocket connection: the token at the handshake, the hello (version, run,
rank), a rate limit, and what its messages do to the registry.

A connection is refused with a websocket close code and a reason text that says what was
wrong (see gradwatch.protocol); each refusal is logged once and counted by reason. Nothing a
connection sends can affect another connection or another run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.metrics import IngestStats
from gradwatch.collector.registry import Event, Registry
from gradwatch.collector.run_state import RunState
from gradwatch.protocol import (
    CLOSE_INVALID_MESSAGE,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_VERSION,
    Ack,
    Bye,
    Heartbeat,
    Hello,
    Landscape,
    LRFind,
    ProtocolError,
    Received,
    Steps,
    check_version,
    decode_probe_message,
    encode,
)

log = logging.getLogger("gradwatch.collector")

# The reason label (gradwatch_collector_rejected_messages_total) of a protocol error's close code.
_REASON_BY_CODE = {
    CLOSE_INVALID_MESSAGE: "invalid_message",
    CLOSE_UNSUPPORTED_VERSION: "unsupported_version",
    CLOSE_TOO_BIG: "too_big",
}


class Refused(Exception):
    """Close this connection with `code` and `reason`; counted under `label`."""

    def __init__(self, code: int, label: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.label, self.reason = code, label, reason

    @classmethod
    def from_protocol(cls, err: ProtocolError, label: str | None = None) -> Refused:
        return cls(err.code, label or _REASON_BY_CODE.get(err.code, "invalid_message"), err.reason)


class RateLimit:
    """Token bucket: `rate` messages per second, bursts of up to twice that."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate, self.capacity = rate, 2 * rate
        self.tokens, self.updated = self.capacity, now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(eq=False)
class Peer:
    """One probe connection, bound to (run, rank) by its hello."""

    ws: ServerConnection
    hello: Hello
    run: RunState
    limit: RateLimit = field(repr=False)


class Peers:
    """The open probe connections by run and rank: a rank's newest connection only."""

    def __init__(self) -> None:
        self._by_run: dict[str, dict[int, Peer]] = {}

    def of(self, run: str) -> list[Peer]:
        return list(self._by_run.get(run, {}).values())

    def bind(self, peer: Peer) -> Peer | None:
        """Make `peer` its rank's connection; the one it replaces, if any."""
        ranks = self._by_run.setdefault(peer.hello.run, {})
        previous = ranks.get(peer.hello.rank)
        ranks[peer.hello.rank] = peer
        return previous

    def unbind(self, peer: Peer) -> bool:
        """Forget `peer`; False when a newer connection of its rank had replaced it."""
        ranks = self._by_run.get(peer.hello.run, {})
        if ranks.get(peer.hello.rank) is not peer:
            return False
        del ranks[peer.hello.rank]
        if not ranks:
            del self._by_run[peer.hello.run]
        return True


class Connections:
    """Serves each probe connection: `check_token` at the handshake, then `serve`. The
    registry's events go to `on_events` (history, actions) before a batch is confirmed."""

    def __init__(
        self,
        config: CollectorConfig,
        registry: Registry,
        stats: IngestStats,
        peers: Peers,
        on_events: Callable[[list[Event]], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.registry, self.stats, self.peers = config, registry, stats, peers
        self.on_events = on_events
        self.clock = clock
        self._closing: set[asyncio.Task[None]] = set()

    def check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake's answer: None lets it proceed, a 401 refuses a missing or wrong token."""
        token = self.config.server.token
        if token is None:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        self.stats.rejected["unauthorized"] += 1
        log.warning("refused connection from %s: missing or wrong token", _address(connection))
        return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")

    async def serve(self, ws: ServerConnection) -> None:
        self.stats.connections += 1
        peer: Peer | None = None
        try:
            peer = await self._greet(ws)
            async for frame in ws:
                if not peer.limit.allow(time.monotonic()):
                    rate = self.config.server.max_messages_per_second
                    raise Refused(CLOSE_POLICY, "rate_limited", f"rate limit exceeded: over {rate:g} messages/s")
                await self._dispatch(peer, decode_probe_message(frame))
        except Refused as refusal:
            await self._refuse(ws, refusal, peer)
        except ProtocolError as err:
            await self._refuse(ws, Refused.from_protocol(err), peer)
        except ConnectionClosed as closed:
            # websockets enforces max_size itself and closes with 1009; count and log it here.
            if closed.sent is not None and closed.sent.code == CLOSE_TOO_BIG:
                self._count_refusal(ws, Refused(CLOSE_TOO_BIG, "too_big", closed.sent.reason), peer)
        except Exception:  # a bug of ours: this connection ends, the others go on
            self.stats.internal_errors["connection"] += 1
            log.exception("handling %s failed", _who(peer))
            await _close(ws, CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self.stats.connections -= 1
            if peer is not None:
                self._forget(peer)

    async def _greet(self, ws: ServerConnection) -> Peer:
        timeout = self.config.retention.heartbeat_timeout
        try:
            async with asyncio.timeout(timeout):
                frame = await ws.recv()
        except TimeoutError:
            raise Refused(CLOSE_POLICY, "no_hello", f"no hello within {timeout:g} s") from None
        try:
            message = decode_probe_message(frame)
        except ProtocolError:
            _check_other_version(frame)
            raise
        if not isinstance(message, Hello):
            raise Refused(CLOSE_POLICY, "no_hello", f"the first message must be a hello, not {message.type}")
        check_version(message)
        try:
            joined = self.registry.hello(message, self.clock())
        except ProtocolError as err:
            raise Refused.from_protocol(err, "run_refused") from None
        self.stats.messages["hello"] += 1
        run = self.registry.runs[message.run]
        peer = Peer(ws, message, run, RateLimit(self.config.server.max_messages_per_second, time.monotonic()))
        previous = self.peers.bind(peer)
        if previous is not None:
            # A probe reconnecting before its old connection was noticed dead.
            closing = asyncio.create_task(previous.ws.close(CLOSE_POLICY, "superseded by a newer connection"))
            self._closing.add(closing)  # keep a reference until it is done
            closing.add_done_callback(self._closing.discard)
        await ws.send(encode(joined.welcome))
        for action in joined.actions:
            await ws.send(encode(action))
        await self.on_events(joined.events)
        return peer

    async def _dispatch(self, peer: Peer, message: Hello | Steps | Heartbeat | Ack | Bye | LRFind | Landscape) -> None:
        if self.registry.runs.get(peer.hello.run) is not peer.run:
            raise Refused(CLOSE_POLICY, "run_refused", f"run {peer.hello.run!r} was restarted or evicted")
        now = self.clock()
        name, rank = peer.hello.run, peer.hello.rank
        if isinstance(message, Hello):
            raise Refused(CLOSE_POLICY, "no_hello", "hello sent twice on one connection")
        if isinstance(message, Steps):
            if message.records:
                self.stats.ingest_lag_seconds = now - max(r.time for r in message.records)
            events = self.registry.steps(name, rank, message, now)
        elif isinstance(message, Heartbeat):
            events = self.registry.heartbeat(name, rank, now)
        elif isinstance(message, Ack):
            events = self.registry.ack(name, rank, message, now)
        elif isinstance(message, (LRFind, Landscape)):
            events = self.registry.result(name, rank, message, now)
        else:
            events = self.registry.bye(name, rank, message, now)
        self.stats.messages[message.type] += 1
        await self.on_events(events)
        if isinstance(message, Steps) and message.records:
            # Only now (alerts written to history) may the probe forget these records. A
            # probe that already closed must not cut short the frames it sent before (a bye).
            with contextlib.suppress(ConnectionClosed):
                await peer.ws.send(encode(Received(step=max(r.step for r in message.records))))

    async def _refuse(self, ws: ServerConnection, refusal: Refused, peer: Peer | None) -> None:
        self._count_refusal(ws, refusal, peer)
        await _close(ws, refusal.code, refusal.reason)

    def _count_refusal(self, ws: ServerConnection, refusal: Refused, peer: Peer | None) -> None:
        self.stats.rejected[refusal.label] += 1
        log.warning("closed %s from %s (%d, %s): %s", _who(peer), _address(ws), refusal.code, refusal.label,
                    refusal.reason)

    def _forget(self, peer: Peer) -> None:
        if self.peers.unbind(peer) and self.registry.runs.get(peer.hello.run) is peer.run:
            self.registry.disconnect(peer.hello.run, peer.hello.rank)


async def _close(ws: ServerConnection, code: int, reason: str) -> None:
    # A close frame's reason must fit in 123 bytes of UTF-8.
    closing = asyncio.create_task(ws.close(code, reason.encode()[:123].decode(errors="ignore")))
    # Discard what the peer sent before it saw our close frame: with the incoming queue
    # full, websockets stops reading and would never see the peer's close reply.
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass
    await closing


def _check_other_version(frame: str | bytes) -> None:
    """A hello from another protocol version may not validate against this version's models;
    answer it with the protocol's 'unsupported version' rather than a confusing validation
    error. Only a frame that failed validation is parsed again."""
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):  # not JSON, too deep: the validation error stands
        return
    if isinstance(data, dict) and data.get("type") == "hello" and isinstance(data.get("v"), int):
        # check_version reads only `v`; the rest of this hello is what did not validate.
        check_version(Hello.model_construct(v=data["v"]))


def _who(peer: Peer | None) -> str:
    return f"run {peer.hello.run} rank {peer.hello.rank}" if peer else "a new connection"


def _address(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"
