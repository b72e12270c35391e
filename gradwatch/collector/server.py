"""The collector process: the websocket ingest and HTTP ports around the pure registry.

One asyncio loop runs everything: the websockets server (probes, see `connections`), the
aiohttp app (/metrics, /healthz, /api/*, see `http_api`), and a periodic tick (heartbeat
timeouts). Registry calls are synchronous and short; what their events do (log lines,
history rows, actions sent) is in `effects`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable

from aiohttp import web
from websockets.asyncio.server import Server, serve

from gradwatch.collector.actions import ActionPlanner
from gradwatch.collector.config import CollectorConfig, ConfigError
from gradwatch.collector.connections import Connections, Peers
from gradwatch.collector.detectors import build_detectors
from gradwatch.collector.detectors.base import Detector
from gradwatch.collector.effects import Effects
from gradwatch.collector.history import History
from gradwatch.collector.http_api import MALFORMED_HTTP, HttpApi
from gradwatch.collector.metrics import IngestStats, MetricsCollector
from gradwatch.collector.registry import Registry

log = logging.getLogger("gradwatch.collector")

RUN_STATE_SAVE_SECONDS = 10.0  # how often running runs' progress is written to the data dir


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class CollectorServer:
    def __init__(
        self,
        config: CollectorConfig,
        detectors: Callable[[], list[Detector]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.stats = IngestStats()
        self.registry = Registry(
            config.retention,
            detectors or (lambda: build_detectors(config.detectors)),
            ActionPlanner(config.actions),
        )
        self.metrics = MetricsCollector(self.registry, self.stats, config, clock)
        self.peers = Peers()
        self.history: History | None = None
        self.effects: Effects | None = None  # both opened by start()
        self._ws_server: Server | None = None
        self._http_runner: web.AppRunner | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self.ws_url = ""
        self.http_url = ""

    async def start(self) -> None:
        """Open the history and bind both ports. Raises HistoryError, ConfigError (TLS files)
        or OSError (a port in use)."""
        cfg = self.config.server
        self.history = History(cfg.data_dir)
        effects = self.effects = Effects(self.config, self.registry, self.history, self.peers, self.stats, self.clock)
        tls = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"cannot load tls_cert/tls_key: {err}") from None
        connections = Connections(self.config, self.registry, self.stats, self.peers, effects.apply, self.clock)
        self._ws_server = await serve(
            connections.serve,
            cfg.host,
            cfg.port,
            max_size=cfg.max_frame_bytes,
            # Frames are handled as they arrive; a short queue bounds memory per connection
            # (max_queue x max_frame_bytes) when hundreds of probes connect.
            max_queue=4,
            # No keepalive pings: under load a pong waits behind unread frames and the ping
            # timeout would drop every connection at once. A silent probe is found by the
            # registry's heartbeat timeout instead (probes send heartbeats when idle).
            ping_interval=None,
            process_request=connections.check_token,
            ssl=tls,
            server_header="gradwatch",
        )
        ws_port = self._ws_server.sockets[0].getsockname()[1]
        http_sock = socket.create_server((cfg.host, cfg.http_port), reuse_port=False)
        logging.getLogger("aiohttp.server").addFilter(MALFORMED_HTTP)
        api = HttpApi(self.registry, self.history, effects.previous_runs, self.metrics, self.stats, effects.page)
        self._http_runner = web.AppRunner(api.app(), access_log=None)
        await self._http_runner.setup()
        await web.SockSite(self._http_runner, http_sock).start()
        http_port = http_sock.getsockname()[1]
        self.ws_url = f"{'wss' if tls else 'ws'}://{url_host(cfg.host)}:{ws_port}"
        self.http_url = f"http://{url_host(cfg.host)}:{http_port}"
        # What probes are told (each prints its run's page): where bound to every address,
        # this machine's name rather than 0.0.0.0.
        public_host = socket.getfqdn() if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        self.registry.http_url = f"http://{url_host(public_host)}:{http_port}"
        self._tick_task = asyncio.create_task(self._tick_forever(effects))
        log.info("gradwatch collector listening %s %s", self.ws_url, self.http_url)

    async def close(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self._ws_server is not None:
            self._ws_server.close()  # closes probe connections with 1001 (going away)
            await self._ws_server.wait_closed()
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        if self.effects is not None:
            self.effects.save_runs()
            self.effects.save_pages()
            self.effects = None
        if self.history is not None:
            self.history.close()
            self.history = None

    async def _tick_forever(self, effects: Effects) -> None:
        interval = min(1.0, self.config.retention.heartbeat_timeout / 4)
        last_save = self.clock()
        while True:
            await asyncio.sleep(interval)
            try:
                await effects.apply(self.registry.tick(self.clock()))
                if self.clock() - last_save >= RUN_STATE_SAVE_SECONDS:
                    effects.save_runs()
                    last_save = self.clock()
            except Exception:  # the tick must outlive any one failure
                self.stats.internal_errors["tick"] += 1
                log.exception("collector tick failed")
