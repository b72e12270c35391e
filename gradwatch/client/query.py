"""`gradwatch runs` and `gradwatch alerts [RUN]`: ask a running collector from the terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

DEFAULT_HTTP_URL = "http://127.0.0.1:9108"
HTTP_URL_ENV = "GRADWATCH_HTTP_URL"  # where `gradwatch runs` / `alerts` ask by default


class Unreachable(Exception):
    pass


def fetch_json(base_url: str, path: str, params: dict[str, str] | None = None) -> Any:
    """GET base_url + path as JSON. Raises Unreachable, or ValueError with the collector's error."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + path + query, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        if err.code == 426:  # aiohttp's answer to plain HTTP on the websocket port
            raise ValueError(
                f"{base_url} is a collector's websocket (ingest) port; queries go to its HTTP port "
                "(--http-port, default 9108), e.g. http://127.0.0.1:9108"
            ) from None
        try:
            message = json.loads(err.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {err.code}"
        raise ValueError(message) from None
    except (urllib.error.URLError, OSError) as err:
        raise Unreachable(str(getattr(err, "reason", err))) from None


def format_time(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, rule: bool = False) -> str:
    """Left-aligned columns (None shows as '-'); `rule` underlines the header."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    if rule:
        cells.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def http_url(address: str) -> str:
    """A collector's HTTP address as users type it: `host:port` gets `http://`."""
    return address if "://" in address else f"http://{address}"


def _url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", type=http_url, default=None,
                        help=f"the collector's HTTP address, host:port or a URL (default ${HTTP_URL_ENV}, "
                        f"else {DEFAULT_HTTP_URL})")
    parser.add_argument("--json", action="store_true", help="print the raw JSON instead of a table")


def runs_arguments(parser: argparse.ArgumentParser) -> None:
    _url_argument(parser)


def runs_main(args: argparse.Namespace) -> int:
    """List the runs a collector knows: name, status, last step, ranks reporting, started, last seen."""
    return _query(args, "/api/runs", {}, _runs_table)


def alerts_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", help="only this run's alerts (default: all runs)")
    _url_argument(parser)


def alerts_main(args: argparse.Namespace) -> int:
    """Show the alert history, oldest first: alerts fired and resolved, actions sent and acknowledged."""
    return _query(args, "/api/alerts", {"run": args.run} if args.run else {}, _alerts_table)


def _runs_table(runs: list[dict[str, Any]]) -> str:
    return format_table(
        ["NAME", "STATUS", "LAST_STEP", "RANKS", "STARTED", "LAST_SEEN"],
        [[r["name"], r["status"], r["last_step"], f"{r['ranks']}/{r['world_size']}",
          format_time(r["started"]), format_time(r["last_seen"])] for r in runs],
    )


def _alerts_table(entries: list[dict[str, Any]]) -> str:
    """The table, with what to try on an indented line under each alert that fired (an older
    collector's entries have no hint)."""
    header, *rows = format_table(
        ["TIME", "RUN", "EVENT", "KIND", "SEVERITY", "STEP", "LAYER", "MESSAGE"],
        [[format_time(e["time"]), e["run"], e["event"], e["kind"], e["severity"], e["step"], e["layer"],
          e["message"]] for e in entries],
    ).splitlines()
    lines = [header]
    for entry, row in zip(entries, rows):
        lines.append(row)
        if entry.get("hint"):
            lines.append(f"    try: {entry['hint']}")
    return "\n".join(lines)


def _query(args: argparse.Namespace, path: str, params: dict[str, str], table: Any) -> int:
    url = args.url or http_url(os.environ.get(HTTP_URL_ENV) or DEFAULT_HTTP_URL)
    try:
        data = fetch_json(url, path, params)
    except Unreachable as err:
        print(f"gradwatch: no collector answers at {url} ({err}). Start one with `gradwatch collector`, "
              f"or point --url (or ${HTTP_URL_ENV}) at the HTTP address it printed when it started",
              file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"gradwatch: {err}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else (table(data) if data else "(none)"))
    return 0
