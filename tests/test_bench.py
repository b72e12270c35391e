"""The benchmarks run end to end in their --quick form and print their tables.
Their numbers are never checked here: timing belongs to the benchmarks, not to tests.
Also the one probe feature the overhead bench relies on: pausing a run with `enabled`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradwatch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str, prelude: str = "") -> str:
    """The benchmark's --quick run; `prelude` is Python run first in the same process."""
    command = [sys.executable, str(BENCH / script), "--quick", *args]
    if prelude:
        code = (f"{prelude}\nimport runpy, sys\nsys.argv = {command[1:]!r}\n"
                f"sys.path.insert(0, {str(BENCH)!r})\nrunpy.run_path(sys.argv[0], run_name='__main__')")
        command = [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overhead_quick_prints_its_tables() -> None:
    out = run_bench("overhead.py")
    for workload in ("gpt", "mlp", "cnn-bn", "gpt-accum4-amp"):
        assert f"== {workload}:" in out
    assert "== summary" in out
    for condition in ("gradwatch every=10 (default)", "gradwatch every=1 no Δw", "naive .norm().item()",
                      "bandwidth floor"):
        assert condition in out
    # the real anchors run where bench/requirements.txt is installed, and are said to be skipped where not
    for module, condition in (("wandb", "wandb.watch log=all log_freq=1"),
                              ("tensorboard", "tensorboard add_histogram")):
        assert (condition in out) == installed(module), out[-3000:]
    assert "!!" not in out  # the probe neither switched itself off nor dropped records
    assert "already attached" not in out  # three distinct runs, not one returned three times


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overhead_says_in_one_line_which_anchors_are_missing() -> None:
    hide = "import sys\nsys.modules['wandb'] = None\nsys.modules['torch.utils.tensorboard'] = None"
    out = run_bench("overhead.py", "--only", "gpt", prelude=hide)
    assert "== gpt:" in out and "gradwatch every=10 (default)" in out
    assert "wandb.watch" not in out and "tensorboard add_histogram" not in out
    note = [line for line in out.splitlines() if "not installed: wandb, tensorboard" in line]
    assert note and "pip install -r bench/requirements.txt" in note[0], out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_collector_quick_prints_its_table() -> None:
    out = run_bench("collector.py")
    assert "== collector:" in out
    for measure in ("sustained messages/s", "latency send -> visible", "/metrics, 10 runs", "memory per run"):
        assert measure in out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium (scripts/setup)")
def test_page_load_quick_prints_its_table() -> None:
    out = run_bench("page_load.py")
    assert "== page load:" in out
    for measure in ("run page: data drawn (ms)", "run list: data drawn (ms)", "history kept for the run"):
        assert measure in out


def test_backward_tap_prints_its_cost() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "backward_tap.py"), "--calls", "500", "--repeats", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "us per call" in done.stdout


def test_a_paused_run_records_nothing_and_resumes(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.attach(model, optimizer, url=f"file:{tmp_path / 'spool.jsonl'}", name="paused")

    def step() -> None:
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()

    run.enabled = False
    step()
    assert run.step == 0
    run.enabled = True
    step()
    assert run.step == 1
    run.detach()
