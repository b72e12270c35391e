"""Three real collectors, eight runs of two ranks each, every process given the same
GRADWATCH_URL listing all three: each run lands whole on one collector, and the runs spread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every (run, rank) as its own probe, as separate processes would be: the rank is read from
# RANK / WORLD_SIZE at attach, so one process can play them all (one torch import, not 16).
RANKS_SCRIPT = """
import os, sys, torch, gradwatch
probes = []
for run in sys.argv[1:]:
    for rank in (0, 1):
        os.environ["RANK"] = str(rank)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probes.append((gradwatch.attach(model, opt, name=run), model, opt))
for _ in range(5):
    for _, model, opt in probes:
        torch.nn.functional.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 1)).backward()
        opt.step()
        opt.zero_grad()
for run, _, _ in probes:
    run.detach()
"""


@pytest.mark.slow
def test_runs_of_two_ranks_each_land_whole_on_one_of_three_collectors(start_collector, tmp_path: Path) -> None:
    collectors = [start_collector() for _ in range(3)]
    addresses = ",".join(c.ws_url for c in collectors)
    runs = [f"sharded-{i}" for i in range(8)]
    env = {**os.environ, "GRADWATCH_URL": addresses, "WORLD_SIZE": "2", "GRADWATCH_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", RANKS_SCRIPT, *runs], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    def placement() -> dict[str, list[int]] | None:
        where: dict[str, list[int]] = {run: [] for run in runs}
        for index, collector in enumerate(collectors):
            for run in collector.get_json("/api/runs"):
                # finished = every one of the world's 2 ranks said bye to this collector
                if run["name"] in where and run["status"] == "finished":
                    where[run["name"]].append(index)
        return where if all(where.values()) else None

    where = collectors[0].wait_for(placement, timeout=30, what="every run finished with both ranks")
    assert all(len(found) == 1 for found in where.values()), where  # never split over collectors
    assert len({found[0] for found in where.values()}) >= 2, where  # and the runs spread
