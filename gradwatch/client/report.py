"""`gradwatch report RUN -o run.html`: a run's page as one self-contained HTML file.

It asks a running collector for the run's history (the JSON its page reads) and alert
history, and writes the run page with everything inlined: the curves grid, the
gradient-flow heatmap and the alert table with what to try, uPlot included. The file
needs no network and no collector: attach it to a bug report or share it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any

from gradwatch.client.query import (
    DEFAULT_HTTP_URL,
    HTTP_URL_ENV,
    Unreachable,
    fetch_json,
    http_url,
)

MARKER_FIELDS = ("step", "event", "kind", "severity", "message", "hint", "layer", "action", "outcome", "time")
_STYLESHEET = re.compile(r'<link rel="stylesheet" href="/web/([\w./-]+)">')
_SCRIPT = re.compile(r'<script src="/web/([\w./-]+)"></script>')


def web_file(name: str) -> str:
    return (resources.files("gradwatch.collector") / "web" / name).read_text(encoding="utf-8")


def report_html(run: dict[str, Any], series: dict[str, Any], alerts: list[dict[str, Any]], written: float) -> str:
    """The run page with its styles, scripts and data inlined. `series` is what
    /api/runs/NAME/series answers with its `layers` added; `alerts` (/api/alerts?run=NAME,
    the complete history) become the alert table and the charts' markers."""
    markers = [{k: a.get(k) for k in MARKER_FIELDS} for a in alerts if a.get("step") is not None]
    data = {"run": run, "series": {**series, "markers": markers, "reset": True}, "written": written}
    page = web_file("run.html")
    page = _STYLESHEET.sub(lambda m: f"<style>\n{_inline(web_file(m.group(1)))}\n</style>", page)
    first_script = _SCRIPT.search(page)
    if first_script is None:
        raise RuntimeError("run.html has no scripts to inline")
    page = page[:first_script.start()] + f"<script>window.GRADWATCH_REPORT = {_script_json(data)};</script>\n" + \
        page[first_script.start():]
    return _SCRIPT.sub(lambda m: f"<script>\n{_inline(web_file(m.group(1)))}\n</script>", page)


def _inline(text: str) -> str:
    """A stylesheet or script, to sit inside a <style> / <script> element."""
    if re.search(r"</(script|style)", text, re.IGNORECASE):
        raise RuntimeError("a web file contains a closing tag and cannot be inlined")
    return text


def _script_json(value: Any) -> str:
    """JSON that cannot end its <script> element or start markup: run names, layer names and
    alert texts come from the network."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the run's name (as `gradwatch runs` lists it)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="the HTML file to write (default RUN.html)")
    parser.add_argument("--url", type=http_url, default=None,
                        help=f"the collector's HTTP address, host:port or a URL (default ${HTTP_URL_ENV}, "
                        f"else {DEFAULT_HTTP_URL})")


def main(args: argparse.Namespace) -> int:
    """Write a run's page (curves, gradient-flow heatmap, alerts with what to try) as one HTML file."""
    url = args.url or http_url(os.environ.get(HTTP_URL_ENV) or DEFAULT_HTTP_URL)
    quoted = urllib.parse.quote(args.run, safe="")
    try:
        series = fetch_json(url, f"/api/runs/{quoted}/series")
        layers = fetch_json(url, f"/api/runs/{quoted}/layers")
        alerts = fetch_json(url, "/api/alerts", {"run": args.run})
        run = next((r for r in fetch_json(url, "/api/runs") if r["name"] == args.run), {"name": args.run})
    except Unreachable as err:
        print(f"gradwatch: no collector answers at {url} ({err}). Point --url (or ${HTTP_URL_ENV}) at the "
              "HTTP address the collector printed when it started", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"gradwatch: {err}", file=sys.stderr)
        return 1
    output = args.output or Path(f"{args.run}.html")
    html = report_html(run, {**series, "layers": layers["layers"]}, alerts, time.time())
    output.write_text(html, encoding="utf-8")
    print(f"wrote {output} ({len(html) // 1024} KiB): open it in a browser")
    return 0
