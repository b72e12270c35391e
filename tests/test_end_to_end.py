"""Real trainings with the probe against a real collector subprocess: pathologies are
detected near their onset, a healthy run stays silent, and collector outages never cost
training anything."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import gradwatch
from gradwatch.scenarios import SCENARIOS
from tests.probe_helpers import TinyNet, batches, train

pytestmark = pytest.mark.slow

# Steps from a pathology's onset to its alert, at default settings (every=10), as
# documented per detector in docs/detectors.md.
MAX_LATENCY = {
    "nonfinite": 1,
    "loss_spike": 2,
    "exploding_gradients": 30,
    "vanishing_gradients": 150,
    "dead_layer": 60,
    "plateau": 250,
    "overfitting": 150,
    "amp_scale_collapse": 30,
    "update_ratio": 60,
}


def _fired(collector, run: str) -> dict[str, int]:
    """First step of each alert kind fired for `run`."""
    first: dict[str, int] = {}
    for entry in collector.get_json(f"/api/alerts?run={run}"):
        if entry.get("event", "fired") == "fired":
            first.setdefault(entry["kind"], entry["step"])
    return first


def _ended(collector, run: str) -> bool:
    return any(r["name"] == run and r["status"] != "running" for r in collector.get_json("/api/runs"))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_is_detected_near_onset_or_stays_silent(collector, name: str) -> None:
    scenario = SCENARIOS[name]
    scenario.run(url=collector.ws_url, name=name)
    collector.wait_for(lambda: _ended(collector, name), what=f"run {name} to end")
    fired = _fired(collector, name)
    if scenario.expected is None:
        assert fired == {}, f"a healthy run raised {fired}"
        return
    assert scenario.expected in fired, f"{name}: expected {scenario.expected}, got {fired}"
    latency = fired[scenario.expected] - scenario.onset
    assert 0 <= latency <= MAX_LATENCY[scenario.expected], (name, fired)


def test_collector_killed_mid_run_and_restarted(collector) -> None:
    """kill -9 at step 100, back 5 s later: training finishes with the same weights as a
    bare run, the probe reconnects and replays its buffer, nothing is dropped."""
    torch.manual_seed(0)
    base = TinyNet()
    data = batches(600)
    bare_model = copy.deepcopy(base)
    bare = train(bare_model, torch.optim.Adam(bare_model.parameters(), lr=1e-3), data)

    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    restarted = threading.Event()

    def outage(step: int) -> None:
        if step == 100:
            collector.kill()
            threading.Timer(5.0, lambda: (collector.start(), restarted.set())).start()

    run = gradwatch.attach(model, opt, url=collector.ws_url, name="outage", every=5)
    probed = train(model, opt, data, run, pace=0.015, on_step=outage)
    assert restarted.wait(30)
    run.detach()

    assert all(torch.equal(a, b) for a, b in zip(bare, probed))
    assert run.dropped == 0
    runs = {r["name"]: r for r in collector.get_json("/api/runs")}
    assert runs["outage"]["last_step"] == 600


def test_collector_stalled_then_resumed(collector) -> None:
    """SIGSTOP: the collector accepts but reads nothing. Training is not held up; once it
    resumes, everything buffered arrives."""
    import os
    import signal

    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = gradwatch.attach(model, opt, url=collector.ws_url, name="stalled", every=1)

    def stall(step: int) -> None:
        if step == 50:
            os.kill(collector.proc.pid, signal.SIGSTOP)
            threading.Timer(3.0, os.kill, (collector.proc.pid, signal.SIGCONT)).start()

    train(model, opt, batches(400), run, pace=0.01, on_step=stall)
    run.detach()
    assert run.dropped == 0
    runs = {r["name"]: r for r in collector.get_json("/api/runs")}
    assert runs["stalled"]["last_step"] == 400


def test_collector_not_running_at_start(start_collector, tmp_path: Path) -> None:
    """The probe buffers until a collector appears, then delivers everything."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = gradwatch.attach(model, opt, url=f"ws://127.0.0.1:{port}", name="late-collector")
    holder = {}

    def start_late(step: int) -> None:
        if step == 50:
            holder["collector"] = start_collector(args=["--port", str(port)])

    train(model, opt, batches(150), run, pace=0.01, on_step=start_late)
    run.detach()
    collector = holder["collector"]
    runs = {r["name"]: r for r in collector.get_json("/api/runs")}
    assert runs["late-collector"]["last_step"] == 150
    assert run.dropped == 0


def test_killed_training_process_is_marked_lost(collector, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import time, torch, gradwatch
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        run = gradwatch.attach(model, opt, url={collector.ws_url!r}, name="doomed")
        for step in range(100000):
            opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
            time.sleep(0.01)
    """))
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        collector.wait_for(lambda: any(r["name"] == "doomed" and r["last_step"] > 20
                                       for r in collector.get_json("/api/runs")), what="training to report")
    finally:
        proc.kill()
        proc.wait()
    collector.wait_for(
        lambda: any(r["name"] == "doomed" and r["status"] == "lost" for r in collector.get_json("/api/runs")),
        what="the run to be marked lost",
    )
    assert "run_lost" in _fired(collector, "doomed")
