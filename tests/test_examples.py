"""Every shipped example is a healthy run: it trains, its loss falls, and the collector's
default detectors (replayed from the example's offline spool, as the collector would run
them) raise nothing. A new user's first run must not raise an alert on its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.detection import replay
from gradwatch.protocol import Hello, StepRecord, Steps, decode_probe_message

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py"))
NEEDS = {"hf_trainer.py": "transformers", "lightning_train.py": "lightning", "accelerate_loop.py": "accelerate"}


def test_every_example_is_listed() -> None:
    assert set(EXAMPLES) == {"plain_loop.py", "accumulation_amp.py", "manual_update.py", "ddp.py", "lr_find.py",
                             *NEEDS}


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_example_runs_clean(tmp_path: Path, example: str) -> None:
    if example in NEEDS:
        pytest.importorskip(NEEDS[example])
    spool = tmp_path / "spool.jsonl"
    command = [sys.executable, str(REPO / "examples" / example)]
    if example == "ddp.py":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", command[1]]
    env = {**os.environ, "GRADWATCH_URL": f"file:{spool}", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    spools = sorted(tmp_path.glob("spool.jsonl*"))
    assert spools, "the example wrote no spool"
    alerts = replay(*spools)
    assert not alerts, [(a.kind, a.step, a.layer, a.message) for a in alerts]
    training = _trained_run(spools[0])
    losses = [r.loss for r in training if r.loss is not None]
    assert len(losses) >= 40
    head, tail = losses[:10], losses[-10:]
    assert sum(tail) / len(tail) < 0.7 * sum(head) / len(head), "the loss did not fall"


def _trained_run(spool: Path) -> list[StepRecord]:
    """The records of the spool's last run that is not an LR range test (lr_find.py writes
    its range test, a run of its own, to the same spool first)."""
    runs: list[tuple[Hello, list[StepRecord]]] = []
    for line in spool.read_text().splitlines():
        message = decode_probe_message(line)
        if isinstance(message, Hello):
            runs.append((message, []))
        elif isinstance(message, Steps):
            runs[-1][1].extend(message.records)
    return [records for hello, records in runs if hello.tags.get("kind") != "lr-find"][-1]
