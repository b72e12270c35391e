"""The collector's ready signal: `gradwatch collector --ready-file PATH` writes

    {"ws_url": "ws://127.0.0.1:8765", "http_url": "http://127.0.0.1:9108", "pid": 1234}

to PATH once both ports listen (with the real ports when 0 asked for free ones), and removes
it when it stops. Whatever starts a collector (`gradwatch up`, the tests, the benchmark)
waits for it with `wait_for_ready_file`. Standard library only, so that a launcher need not
import the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Ready:
    ws_url: str
    http_url: str
    pid: int


class NotReady(RuntimeError):
    """The collector exited, or did not get ready in time; the message says which."""


def write_ready_file(path: Path, ready: Ready) -> None:
    """Write `path` whole or not at all: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.{ready.pid}.tmp")
    temporary.write_text(json.dumps(asdict(ready)) + "\n")
    os.replace(temporary, path)


def remove_ready_file(path: Path, pid: int) -> None:
    """Remove `path` if it is the signal of process `pid` (not a newer collector's)."""
    ready = _read(path)
    if ready is not None and ready.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def wait_for_ready_file(path: Path, process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float) -> Ready:
    """The signal `process` (the collector itself, not a wrapper around it) writes to `path`.
    A file an earlier process left there (killed, so it could not remove it) is not taken.
    Raises NotReady when the process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        ready = _read(path)
        if ready is not None and ready.pid == process.pid:
            return ready
        if (code := process.poll()) is not None:
            raise NotReady(f"exited with status {code} before it was ready")
        if time.monotonic() > deadline:
            raise NotReady(f"was not ready after {timeout:g} s")
        time.sleep(POLL_SECONDS)


def _read(path: Path) -> Ready | None:
    try:
        return Ready(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # not written yet, or not a ready file
        return None
