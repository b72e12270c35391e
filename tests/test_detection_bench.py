"""The detection benchmark runs end to end on its CI subset (real trainings, replayed
through the collector's detectors) and prints its table; the held-out table quoted in the
README and docs/detectors.md is what the benchmark prints at this commit. Its figures are
never judged here: recall and precision belong to the benchmark, not to tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Spools shared by both tests: the quick subset and the held-out half overlap."""
    return tmp_path_factory.mktemp("detection-cache")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_detection_quick_prints_its_table(cache: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "detection.py"), "--quick", "--cache", str(cache)],
        capture_output=True, text=True, timeout=380, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== detection" in done.stdout
    assert "recall" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_held_out_table_in_the_docs_is_what_the_benchmark_prints(cache: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "detection.py"), "--check-docs", "--cache", str(cache)],
        capture_output=True, text=True, timeout=880, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
