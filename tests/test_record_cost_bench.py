"""`bench/record_cost.py --quick` runs and prints both of its parts (the benchmark itself is
read by people; this keeps it from rotting)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_record_cost_quick_prints_both_parts() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "record_cost.py"), "--quick"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "== path: us per record" in out and "every=10" in out
    assert "== thread:" in out and "reading + writing records" in out and "sink.send" in out
