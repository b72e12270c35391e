"""Shared fixtures: a real collector subprocess on free ports.

    def test_something(collector):            # started with defaults for tests
        collector.ws_url, collector.http_url  # ws://127.0.0.1:PORT, http://127.0.0.1:PORT
        collector.get_json("/api/runs")

    def test_other(start_collector):          # a factory, for custom config or several
        c = start_collector(config='[actions.plateau]\\naction = "reduce_lr"\\n')

Every collector started here uses a temporary data dir, a heartbeat timeout of 2 s and
finished-run grace of 2 s; all are stopped at the end of the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gradwatch.collector.ready import NotReady, wait_for_ready_file

TEST_HEARTBEAT_TIMEOUT = 2.0
TEST_GRACE_SECONDS = 2.0
START_TIMEOUT = 30.0


@dataclass
class CollectorProcess:
    """A `gradwatch collector` subprocess and how to talk to it."""

    data_dir: Path
    config_path: Path
    log_path: Path
    ready_path: Path
    extra_args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    ws_url: str = ""
    http_url: str = ""
    _log_offset: int = field(default=0, repr=False)

    def start(self) -> CollectorProcess:
        """Start (or restart on the same data dir and the same ports, once known)."""
        args = ["--config", str(self.config_path), "--data", str(self.data_dir), "--ready-file", str(self.ready_path)]
        if self.ws_url:  # restart: keep the ports so clients and the test can reconnect
            args += ["--port", self.ws_url.rsplit(":", 1)[1], "--http-port", self.http_url.rsplit(":", 1)[1]]
        else:
            args += ["--port", "0", "--http-port", "0"]
        args += self.extra_args  # last, so they win over the defaults above
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gradwatch", "collector", *args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        try:
            ready = wait_for_ready_file(self.ready_path, self.proc, START_TIMEOUT)
        except NotReady as err:
            raise RuntimeError(f"collector {err}:\n{self.logs()}") from None
        self.ws_url, self.http_url = ready.ws_url, ready.http_url
        return self

    def logs(self) -> str:
        """What this process (since its last start) wrote to stdout/stderr."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, body
        return body.decode()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        """Poll `predicate` until it returns something truthy (no timed assertions: the
        timeout only bounds a test that would otherwise hang)."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n--- collector log ---\n{self.logs()}")
            time.sleep(0.05)


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[..., CollectorProcess]]:
    """Factory: start_collector(config="TOML text", args=[...], env={...}) -> CollectorProcess.
    `config` is appended after the test defaults, so it may add sections (not repeat
    [retention])."""
    started: list[CollectorProcess] = []

    def start(config: str = "", args: list[str] | None = None, env: dict[str, str] | None = None,
              retention: str = "") -> CollectorProcess:
        n = len(started)
        config_path = tmp_path / f"collector{n}.toml"
        config_path.write_text(
            "[retention]\n"
            f"heartbeat_timeout = {TEST_HEARTBEAT_TIMEOUT}\n"
            f"finished_grace_seconds = {TEST_GRACE_SECONDS}\n"
            f"{retention}\n{config}"
        )
        process = CollectorProcess(
            data_dir=tmp_path / f"data{n}",
            config_path=config_path,
            log_path=tmp_path / f"collector{n}.log",
            ready_path=tmp_path / f"collector{n}.ready.json",
            extra_args=list(args or []),
            env={**os.environ, "GRADWATCH_TOKEN": "", **(env or {})},
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def collector(start_collector: Callable[..., CollectorProcess]) -> CollectorProcess:
    """A collector subprocess with the test defaults (no token, no actions policy)."""
    return start_collector()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """Where a probe writes its offline spool (`url=f"file:{spool}"`)."""
    return tmp_path / "spool.jsonl"
