"""The in-process collector: the demo and tests run one in a thread of their own process."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from typing import Self

from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.server import CollectorServer


class EmbeddedCollector:
    """A collector running in a daemon thread of this process (the demo, tests)::

        with EmbeddedCollector() as collector:
            run = gradwatch.attach(model, opt, url=collector.ws_url)
            ...
            requests.get(collector.http_url + "/metrics")

    Without a config it listens on free loopback ports and keeps its history in a temporary
    directory removed by `stop()`.
    """

    def __init__(self, config: CollectorConfig | None = None, start_timeout: float = 30.0) -> None:
        self._tempdir: str | None = None
        if config is None:
            self._tempdir = tempfile.mkdtemp(prefix="gradwatch-")
            config = CollectorConfig.model_validate(
                {"server": {"port": 0, "http_port": 0, "data_dir": self._tempdir}}
            )
        self.server = CollectorServer(config)
        self._start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="gradwatch-collector", daemon=True)

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    def start(self) -> EmbeddedCollector:
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise RuntimeError("the embedded collector did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as err:  # noqa: BLE001 - handed to the starting thread, which raises it
            self._error = err
            self._ready.set()
            await self.server.close()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()
