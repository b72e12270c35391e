"""`gradwatch collector`: run the collector daemon until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from gradwatch.collector.config import CollectorConfig, ConfigError, load_config
from gradwatch.collector.history import HistoryError
from gradwatch.collector.ready import Ready, remove_ready_file, write_ready_file
from gradwatch.collector.server import CollectorServer

_DEFAULTS = CollectorConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server, retention = _DEFAULTS.server, _DEFAULTS.retention
    parser.epilog = (
        "Flags override the config file; GRADWATCH_TOKEN sets the token when --token is not given.\n"
        "Config file sections: [server] [retention] [metrics] [detectors.<kind>] [actions.<kind>];\n"
        "see docs/collector.md. Defaults of settings without a flag: "
        f"heartbeat_timeout={retention.heartbeat_timeout:g}s, "
        f"finished_grace_seconds={retention.finished_grace_seconds:g}s,\n"
        f"max_runs={retention.max_runs}, history_steps={retention.history_steps}, "
        f"layer_cap={_DEFAULTS.metrics.layer_cap}, max_frame_bytes={server.max_frame_bytes}, "
        f"max_messages_per_second={server.max_messages_per_second:g}."
    )
    parser.add_argument("--host", help=f"interface to bind (default {server.host}; loopback only)")
    parser.add_argument("--port", type=int, help=f"websocket ingest port for probes (default {server.port}; 0 = free port)")
    parser.add_argument("--http-port", type=int,
                        help=f"HTTP port for /metrics, /healthz and /api (default {server.http_port}; 0 = free port)")
    parser.add_argument("--data", metavar="DIR",
                        help=f"data directory: alert history and run state (default ./{server.data_dir})")
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: none, built-in defaults)")
    parser.add_argument("--token", help="shared secret probes must send as `Authorization: Bearer TOKEN` "
                        "(default: $GRADWATCH_TOKEN, else no authentication)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log verbosity on stderr (default INFO)")
    parser.add_argument("--ready-file", type=Path, metavar="PATH",
                        help='once both ports listen, write {"ws_url": ..., "http_url": ..., "pid": ...} '
                        "(JSON) to PATH, for whatever started the collector; removed on exit (default: none)")


def main(args: argparse.Namespace) -> int:
    """Start the collector: websocket ingest from probes, detectors, alert history, and
    Prometheus metrics on HTTP. Runs until interrupted (Ctrl-C or SIGTERM)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.log_level != "DEBUG":  # websockets logs every connection at INFO: too chatty at 500 probes
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config = load_config(args.config, {
            "server.host": args.host, "server.port": args.port, "server.http_port": args.http_port,
            "server.data_dir": args.data, "server.token": args.token,
        })
    except ConfigError as err:
        return _fail(f"bad config: {err}")
    return asyncio.run(_run(config, args.ready_file))


async def _run(config: CollectorConfig, ready_file: Path | None) -> int:
    server = CollectorServer(config)
    try:
        await server.start()
    except HistoryError as err:
        await server.close()
        return _fail(str(err))
    except ConfigError as err:
        await server.close()
        return _fail(str(err))
    except OSError as err:
        await server.close()
        return _fail(f"cannot listen on {config.server.host}: {err.strerror or err}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if ready_file is not None:
            try:
                write_ready_file(ready_file, Ready(server.ws_url, server.http_url, os.getpid()))
            except OSError as err:
                return _fail(f"cannot write the ready file: {err}")
        await stop.wait()
    finally:
        logging.getLogger("gradwatch.collector").info("shutting down")
        if ready_file is not None:
            remove_ready_file(ready_file, os.getpid())
        await server.close()
    return 0


def _fail(message: str) -> int:
    print(f"gradwatch collector: error: {message}", file=sys.stderr)
    return 2
