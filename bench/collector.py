"""How much one collector process takes: simulated probes on loopback against a real
`gradwatch collector` subprocess.

    python bench/collector.py            # 200 runs x 10 msg/s x 200 layers for 30 s (the target load)
    python bench/collector.py --quick    # 20 runs for 5 s (CI)

Phases, all against one collector:
1. scrape: `--scrape-runs` runs (100) each send one step with per-layer detail; /metrics
   is then timed while nothing else happens, in the text format and as Prometheus asks
   for it (OpenMetrics, gzipped);
2. load: the remaining runs join and all of them send one message every 1/rate seconds
   (each a `steps` frame holding one record; with every per-layer value on every message,
   as a probe at every=1, or on 1 in `--detail-every`), from one asyncio load generator;
   the whole /metrics is scraped every 5 s like `gradwatch up`'s Prometheus, and a watcher
   reads each run's newest visible step from a filtered /metrics (`name[]`) every 0.5 s:
   its age is the run's latency;
3. fill: every run sends enough records to fill the collector's per-run history ring,
   then the collector's RSS growth divided by the runs is the memory per run.
Accepted messages, merged steps and rejects are read from the collector's own /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gradwatch import protocol
from gradwatch.collector.config import RetentionConfig
from gradwatch.collector.ready import NotReady, wait_for_ready_file

RUN_PREFIX = "bench-"
FILL_BATCH = 100  # records per frame while filling the history ring
DRAIN_TIMEOUT = 60.0  # seconds to wait for the collector to merge what was sent


# ---- the collector under test ------------------------------------------------------------


class CollectorProcess:
    """`python -m gradwatch collector` on free loopback ports, optionally under cProfile."""

    def __init__(self, data_dir: str, profile: str | None) -> None:
        command = [sys.executable]
        if profile:
            command += ["-m", "cProfile", "-o", profile]
        ready_file = Path(data_dir) / "ready.json"
        command += ["-m", "gradwatch", "collector", "--port", "0", "--http-port", "0", "--data", data_dir,
                    "--ready-file", str(ready_file)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.log_tail: deque[str] = deque(maxlen=20)
        # Keep reading its log so that the pipe never fills and blocks the collector.
        drain = threading.Thread(target=self._drain_log, daemon=True)
        drain.start()
        try:
            ready = wait_for_ready_file(ready_file, self.process, timeout=60)
        except NotReady as err:
            drain.join(timeout=5)
            raise RuntimeError(f"the collector {err}:\n" + "".join(self.log_tail)) from None
        self.ws_url, self.http_url = ready.ws_url, ready.http_url

    def _drain_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_tail.append(line)

    def rss_bytes(self) -> int:
        """Resident memory, from /proc (Linux)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, from /proc (Linux)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # a clean exit writes the profile
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ---- reading /metrics ---------------------------------------------------------------------


@dataclass
class Scrape:
    seconds: float
    size: int
    received: float  # wall clock when the body was in
    text: str

    def values(self, metric: str) -> dict[str, float]:
        """{label text: value} of every sample of `metric`."""
        pattern = re.compile(rf"^{metric}(?:\{{(.*)\}})? (\S+)$", re.MULTILINE)
        return {labels: float(value) for labels, value in pattern.findall(self.text)}

    def total(self, metric: str) -> float:
        return sum(self.values(metric).values())

    def steps_accepted(self) -> float:
        return self.values("gradwatch_collector_messages_total").get('type="steps"', 0.0)

    def per_run(self, metric: str) -> dict[str, float]:
        run = re.compile(r'run="([^"]+)"')
        return {run.search(labels).group(1): v for labels, v in self.values(metric).items()}  # type: ignore[union-attr]


# What the latency watcher reads: a filtered /metrics (name[]), cheap enough to poll often.
WATCHED = ("gradwatch_run_last_step_timestamp_seconds", "gradwatch_collector_ingest_lag_seconds")


# What Prometheus 2.x sends with each scrape.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


def scrape(http_url: str, names: tuple[str, ...] = (), as_prometheus: bool = False) -> Scrape:
    """One GET /metrics: the text format, or OpenMetrics gzipped as Prometheus asks for it
    (size: as sent)."""
    query = ("?" + urllib.parse.urlencode([("name[]", n) for n in names])) if names else ""
    request = urllib.request.Request(http_url + "/metrics" + query, headers=PROMETHEUS_HEADERS if as_prometheus else {})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        seconds = time.perf_counter() - start
        text = (gzip.decompress(body) if response.headers.get("Content-Encoding") == "gzip" else body).decode()
    return Scrape(seconds, len(body), time.time(), text)


class Scraper:
    """Scrapes /metrics (only `names` when given) every `interval` seconds on a thread.
    A run's latency sample is the age of its newest visible step when the scrape's response
    is in: an upper bound on send -> visible, within one send interval plus the scrape's
    own duration."""

    def __init__(self, http_url: str, interval: float, names: tuple[str, ...] = ()) -> None:
        self.http_url = http_url
        self.interval = interval
        self.names = names
        self.ages: list[float] = []
        self.ingest_lags: list[float] = []
        self.scrape_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            result = scrape(self.http_url, self.names)
            self.scrape_seconds.append(result.seconds)
            last_sent = result.per_run("gradwatch_run_last_step_timestamp_seconds")
            self.ages += [result.received - t for run, t in last_sent.items() if run.startswith(RUN_PREFIX)]
            self.ingest_lags.append(result.total("gradwatch_collector_ingest_lag_seconds"))


# ---- simulated probes ---------------------------------------------------------------------


def layer_names(count: int) -> list[str]:
    """Names shaped like a transformer's parameters."""
    kinds = ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return [f"transformer.h.{i // len(kinds)}.{kinds[i % len(kinds)]}" for i in range(count)]


class StepsTemplate:
    """A `steps` frame encoded once with the protocol's own models; each send only splices
    in the step numbers and the send time, so the generator costs little next to the collector."""

    def __init__(self, layers: int, detail: bool, records: int = 1) -> None:
        rng = random.Random(layers)
        squares = [rng.uniform(1e-6, 1.0) for _ in range(layers)]
        record = protocol.StepRecord(
            step=0, time=0.0, step_time=0.1, loss=2.5, grad_norm_sq=sum(squares),
            lr=[3e-4], momentum=[0.9], weight_decay=[0.1],
            layer_grad_sq=squares if detail else None,
            layer_weight_sq=[s * 100 for s in squares] if detail else None,
            layer_update_sq=[s * 1e-6 for s in squares] if detail else None,
        )
        frame = json.loads(protocol.encode(protocol.Steps(records=[record] * records)))
        for r in frame["records"]:
            r["step"], r["time"] = "<STEP>", "<TIME>"
        self.records = records
        self._parts = re.split(r'"<STEP>"|"<TIME>"', json.dumps(frame))  # step, time alternate

    def render(self, first_step: int, sent: float) -> str:
        values = [str(first_step + i // 2) if i % 2 == 0 else repr(sent) for i in range(2 * self.records)]
        return "".join(part + value for part, value in zip(self._parts, values)) + self._parts[-1]


@dataclass
class Probe:
    name: str
    ws: ClientConnection
    step: int = 0
    closed: str = ""  # why the collector closed the connection (empty while open)


@dataclass
class LoadResult:
    sent: int = 0
    behind: list[float] = field(default_factory=list)  # how late each send was against its schedule
    seconds: float = 0.0  # first send to last send


async def join(ws_url: str, names: list[str], layers: list[str], first: StepsTemplate) -> list[Probe]:
    """Connect, say hello, send one step with per-layer detail."""

    async def one(name: str) -> Probe:
        # As the probe: no client pings (the collector's side is under test), no deflate.
        ws = await connect(ws_url, max_size=2**22, ping_interval=None, compression=None)
        hello = protocol.Hello(v=protocol.PROTOCOL_VERSION, run=name, layers=layers, param_groups=1, every=1)
        await ws.send(protocol.encode(hello))
        await ws.recv()  # welcome
        probe = Probe(name, ws, step=1)
        await ws.send(first.render(probe.step, time.time()))
        return probe

    return list(await asyncio.gather(*(one(n) for n in names)))


async def load(
    probes: list[Probe], templates: list[StepsTemplate], rate: float, seconds: float
) -> LoadResult:
    """Every probe sends `rate` messages/s for `seconds`, its phase spread at random,
    cycling through `templates` (per-layer detail on some of them, as a probe's `every`)."""
    result = LoadResult()
    start = time.monotonic()

    async def one(probe: Probe) -> None:
        due = start + random.uniform(0, 1 / rate)
        while due < start + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            result.behind.append(time.monotonic() - due)
            frame = templates[probe.step % len(templates)].render(probe.step + 1, time.time())
            try:
                await probe.ws.send(frame)
            except ConnectionClosed as error:
                probe.closed = f"{error.rcvd.code} {error.rcvd.reason}" if error.rcvd else "no close frame"
                return
            probe.step += 1
            result.sent += 1
            due += 1 / rate

    await asyncio.gather(*(one(p) for p in probes))
    result.seconds = time.monotonic() - start
    return result


async def fill(probes: list[Probe], records: int) -> None:
    """Sends `records` more steps per run, in frames of FILL_BATCH records without
    per-layer detail (the collector keeps per-layer values of the latest step only)."""
    batch = StepsTemplate(0, detail=False, records=FILL_BATCH)

    async def one(probe: Probe) -> None:
        for _ in range(0, records, FILL_BATCH):
            await probe.ws.send(batch.render(probe.step + 1, time.time()))
            probe.step += FILL_BATCH

    await asyncio.gather(*(one(p) for p in probes if not p.closed))


async def leave(probes: list[Probe]) -> None:
    async def one(probe: Probe) -> None:
        await probe.ws.send(protocol.encode(protocol.Bye()))
        await probe.ws.close()

    await asyncio.gather(*(one(p) for p in probes if not p.closed))


async def wait_merged(http_url: str, probes: list[Probe], timeout: float) -> float | None:
    """Seconds until the collector merged every step the open connections sent (per
    /api/runs), or None after `timeout`."""
    start = time.monotonic()
    expected = {p.name: p.step for p in probes if not p.closed}
    while time.monotonic() - start < timeout:
        runs = json.loads(await asyncio.to_thread(_get, http_url + "/api/runs"))
        merged = {r["name"]: r["last_step"] for r in runs}
        if all(merged.get(name, 0) >= step for name, step in expected.items()):
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    return None


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


# ---- the benchmark ------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def closed_summary(probes: list[Probe]) -> str:
    reasons = Counter(p.closed for p in probes if p.closed)
    return f"{sum(reasons.values())}" + "".join(f", {n} x {reason!r}" for reason, n in reasons.items())


def series_count(result: Scrape) -> int:
    return sum(1 for line in result.text.splitlines() if line and not line.startswith("#"))


async def bench(args: argparse.Namespace, collector: CollectorProcess) -> list[tuple[str, str, str]]:
    """Runs the three phases; returns the report's rows (measure, value, target)."""
    layers = layer_names(args.layers)
    detailed = StepsTemplate(args.layers, detail=True)
    names = [f"{RUN_PREFIX}{i:04d}" for i in range(args.runs)]
    rss_idle = collector.rss_bytes()
    rows: list[tuple[str, str, str]] = []

    # 1. /metrics with `scrape_runs` runs and nothing else going on
    probes = await join(collector.ws_url, names[: args.scrape_runs], layers, detailed)
    await wait_merged(collector.http_url, probes, timeout=60)
    quiet = [await asyncio.to_thread(scrape, collector.http_url) for _ in range(5)]
    rows.append((
        f"/metrics, {len(probes)} runs x {args.layers} layers (median of 5)",
        (f"{statistics.median(s.seconds for s in quiet):.3f} s ({quiet[-1].size / 1e6:.1f} MB, "
         f"{series_count(quiet[-1])} series)"),
        "< 1 s" if len(probes) == 100 and args.layers == 200 else "",
    ))
    zipped = [await asyncio.to_thread(scrape, collector.http_url, (), True) for _ in range(5)]
    rows.append((
        "  the same as Prometheus asks for it (OpenMetrics, gzip)",
        f"{statistics.median(s.seconds for s in zipped):.3f} s ({zipped[-1].size / 1e6:.1f} MB)", "",
    ))

    # 2. sustained load
    probes += await join(collector.ws_url, names[args.scrape_runs :], layers, detailed)
    await wait_merged(collector.http_url, probes, timeout=60)
    plain = StepsTemplate(args.layers, detail=False)
    before = await asyncio.to_thread(scrape, collector.http_url)
    cpu_before = collector.cpu_seconds()
    with Scraper(collector.http_url, args.watch_interval, WATCHED) as watcher, \
            Scraper(collector.http_url, args.scrape_interval) as scraper:
        sent = await load(probes, [detailed] + [plain] * (args.detail_every - 1), args.rate, args.seconds)
    drain = await wait_merged(collector.http_url, probes, timeout=DRAIN_TIMEOUT)
    cpu = collector.cpu_seconds() - cpu_before
    after = await asyncio.to_thread(scrape, collector.http_url)
    accepted = after.steps_accepted() - before.steps_accepted()
    # Sustained: what was accepted, over the time from the first send until the collector
    # had merged the last one (or the bench gave up waiting).
    busy = sent.seconds + (drain if drain is not None else DRAIN_TIMEOUT)
    sustained = accepted / busy
    offered = args.runs * args.rate
    detail = "every message" if args.detail_every == 1 else f"1 message in {args.detail_every}"
    rows += [
        (f"offered: {args.runs} runs x {args.rate:g} msg/s, {args.layers} layers ({detail}), {args.seconds:g} s",
         f"{offered:g} msg/s", ""),
        ("load generator behind its schedule, p99", f"{quantile(sent.behind, 0.99):.3f} s", ""),
        ("sustained messages/s (accepted / (sending + draining))", f"{sustained:.0f}", f">= {offered:g}"),
        ("sustained per-layer values/s (grad, weight, update)",
         f"{sustained * 3 * args.layers / args.detail_every / 1e6:.2f} M", ""),
        ("backlog drained after the last send",
         f"{drain:.2f} s" if drain is not None else f"not in {DRAIN_TIMEOUT:g} s", ""),
        ("collector CPU: share of one core; per message (scrapes included)",
         f"{100 * cpu / busy:.0f}%; {1e3 * cpu / accepted:.3f} ms", ""),
        ("latency send -> visible in a /metrics response, p50 / p99",
         f"{quantile(watcher.ages, 0.5):.3f} / {quantile(watcher.ages, 0.99):.3f} s", "p99 < 1 s"),
        ("  send -> ingest (collector's ingest_lag gauge), p50 / p99",
         f"{quantile(watcher.ingest_lags, 0.5):.3f} / {quantile(watcher.ingest_lags, 0.99):.3f} s", ""),
        (f"whole /metrics under load, every {args.scrape_interval:g} s: p50 / max (scrapes)",
         (f"{quantile(scraper.scrape_seconds, 0.5):.3f} / {quantile(scraper.scrape_seconds, 1.0):.3f} s "
          f"({len(scraper.scrape_seconds)})"), ""),
        ("rejected (all reasons)", f"{after.total('gradwatch_collector_rejected_messages_total'):.0f}", "0"),
        ("connections closed by the collector", closed_summary(probes), "0"),
        ("dropped (sent - accepted)", f"{sent.sent - accepted:.0f}", "0"),
    ]

    # 3. memory once every run's history ring is full
    await fill(probes, RetentionConfig().history_steps)
    await wait_merged(collector.http_url, probes, timeout=300)
    per_run = (collector.rss_bytes() - rss_idle) / len(probes)
    rows.append(("memory per run (RSS growth / runs, history ring full)", f"{per_run / 1e3:.0f} KB", ""))
    await leave(probes)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Targets (issue 6): 200 runs x 10 msg/s x 200 layers with no drops and p99 < 1 s; "
        "/metrics for 100 runs x 200 layers in < 1 s.",
    )
    parser.add_argument("--quick", action="store_true", help="20 runs (10 in the scrape phase) for 5 s (CI)")
    parser.add_argument("--runs", type=int, help="concurrent runs in the load phase (default 200)")
    parser.add_argument("--scrape-runs", type=int, help="runs present when /metrics is timed (default 100)")
    parser.add_argument("--layers", type=int, default=200, help="layers per run (default 200)")
    parser.add_argument("--rate", type=float, default=10.0, help="messages/s per run (default 10)")
    parser.add_argument("--detail-every", type=int, default=1,
                        help="per-layer values in 1 message of N (default 1: every message; a probe at every=10 sends 10)")
    parser.add_argument("--seconds", type=float, help="length of the load phase (default 30)")
    parser.add_argument("--scrape-interval", type=float, default=5.0,
                        help="seconds between whole /metrics scrapes under load (default 5, as `gradwatch up`'s Prometheus)")
    parser.add_argument("--watch-interval", type=float, default=0.5,
                        help="seconds between the latency watcher's filtered scrapes (default 0.5)")
    parser.add_argument("--collector-log", action="store_true", help="print the collector's last log lines at the end")
    parser.add_argument("--profile", metavar="FILE", help="run the collector under cProfile, save to FILE and print its top functions")
    args = parser.parse_args()
    args.runs = args.runs or (20 if args.quick else 200)
    args.scrape_runs = min(args.runs, args.scrape_runs or (10 if args.quick else 100))
    args.seconds = args.seconds or (5.0 if args.quick else 30.0)
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-collector-") as data_dir:
        collector = CollectorProcess(data_dir, args.profile)
        try:
            rows = asyncio.run(bench(args, collector))
        finally:
            collector.stop()
            if args.collector_log:
                print("== the collector's last log lines\n" + "".join(collector.log_tail))
    print(f"\n== collector: one process, {args.runs} simulated probes on loopback ({sys.platform}, python {sys.version.split()[0]})")
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>{value_width}}  target")
    print(f"{'-' * width}  {'-' * value_width}  ------")
    for measure, value, target in rows:
        print(f"{measure:<{width}}  {value:>{value_width}}  {target}")
    if args.profile:
        import pstats

        print(f"\n== collector profile ({args.profile}), top functions by own time")
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
