"""Run short real CPU trainings against an embedded collector and watch what it finds.

One healthy run and one run per pathology (NaN batch, exploding and vanishing gradients,
a dead layer, a loss spike, a plateau, overfitting, AMP loss-scale collapse, an LR typo)
train with the probe attached; alerts are printed live as the collector raises them, and a
table at the end compares what was expected with what was detected, and when. Then the
plateau run is trained again with actions on: the collector lowers its LR and the loss
falls again. Takes about a minute on a 2-core laptop.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

from gradwatch.client.query import Unreachable, fetch_json, format_table

# The plateau runs (with and without actions) are paced to ~200 steps/s, so that the
# collector's answer arrives while they still train, as it would for a real model.
PACE = 0.005
ACTIONS_POLICY = {"plateau": {"action": "reduce_lr", "factor": 0.5, "cooldown": 150, "min_lr": 1e-4}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenarios", default="all",
                        help="comma-separated scenario names, or 'all' (default); see --list")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--no-actions", action="store_true", help="skip the plateau-with-actions comparison")
    parser.add_argument("--every", type=int, default=10,
                        help="per-layer detail every N steps, as attach(every=N) (default: 10, the probe's default)")
    parser.add_argument("--host", default="127.0.0.1", help="interface for the embedded collector (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="websocket port (default: any free port)")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP port for /metrics (default: any free port)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the collector serving its pages after the demo, until Ctrl-C (the default "
                        "when run in a terminal)")


class AlertPrinter(threading.Thread):
    """Polls /api/alerts and prints each new entry as it appears."""

    def __init__(self, http_url: str) -> None:
        super().__init__(daemon=True, name="gradwatch-demo-alerts")
        self.http_url = http_url
        self.seen = 0
        self.entries: list[dict[str, Any]] = []
        self._hinted: set[tuple[str, str]] = set()  # (run, hint) already printed
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.wait(0.3):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            try:
                entries = fetch_json(self.http_url, "/api/alerts")
            except Unreachable:
                return
            for entry in entries[self.seen:]:
                self.entries.append(entry)
                # A hint once per run: five dead layers need one "try:" line, not five.
                seen = (entry["run"], entry.get("hint", ""))
                print(textwrap.indent(_describe(entry, with_hint=seen not in self._hinted), "    "), flush=True)
                self._hinted.add(seen)
            self.seen = len(entries)

    def stop(self) -> None:
        self._stop_event.set()
        self.poll()


def _describe(entry: dict[str, Any], *, with_hint: bool) -> str:
    event = entry.get("event", "fired")
    layer = f" [{entry['layer']}]" if entry.get("layer") else ""
    marks = {"fired": "ALERT", "resolved": "resolved", "action": "ACTION", "ack": "ack"}
    line = f"{marks.get(event, event):>8} {entry['kind']}{layer} at step {entry['step']}: {entry['message']}"
    # What to try goes on a line of its own, under the kind, so the alert line stays short.
    return line + (f"\n{'':8} try: {entry['hint']}" if with_hint and entry.get("hint") else "")


def _wait_until_ended(http_url: str, run: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = {r["name"]: r for r in fetch_json(http_url, "/api/runs")}
        if run in runs and runs[run]["status"] != "running":
            return
        time.sleep(0.1)


def main(args: argparse.Namespace) -> int:
    """Run short real CPU trainings with injected pathologies against an embedded collector."""
    from gradwatch.scenarios import SCENARIOS

    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:22s} expects {s.expected or 'no alert':22s} {s.description}")
        return 0
    names = list(SCENARIOS) if args.scenarios == "all" else [n.strip() for n in args.scenarios.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"gradwatch demo: unknown scenario(s) {', '.join(unknown)}; try --list", file=sys.stderr)
        return 2

    from gradwatch.collector.config import CollectorConfig
    from gradwatch.collector.embedded import EmbeddedCollector

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the demo prints what matters itself
    data_dir = tempfile.mkdtemp(prefix="gradwatch-demo-")
    config = CollectorConfig.model_validate({
        "server": {"host": args.host, "port": args.port, "http_port": args.http_port, "data_dir": data_dir},
        "actions": ACTIONS_POLICY,
    })
    started = time.monotonic()
    with EmbeddedCollector(config) as collector:
        print(f"gradwatch demo: collector listening on {collector.ws_url}; watch the runs at {collector.http_url}/"
              f" (metrics at {collector.http_url}/metrics)")
        printer = AlertPrinter(collector.http_url)
        printer.start()
        outcomes = {}
        for name in names:
            scenario = SCENARIOS[name]
            print(f"\n> {name}: {scenario.description} ({scenario.steps} steps"
                  + (f", pathology at step {scenario.onset})" if scenario.expected else ")"), flush=True)
            t0 = time.monotonic()
            outcome = scenario.run(url=collector.ws_url, name=f"demo-{name}", every=args.every,
                                   pace=PACE if name == "plateau" else 0.0)
            _wait_until_ended(collector.http_url, f"demo-{name}")
            printer.poll()
            outcomes[name] = outcome
            print(f"  trained {outcome.steps} steps in {time.monotonic() - t0:.1f}s, "
                  f"final loss {outcome.mean_loss():.4g}", flush=True)

        with_actions = None
        if not args.no_actions and "plateau" in SCENARIOS:
            print("\n> plateau again, attached with actions=True (collector policy: plateau -> reduce_lr x0.5)")
            with_actions = SCENARIOS["plateau"].run(
                url=collector.ws_url, name="demo-plateau-actions", every=args.every, actions=True, pace=PACE
            )
            _wait_until_ended(collector.http_url, "demo-plateau-actions")
        printer.stop()

        print()
        print(summary_table(names, printer.entries))
        if with_actions is not None and "plateau" in outcomes:
            without = outcomes["plateau"]
            reductions = sum(1 for e in printer.entries
                             if e.get("run") == "demo-plateau-actions" and e.get("event") == "ack")
            print(f"\nplateau, same data and seed: final loss {without.mean_loss(100):.3f} without actions, "
                  f"{with_actions.mean_loss(100):.3f} with actions ({reductions} LR reduction(s) applied)")
        print(f"\ndone in {time.monotonic() - started:.0f}s. Prometheus metrics: {collector.http_url}/metrics"
              f"  alert history: {collector.http_url}/api/alerts")
        print(f"see the runs: {collector.http_url}/", flush=True)
        # In a terminal the pages stay up to be looked at; a script or CI run exits as before.
        if args.keep or sys.stdout.isatty():
            print("serving until Ctrl-C ...", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def summary_table(names: list[str], entries: list[dict[str, Any]]) -> str:
    """scenario | expected | detected | at step | onset | verdict."""
    from gradwatch.scenarios import SCENARIOS

    rows = []
    for name in names:
        scenario = SCENARIOS[name]
        fired = [e for e in entries if e.get("run") == f"demo-{name}" and e.get("event", "fired") == "fired"]
        first: dict[str, int] = {}
        for e in fired:
            first.setdefault(e["kind"], e["step"])
        detected = ", ".join(f"{k} ({s})" for k, s in first.items()) or "-"
        if scenario.expected is None:
            ok = all(e.get("severity") == "info" for e in fired)  # a note pages no one
            latency = "-"
        else:
            ok = scenario.expected in first
            steps = first[scenario.expected] - scenario.onset if ok else 0
            latency = (f"{steps} step" if steps == 1 else f"{steps} steps") if ok else "missed"
        rows.append((name, scenario.expected or "nothing", detected,
                     str(scenario.onset) if scenario.expected else "-", latency, "ok" if ok else "MISS"))
    return format_table(("scenario", "expected", "detected (first step)", "onset", "latency", "verdict"), rows,
                        rule=True)
