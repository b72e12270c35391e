"""How fast a run's page opens: a real `gradwatch collector` subprocess takes in one run
(10,000 steps, 200 layers, per-layer detail every 10 steps), then headless Chromium opens
the run page and the run list, several times.

    python bench/page_load.py            # 10,000 steps x 200 layers, 5 loads of each page
    python bench/page_load.py --quick    # 2,000 steps x 50 layers, 2 loads (CI)

"Drawn" is when the page first showed the collector's data (its `gradwatch:drawn`
performance mark: charts, heatmap and alert list drawn), counted from the start of the
navigation. Needs Debian's `chromium` and `pip install playwright` (never `playwright
install`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collector import CollectorProcess, layer_names
from websockets.sync.client import connect

from gradwatch import protocol

CHROMIUM = Path("/usr/bin/chromium")
RUN = "bench-page-load"
BATCH = 100  # records per frame
TARGET_MS = 1000.0


def record(step: int, layers: int, every: int, start: float) -> protocol.StepRecord:
    """A plausible step: loss decaying with noise, warm-up then cosine LR, evaluations every
    100 steps, per-layer squared norms every `every` steps."""
    noise = math.sin(step * 12.9898) * 0.05
    detail = step % every == 0
    squares = [(1e-3 * (1 + i % 7)) * math.exp(-i / 60) * (1.2 + noise) for i in range(layers)] if detail else None
    return protocol.StepRecord(
        step=step, time=start + step * 0.05, step_time=0.05, loss=2.5 * math.exp(-step / 4000) + 0.3 + noise,
        grad_norm_sq=1.0 + noise, grad_norm_preclip=1.1 + noise,
        lr=[3e-4 * min(1.0, step / 500) * (0.5 + 0.5 * math.cos(math.pi * step / 20_000))],
        scalars={"val_loss": 2.6 * math.exp(-step / 4000) + 0.35} if step % 100 == 0 else {},
        layer_grad_sq=squares,
        layer_weight_sq=[s * 1e4 for s in squares] if squares else None,
        layer_update_sq=[s * 1e-2 for s in squares] if squares else None,
    )


def feed(ws_url: str, http_url: str, steps: int, layers: int, every: int) -> float:
    """Sends the run, waits until the collector has merged all of it; returns the seconds taken."""
    began = time.perf_counter()
    with connect(ws_url, max_size=2**24, compression=None) as ws:
        hello = protocol.Hello(v=protocol.PROTOCOL_VERSION, run=RUN, layers=layer_names(layers), param_groups=1,
                               every=every)
        ws.send(protocol.encode(hello))
        ws.recv()  # welcome
        start = time.time() - steps * 0.05
        for first in range(0, steps, BATCH):
            records = [record(s, layers, every, start) for s in range(first, min(steps, first + BATCH))]
            ws.send(protocol.encode(protocol.Steps(records=records)))
            ws.recv()  # received
        deadline = time.monotonic() + 60
        while get_json(http_url, "/api/runs")[0]["last_step"] < steps - 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the collector did not merge every step within 60 s")
            time.sleep(0.1)
    return time.perf_counter() - began


def get_json(http_url: str, path: str) -> object:
    with urllib.request.urlopen(http_url + path, timeout=30) as response:
        return json.load(response)


def timed_get(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        size = len(response.read())
    return (time.perf_counter() - start) * 1000, size


def page_loads(url: str, loads: int) -> tuple[list[float], list[str]]:
    """Milliseconds from navigation to the page's first drawing of data, per load, and any
    console errors."""
    from playwright.sync_api import sync_playwright

    times, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            deadline = time.monotonic() + 30
            drawn = None
            while drawn is None and time.monotonic() < deadline:
                drawn = page.evaluate("performance.getEntriesByName('gradwatch:drawn')[0]?.startTime ?? null")
                time.sleep(0.01)
            if drawn is None:
                raise RuntimeError(f"{url} drew nothing within 30 s; console: {errors}")
            times.append(drawn)
            page.close()
        browser.close()
    return times, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 steps x 50 layers, 2 loads (CI)")
    parser.add_argument("--steps", type=int, help="optimizer steps of the run (default 10,000)")
    parser.add_argument("--layers", type=int, help="layers of the run (default 200)")
    parser.add_argument("--every", type=int, default=10, help="per-layer detail every N steps (default 10)")
    parser.add_argument("--loads", type=int, help="loads of each page (default 5)")
    args = parser.parse_args()
    steps = args.steps or (2_000 if args.quick else 10_000)
    layers = args.layers or (50 if args.quick else 200)
    loads = args.loads or (2 if args.quick else 5)
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup installs it)")

    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-page-") as data_dir:
        collector = CollectorProcess(data_dir, None)
        try:
            ingest = feed(collector.ws_url, collector.http_url, steps, layers, args.every)
            quoted = urllib.parse.quote(RUN, safe="")
            series_ms, series_size = timed_get(f"{collector.http_url}/api/runs/{quoted}/series")
            layers_ms, layers_size = timed_get(f"{collector.http_url}/api/runs/{quoted}/layers")
            entry = get_json(collector.http_url, "/api/runs")[0]
            run_page, run_errors = page_loads(f"{collector.http_url}/runs/{quoted}", loads)
            run_list, list_errors = page_loads(collector.http_url + "/", loads)
        finally:
            collector.stop()

    print(f"\n== page load: one run of {steps} steps x {layers} layers (detail every {args.every}), "
          f"headless Chromium, {loads} loads ({sys.platform}, python {sys.version.split()[0]})")
    rows = [
        ("run page: data drawn (ms)", *_spread(run_page), f"< {TARGET_MS:.0f}"),
        ("run list: data drawn (ms)", *_spread(run_list), ""),
        (f"GET /api/runs/{RUN}/series", f"{series_ms:.0f} ms", f"{series_size // 1024} KiB", "", ""),
        (f"GET /api/runs/{RUN}/layers", f"{layers_ms:.0f} ms", f"{layers_size // 1024} KiB", "", ""),
        ("history kept for the run", f"{entry.get('series_bytes', 0) // 1024} KiB", "", "", "bounded"),
        ("ingest of the whole run", f"{ingest:.1f} s", "", "", ""),
    ]
    print(f"{'measure':<40} {'median':>9} {'min':>9} {'max':>9}  target")
    for measure, *values, target in rows:
        print(f"{measure:<40} {values[0]:>9} {values[1]:>9} {values[2]:>9}  {target}")
    errors = run_errors + list_errors
    if errors:
        print("!! console errors:", *errors, sep="\n  ")
        sys.exit(1)


def _spread(values: list[float]) -> tuple[str, str, str]:
    return f"{statistics.median(values):.0f}", f"{min(values):.0f}", f"{max(values):.0f}"


if __name__ == "__main__":
    main()
