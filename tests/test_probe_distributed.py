"""DDP and FSDP2 with 2 CPU ranks over gloo: every rank reports; replicated gradients are
the same on both ranks, sharded ones are partial squares that sum to the full norm."""

from __future__ import annotations

import json
import os
import socket
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


def _worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyNet()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
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
    mp.spawn(_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=2, join=True)
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
