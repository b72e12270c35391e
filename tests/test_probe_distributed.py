"""DDP and FSDP2 with 2 CPU ranks over gloo: every rank reports; replicated gradients are
the same on both ranks, sharded ones are partial squares that sum to the full norm."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradwatch
from tests.probe_helpers import TinyNet, batches, read_spool

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker: Callable[..., None], mode: str, out: Path, results: str) -> None:
    """Runs `worker` on 2 gloo ranks. Now and then a rank that finished aborts in gloo's
    teardown ("terminate called without an active exception", SIGABRT) under a loaded
    machine: once every rank wrote its results (`results` with {rank}), that is not what
    the test checks."""
    try:
        mp.spawn(worker, args=(2, _free_port(), mode, str(out)), nprocs=2, join=True)
    except mp.ProcessExitedException as err:
        if err.signal_name != "SIGABRT" or not all((out / results.format(rank=r)).exists() for r in range(2)):
            raise


def _model(mode: str, world: int) -> torch.nn.Module:
    """The same TinyNet on every rank, under DDP or FSDP2."""
    torch.manual_seed(0)
    model = TinyNet()
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def _worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model = _model(mode, world)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        run = gradwatch.attach(model, opt, url=f"file:{out}/spool.jsonl", name=f"dist-{mode}", every=1)
        reference = []
        for x, y in batches(3, seed=rank):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            full = 0.0
            for p in model.parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                full += float(torch.linalg.vector_norm(g.double())) ** 2
            reference.append(full)
            opt.step()
        run.detach()
        Path(out, f"ref-{rank}.json").write_text(json.dumps(reference))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_report_norms_the_collector_can_merge(tmp_path: Path, mode: str) -> None:
    _spawn(_worker, mode, tmp_path, "ref-{rank}.json")
    spools = [read_spool(tmp_path / f"spool.jsonl.rank{rank}") for rank in range(2)]  # one spool per rank
    reference = json.loads((tmp_path / "ref-0.json").read_text())
    for rank, (hello, records, _) in enumerate(spools):
        assert (hello.rank, hello.world_size) == (rank, 2)
        assert hello.sharded == (mode == "fsdp2")
        assert hello.layers == spools[0][0].layers
        assert len(records) == 3
    for step in range(3):
        per_rank = [spools[r][1][step].grad_norm_sq for r in range(2)]
        if mode == "ddp":  # all-reduced: each rank sees the full gradient
            assert per_rank[0] == pytest.approx(reference[step], rel=1e-5)
            assert per_rank[1] == pytest.approx(reference[step], rel=1e-5)
        else:  # sharded: partial squares, summed (never averaged) by the collector
            assert sum(per_rank) == pytest.approx(reference[step], rel=1e-5)
            assert 0 < per_rank[0] < reference[step]


def _guarded_worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    """Rank 1's fourth batch is poisoned. Under DDP its NaN reaches every rank's averaged
    gradient; under FSDP2 only rank 1's shard holds it, and clip_grad_norm_'s global norm
    tells every rank."""
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model = _model(mode, world)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        run = gradwatch.attach(model, opt, url=f"file:{out}/spool.jsonl", name=f"guard-{mode}", every=1, actions=True)
        from gradwatch import protocol

        run._actions.receive(protocol.Action(id="arm", kind="skip_step", step=1, params={"on": "nonfinite"}))
        for step, (x, y) in enumerate(batches(6, seed=rank), start=1):
            if step == 4 and rank == 1:
                x = x.clone()
                x[0, 0] = float("nan")
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
        run.detach()
        weights = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
        Path(out, f"finite-{rank}.json").write_text(json.dumps(all(bool(w.isfinite().all()) for w in weights)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_every_rank_skips_the_same_poisoned_step(tmp_path: Path, mode: str) -> None:
    _spawn(_guarded_worker, mode, tmp_path, "finite-{rank}.json")
    for rank in range(2):
        _, records, _ = read_spool(tmp_path / f"spool.jsonl.rank{rank}")
        assert [r.step for r in records if r.skipped] == [4], rank
        assert json.loads((tmp_path / f"finite-{rank}.json").read_text()) is True
