"""Actions with real training and a real collector: reduce_lr survives a scheduler and gets
a plateaued loss falling again, skip_step leaves weights as if the poisoned batch never
came, stop ends the loop cleanly, and with actions off nothing the collector says can
change training."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from websockets.asyncio.server import serve

import gradwatch
from gradwatch import protocol
from gradwatch.scenarios import SCENARIOS
from tests.probe_helpers import TinyNet, batches

pytestmark = pytest.mark.slow

PLATEAU_POLICY = '[actions.plateau]\naction = "reduce_lr"\nfactor = 0.5\ncooldown = 150\nmin_lr = 1e-4\n'


def _entries(collector, run: str, event: str) -> list[dict]:
    return [e for e in collector.get_json(f"/api/alerts?run={run}") if e.get("event") == event]


def test_plateau_gets_its_lr_reduced_and_the_loss_falls_again(start_collector) -> None:
    collector = start_collector(config=PLATEAU_POLICY)
    plateau = SCENARIOS["plateau"]
    without = plateau.run(url=collector.ws_url, name="plateau-off", pace=0.004)
    with_actions = plateau.run(url=collector.ws_url, name="plateau-on", pace=0.004, actions=True)
    collector.wait_for(lambda: _entries(collector, "plateau-on", "ack"), what="an ack")
    acks = _entries(collector, "plateau-on", "ack")
    assert acks and all(a["message"].startswith("applied") or "applied" in a["message"] for a in acks)
    assert _entries(collector, "plateau-off", "action") == []
    # the LR-limited floor halves with the LR: the last stretch is clearly lower
    assert with_actions.mean_loss(150) < 0.8 * without.mean_loss(150)


class _Recorder:
    """A step-by-step view of what the optimizer's LR was, read inside optimizer.step."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.lrs: list[float] = []
        opt.register_step_pre_hook(lambda o, a, k: self.lrs.append(o.param_groups[0]["lr"]))


def test_reduce_lr_is_a_persistent_factor_over_a_scheduler() -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    run = gradwatch.attach(model, opt, url="ws://127.0.0.1:9", actions=True, name="sched")
    seen = _Recorder(opt)
    run._actions.receive(protocol.Action(id="a1", kind="reduce_lr", step=10, params={"factor": 0.5}))
    for x, y in batches(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    run.detach()
    expected = [0.1 * (1 + math.cos(math.pi * i / 100)) / 2 for i in range(30)]
    for i, (got, want) in enumerate(zip(seen.lrs, expected)):
        factor = 0.5 if i + 1 >= 10 else 1.0  # step numbers are 1-based
        assert got == pytest.approx(want * factor), i
    # after detach the scheduler's own LR is in place, untouched by the factor
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 30 / 100)) / 2)


def _train_with_poison(model, opt, data, poison_step: int, run=None, wait_armed=None):
    for step, (x, y) in enumerate(data, start=1):
        if step == poison_step:
            if wait_armed is not None:
                wait_armed()
            x = x.clone()
            x[0, 0] = math.nan
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_skip_step_leaves_weights_as_if_the_batch_never_came(start_collector) -> None:
    collector = start_collector(config='[actions.nonfinite]\naction = "skip_step"\n')
    torch.manual_seed(0)
    base = TinyNet()
    data = batches(60)
    poison = 30

    clean_model = copy.deepcopy(base)
    clean_opt = torch.optim.Adam(clean_model.parameters(), lr=1e-2)
    clean = _train_with_poison(clean_model, clean_opt, data[: poison - 1] + data[poison:], poison_step=-1)

    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = gradwatch.attach(model, opt, url=collector.ws_url, name="poisoned", actions=True)

    def wait_armed() -> None:  # the arming action travels right after the welcome
        deadline = time.monotonic() + 20
        while not run._actions.guard_pending("nonfinite") and time.monotonic() < deadline:
            time.sleep(0.05)

    skipped = _train_with_poison(model, opt, data, poison, run, wait_armed)
    run.detach()
    assert all(torch.isfinite(p).all() for p in skipped)
    assert all(torch.equal(a, b) for a, b in zip(clean, skipped))
    records = collector.wait_for(lambda: _entries(collector, "poisoned", "ack"), what="the arming ack")
    assert records[0]["kind"] in ("nonfinite", "skip_step")


def test_stop_ends_the_loop_cleanly(start_collector) -> None:
    collector = start_collector(config='[actions.nonfinite]\naction = "stop"\n')
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stopped_at = None
    with gradwatch.attach(model, opt, url=collector.ws_url, name="to-stop", actions=True) as run:
        try:
            for step, (x, y) in enumerate(batches(2000), start=1):
                if step == 20:
                    y = y * math.nan
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                time.sleep(0.01)
        except gradwatch.StopTraining as stop:
            stopped_at = step
            assert "nonfinite" in str(stop)
    assert stopped_at is not None and stopped_at < 2000
    assert run.should_stop
    collector.wait_for(
        lambda: any(r["name"] == "to-stop" and r["status"] == "stopped" for r in collector.get_json("/api/runs")),
        what="the run to be marked stopped",
    )


def test_with_actions_off_nothing_from_the_collector_changes_training(tmp_path: Path) -> None:
    """A collector that sends every action it can, unasked: training is untouched."""
    actions = [
        protocol.Action(id=f"x{i}", kind=kind, step=1, params=params, reason="unasked")
        for i, (kind, params) in enumerate(
            [("reduce_lr", {"factor": 0.01}), ("skip_step", {"on": "nonfinite"}), ("stop", {}), ("checkpoint", {})]
        )
    ]
    received = []

    async def handler(ws) -> None:
        hello = protocol.decode_probe_message(await ws.recv())
        await ws.send(protocol.encode(protocol.Welcome(run=hello.run, actions=True)))
        for action in actions:
            await ws.send(protocol.encode(action))
        async for message in ws:
            received.append(json.loads(message)["type"])

    ready = threading.Event()
    port_box = {}
    stop_box = {}

    def serve_forever() -> None:
        async def main() -> None:
            stop_box["event"] = asyncio.Event()
            stop_box["loop"] = asyncio.get_running_loop()
            async with serve(handler, "127.0.0.1", 0) as server:
                port_box["port"] = server.sockets[0].getsockname()[1]
                ready.set()
                await stop_box["event"].wait()

        asyncio.run(main())

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    assert ready.wait(10)
    torch.manual_seed(0)
    base = TinyNet()
    data = batches(80)
    bare_model = copy.deepcopy(base)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.05)
    bare = _train_with_poison(bare_model, bare_opt, data, poison_step=-1)

    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = gradwatch.attach(model, opt, url=f"ws://127.0.0.1:{port_box['port']}", name="hands-off")
    for step, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        time.sleep(0.01)
    run.detach()
    stop_box["loop"].call_soon_threadsafe(stop_box["event"].set)
    assert not run.should_stop
    assert "ack" not in received and "steps" in received
    assert all(torch.equal(a, p) for a, p in zip(bare, model.parameters()))


def _ddp_worker(rank: int, world: int, port: int, url: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TinyNet())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with gradwatch.attach(model, opt, url=url, name="ddp-actions", actions=True) as run:
            seen = _Recorder(opt)  # after attach: its hook sees the LR the step uses
            for step, (x, y) in enumerate(batches(400, seed=rank), start=1):
                if step == 100:
                    y = y * 1000.0  # the same corrupted batch reaches both ranks
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                run.log(loss=loss)
                loss.backward()
                opt.step()
                time.sleep(0.01)
        changed = [i + 1 for i in range(1, len(seen.lrs)) if seen.lrs[i] != seen.lrs[i - 1]]
        Path(out, f"lr-change-{rank}.json").write_text(json.dumps(changed))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_apply_an_action_at_the_same_step(start_collector, tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    collector = start_collector(config='[actions.loss_spike]\naction = "reduce_lr"\nfactor = 0.5\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, collector.ws_url, str(tmp_path)), nprocs=2, join=True)
    changes = [json.loads((tmp_path / f"lr-change-{r}.json").read_text()) for r in range(2)]
    assert changes[0] and changes[0] == changes[1], changes
    acks = collector.wait_for(lambda: len(_entries(collector, "ddp-actions", "ack")) == 2 and
                              _entries(collector, "ddp-actions", "ack"), what="both ranks' acks")
    assert {a["step"] for a in acks} == {changes[0][0]}


def test_a_tensor_lr_is_recorded_and_reduced_as_a_tensor(tmp_path: Path) -> None:
    """Fused/capturable optimizers take the LR as a tensor: the probe records it without
    reading it on the training thread, and reduce_lr keeps it a tensor (no `bool(tensor)`)."""
    from tests.probe_helpers import read_spool

    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01))
    spool = tmp_path / "spool.jsonl"
    run = gradwatch.attach(model, opt, url=f"file:{spool}", actions=True, name="tensor-lr")
    run._actions.receive(protocol.Action(id="a", kind="reduce_lr", step=2, params={"factor": 0.5, "min_lr": 1e-6}))
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    for x, y in batches(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    run.detach()
    assert all(isinstance(lr, torch.Tensor) for lr in seen)
    assert [r.lr for r in read_spool(spool)[1]] == [[pytest.approx(0.01)], [pytest.approx(0.005)], [pytest.approx(0.005)]]
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)
