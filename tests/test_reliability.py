"""Reliability drills against a real collector subprocess: load (500 concurrent probes,
retention), a distributed run losing one rank's probe mid-training, and kill -9 during heavy
ingest. Each drill prints the figures that docs/reliability.md quotes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import gradwatch
from gradwatch.protocol import (
    CLOSE_POLICY,
    PROTOCOL_VERSION,
    Bye,
    Heartbeat,
    Hello,
    Received,
    StepRecord,
    Steps,
    Welcome,
    decode_collector_message,
    encode,
)
from tests.probe_helpers import TinyNet, batches
from tests.test_collector_server import closed_with, promtool_check, series

pytestmark = pytest.mark.slow

MiB = 1024 * 1024  # KiB per GiB, for /proc figures in KiB


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed, "cannot open enough files for the drill"


def hello(run: str, layers: list[str], **kw: Any) -> str:
    return encode(Hello(v=PROTOCOL_VERSION, run=run, layers=layers, **kw))


def record(step: int, width: int, **kw: Any) -> StepRecord:
    return StepRecord(step=step, time=time.time(), loss=1.0 / step, grad_norm_sq=float(width), lr=[1e-3],
                      step_time=0.01, layer_grad_sq=[1.0] * width, layer_weight_sq=[4.0] * width,
                      layer_update_sq=[1e-6] * width, **kw)


# --- load -----------------------------------------------------------------------------------------

PROBES = 500
LAYERS = [f"block.{i}.weight" for i in range(50)]
BATCHES, RECORDS_PER_BATCH = 3, 4


def test_500_concurrent_probes_with_bounded_memory(start_collector) -> None:
    raise_open_files(4 * PROBES + 256)  # before the collector starts: it inherits the limit
    collector = start_collector()
    pid = collector.proc.pid
    idle = rss_kib(pid)
    figures: dict[str, Any] = {}

    async def drill() -> None:
        all_open = asyncio.Event()
        release = asyncio.Event()
        ready = 0
        handshakes = asyncio.Semaphore(100)  # the listen backlog is finite; all stay open together

        async def probe(i: int) -> None:
            nonlocal ready
            async with handshakes:
                ws = await aconnect(collector.ws_url, open_timeout=60, max_size=None)
            async with ws:
                await ws.send(hello(f"load-{i:03d}", LAYERS, param_groups=1))
                assert isinstance(decode_collector_message(await ws.recv()), Welcome)
                step = 0
                for _ in range(BATCHES):
                    records = [record(step + k + 1, len(LAYERS)) for k in range(RECORDS_PER_BATCH)]
                    step += RECORDS_PER_BATCH
                    await ws.send(encode(Steps(records=records)))
                    assert decode_collector_message(await ws.recv()) == Received(step=step)
                ready += 1
                if ready == PROBES:
                    all_open.set()
                while not release.is_set():  # idle like a real probe: heartbeats (the test timeout is 2 s)
                    await ws.send(encode(Heartbeat(time=time.time())))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(release.wait(), 0.5)
                if i % 2 == 0:  # half end properly, half just vanish (lost after the timeout)
                    await ws.send(encode(Bye()))

        tasks = [asyncio.create_task(probe(i)) for i in range(PROBES)]
        done_early = asyncio.create_task(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
        await asyncio.wait([done_early, asyncio.create_task(all_open.wait())], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done() and task.exception():
                raise task.exception()  # type: ignore[misc]
        # All 500 connected, greeted and confirmed at once: look at the collector now.
        figures["all_open_s"] = time.monotonic() - t0
        health = await asyncio.to_thread(collector.get_json, "/healthz")
        runs = await asyncio.to_thread(collector.get_json, "/api/runs")
        metrics = await asyncio.to_thread(collector.metrics)
        figures.update(connections=health["connections"], rss_open=rss_kib(pid), metrics_lines=metrics.count("\n"))
        assert health["connections"] == PROBES
        assert len(runs) == PROBES
        assert [r for r in runs if r["status"] != "running" or r["ranks"] != 1] == []
        assert {r["last_step"] for r in runs} == {BATCHES * RECORDS_PER_BATCH}
        await asyncio.to_thread(promtool_check, metrics)
        release.set()
        await asyncio.gather(*tasks)

    t0 = time.monotonic()
    asyncio.run(drill())

    def settled() -> list[dict[str, Any]] | None:
        runs = collector.get_json("/api/runs")
        statuses = sorted(r["status"] for r in runs)
        return runs if statuses == ["finished"] * (PROBES // 2) + ["lost"] * (PROBES // 2) else None

    runs = collector.wait_for(settled, what="half the runs finished, half lost")
    metrics = collector.metrics()
    promtool_check(metrics)
    peak = rss_kib(pid, "VmHWM")
    print(f"\n{PROBES} probes x {len(LAYERS)} layers: collector RSS idle {idle / 1024:.0f} MiB, "
          f"all open {figures['rss_open'] / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB; "
          f"/metrics {figures['metrics_lines']} lines; all open after {figures['all_open_s']:.1f} s")
    assert peak < MiB, f"collector peak RSS {peak} KiB at {PROBES} connections"
    assert series(metrics, "gradwatch_collector_connections") == 0
    assert series(metrics, "gradwatch_collector_messages_total", type="hello") == PROBES
    assert series(metrics, "gradwatch_collector_messages_total", type="steps") == PROBES * BATCHES
    assert len(runs) == PROBES
    assert collector.proc.poll() is None


def test_runs_beyond_max_runs_are_evicted_oldest_ended_first(start_collector) -> None:
    collector = start_collector(retention="max_runs = 100")
    for i in range(150):
        with connect(collector.ws_url) as ws:
            ws.send(hello(f"old-{i:03d}", ["a"]))
            ws.recv(timeout=10)
            ws.send(encode(Steps(records=[record(1, 1)])))
            ws.recv(timeout=10)
            ws.send(encode(Bye()))
        # ended in this order: wait until this one counts as finished before the next starts
        name = f"old-{i:03d}"
        collector.wait_for(lambda name=name: any(r["name"] == name for r in collector.get_json("/api/runs?status=finished")),
                           what=f"{name} finished")
    names = [r["name"] for r in collector.get_json("/api/runs")]
    assert names == [f"old-{i:03d}" for i in range(50, 150)]  # the 50 that ended first are gone
    evicted = series(collector.metrics(), "gradwatch_collector_runs_evicted_total")
    assert evicted == 50

    # Running runs are never evicted: 100 running take every slot, the 101st is refused.
    with contextlib.ExitStack() as stack:
        live = [stack.enter_context(connect(collector.ws_url)) for _ in range(100)]
        for k, ws in enumerate(live):
            ws.send(hello(f"live-{k:03d}", ["a"]))
            assert isinstance(decode_collector_message(ws.recv(timeout=10)), Welcome)
        with connect(collector.ws_url) as extra:
            extra.send(hello("one-too-many", ["a"]))
            code, reason = closed_with(extra)
        assert code == CLOSE_POLICY and "max_runs" in reason, reason
        metrics = collector.metrics()
        assert series(metrics, "gradwatch_collector_runs_evicted_total") == 150
        assert series(metrics, "gradwatch_collector_rejected_messages_total", reason="run_refused") == 1
        assert sorted(r["name"] for r in collector.get_json("/api/runs")) == [f"live-{k:03d}" for k in range(100)]
    print("\nmax_runs=100: 150 ended runs -> 50 evicted oldest-ended first; 100 running -> 150 evicted, "
          "101st running refused (1008)")


# --- probe side: an outage longer than the buffer -------------------------------------------------


def test_outage_beyond_the_buffer_drops_oldest_and_reports_exactly(start_collector) -> None:
    """buffer=100 and no collector for 300 steps: the oldest records are let go, training is
    untouched, and the drop count the probe reports is exact (delivered + dropped = trained)."""
    port = _free_port()
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = gradwatch.attach(model, opt, url=f"ws://127.0.0.1:{port}", name="overflow", every=1, buffer=100)
    holder = {}
    trained = 400
    for step, (x, y) in enumerate(batches(trained), start=1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        run.log(loss=loss)
        if step == 300:
            holder["collector"] = start_collector(args=["--port", str(port)])
        time.sleep(0.002)
    run.detach()
    collector = holder["collector"]

    def ended(metrics: str) -> str | None:  # one snapshot, before the finished run's series expire
        return metrics if series(metrics, "gradwatch_run_up", run="overflow") == 0 else None

    metrics = collector.wait_for(lambda: ended(collector.metrics()), what="the run to end")
    delivered = series(metrics, "gradwatch_steps_total", run="overflow")
    reported = series(metrics, "gradwatch_probe_dropped_records_total", run="overflow", rank="0")
    print(f"\nbuffer=100, collector absent for 300 of {trained} steps: {delivered:.0f} delivered, "
          f"{run.dropped} dropped (collector counted {reported:.0f})")
    assert run.dropped >= 300 - 100 - 1  # at most `buffer` records were kept through the outage
    assert reported == run.dropped
    assert delivered + run.dropped == trained
    [listed] = [r for r in collector.get_json("/api/runs") if r["name"] == "overflow"]
    assert (listed["status"], listed["last_step"]) == ("finished", trained)  # the newest records arrive


# --- distributed: one rank's probe goes silent while training goes on ----------------------------


class CuttableProxy:
    """A TCP proxy on loopback that the test can cut (every connection reset, the port
    closed: a network partition between one rank and the collector) and mend."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        if listener is not None:
            listener.close()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            client.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_DDP_STEPS = 5000  # a bound only: the test stops training with a flag file long before


def _ddp_worker(rank: int, world: int, port: int, urls: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TinyNet())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        run = gradwatch.attach(model, opt, url=urls[rank], name="ddp-partition", every=5)
        data = batches(64, seed=rank)
        step = 0
        while True:
            x, y = data[step % len(data)]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            run.log(loss=loss)
            step += 1
            stop = torch.tensor([float(os.path.exists(os.path.join(out, "stop")) or step >= MAX_DDP_STEPS)])
            dist.all_reduce(stop)  # both ranks stop at the same step
            if stop.item():
                break
            time.sleep(0.01)
        run.detach()
        Path(out, f"rank{rank}.txt").write_text(f"{step} {run.dropped}")
    finally:
        dist.destroy_process_group()


def test_ddp_rank_partitioned_from_collector_degrades_run_and_rank0_flows(collector, tmp_path: Path) -> None:
    proxy = CuttableProxy(int(collector.ws_url.rsplit(":", 1)[1]))
    urls = [collector.ws_url, f"ws://127.0.0.1:{proxy.port}"]  # rank 1 reaches the collector via the proxy
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), urls, str(tmp_path)), nprocs=2, join=False)
    try:
        def the_run() -> dict[str, Any] | None:
            return next((r for r in collector.get_json("/api/runs") if r["name"] == "ddp-partition"), None)

        collector.wait_for(lambda: (r := the_run()) and r["ranks"] == 2 and r["last_step"] > 20,
                           timeout=60, what="both ranks reporting")
        proxy.cut()  # rank 1's probe loses the collector; its training goes on (DDP keeps both in step)
        cut_step = the_run()["last_step"]
        degraded = collector.wait_for(lambda: (r := the_run()) and r["status"] == "degraded" and r,
                                      what="the run degraded")
        alerts = collector.get_json("/api/alerts?run=ddp-partition")
        [lost] = [a for a in alerts if a["kind"] == "rank_lost" and a["event"] == "fired"]
        assert lost["severity"] == "warning" and "rank 1" in lost["message"], lost
        assert not any(a["kind"] == "run_lost" for a in alerts)
        # rank 0's data still flows: merged steps keep rising while rank 1 is gone
        flowing = collector.wait_for(lambda: (r := the_run()) and r["last_step"] > degraded["last_step"] + 20 and r,
                                     what="rank 0's steps to keep flowing")
        assert flowing["status"] == "degraded" and flowing["ranks"] == 1
        metrics = collector.metrics()
        assert series(metrics, "gradwatch_alert_active", run="ddp-partition", kind="rank_lost",
                      severity="warning") == 1
        assert series(metrics, "gradwatch_run_up", run="ddp-partition") == 1

        proxy.open()  # the partition heals: rank 1 reconnects, replays, the alert resolves
        healed = collector.wait_for(lambda: (r := the_run()) and r["status"] == "running" and r["ranks"] == 2 and r,
                                    timeout=60, what="rank 1 back")
        alerts = collector.get_json("/api/alerts?run=ddp-partition")
        assert [a["event"] for a in alerts if a["kind"] == "rank_lost"] == ["fired", "resolved"]
        (tmp_path / "stop").touch()
        while not ctx.join(timeout=60):
            pass
    finally:
        (tmp_path / "stop").touch()
        proxy.cut()
        for process in ctx.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    steps = [tuple(map(int, (tmp_path / f"rank{r}.txt").read_text().split())) for r in range(2)]
    assert steps[0][0] == steps[1][0]  # training was never held up by the partition
    final = collector.wait_for(lambda: (r := the_run()) and r["status"] == "finished" and r, what="run finished")
    print(f"\nDDP partition: rank 1 cut at merged step {cut_step}, degraded at {degraded['last_step']}, "
          f"rank 0 flowed on to {flowing['last_step']}, healed at {healed['last_step']}; "
          f"trained {steps[0][0]} steps, finished at {final['last_step']}; dropped by rank 1: {steps[1][1]}")
    assert final["last_step"] == steps[0][0]
    assert steps[1][1] == 0  # the outage fit rank 1's buffer: nothing dropped


# --- collector side: kill -9 during heavy ingest ---------------------------------------------------

FLAPPING = "[detectors.nonfinite]\nresolve_after = 1\n"  # every other step fires or resolves an alert
STREAMS = 8


def _stream_until_gone(url: str, stop: threading.Event, sent: list[int]) -> None:
    """STREAMS probes sending alert-triggering batches as fast as the collector confirms them."""

    async def one(i: int) -> None:
        try:
            async with aconnect(url) as ws:
                await ws.send(hello(f"heavy-{i}", ["a", "b"]))
                await ws.recv()
                step = 0
                while not stop.is_set():
                    records = [record(step + k + 1, 2, nonfinite_layers=(step + k) % 2) for k in range(10)]
                    step += 10
                    await ws.send(encode(Steps(records=records)))
                    await ws.recv()
                    sent[i] = step
        except (ConnectionClosed, OSError):
            pass  # the collector was killed under us

    async def all_of_them() -> None:
        await asyncio.gather(*(one(i) for i in range(STREAMS)))

    asyncio.run(all_of_them())


def test_kill_9_during_heavy_ingest_loses_no_acknowledged_alert(start_collector) -> None:
    collector = start_collector(FLAPPING)
    stop = threading.Event()
    sent = [0] * STREAMS
    streamer = threading.Thread(target=_stream_until_gone, args=(collector.ws_url, stop, sent), daemon=True)
    streamer.start()
    try:
        collector.wait_for(lambda: len(collector.get_json("/api/alerts?limit=10000")) > 400, what="heavy ingest")
        acknowledged = collector.get_json("/api/alerts?limit=10000")  # served: committed and fsynced
        collector.kill()  # right away, with 8 probes still streaming
    finally:
        stop.set()
        streamer.join(timeout=30)
    assert 400 < len(acknowledged) < 10_000
    collector.start()
    after = collector.get_json("/api/alerts?limit=10000")
    last_id = acknowledged[-1]["id"]
    assert [e for e in after if e["id"] <= last_id] == acknowledged  # every one, unchanged, in order
    print(f"\nkill -9 under {STREAMS} streaming probes ({sum(sent)} records sent): {len(acknowledged)} alerts "
          f"acknowledged before the kill, {len(after)} after restart, 0 lost")
    runs = {r["name"]: r["status"] for r in collector.get_json("/api/runs")}
    assert runs == {f"heavy-{i}": "lost" for i in range(STREAMS)}
    # the restarted collector goes on appending after the old history
    with connect(collector.ws_url) as ws:
        ws.send(hello("after-restart", ["a", "b"]))
        ws.recv(timeout=10)
        ws.send(encode(Steps(records=[record(1, 2, nonfinite_layers=1)])))
        ws.recv(timeout=10)
    newer = collector.wait_for(lambda: collector.get_json("/api/alerts?run=after-restart"), what="a new alert")
    assert newer[0]["id"] > after[-1]["id"]
