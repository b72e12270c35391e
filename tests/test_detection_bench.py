"""The detection benchmark runs end to end on its CI subset (real trainings, replayed
through the collector's detectors) and prints its table. Its figures are never checked
here: recall and precision belong to the benchmark, not to tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_detection_quick_prints_its_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "detection.py"), "--quick", "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=380, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== detection" in done.stdout
    assert "recall" in done.stdout
