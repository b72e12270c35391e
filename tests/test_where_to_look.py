"""Where to look: `attach` says where its run's page is, once, on stderr; `gradwatch demo`
ends with the address of the runs (and, run from a script, exits)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from typing import Any

import pytest

pytestmark = pytest.mark.slow

TRAINING = textwrap.dedent("""
    import sys, torch, gradwatch
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = gradwatch.attach(model, opt, url=sys.argv[1], name="look:here")
    for _ in range(30):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward(); opt.step(); opt.zero_grad()
    run.detach()
""")


@pytest.mark.parametrize(("quiet", "lines"), [("", 1), ("1", 0)], ids=["said", "GRADWATCH_QUIET=1"])
def test_attach_prints_the_run_page_once_connected(collector: Any, quiet: str, lines: int) -> None:
    done = subprocess.run([sys.executable, "-c", TRAINING, collector.ws_url], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "GRADWATCH_QUIET": quiet})
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("gradwatch: run")]
    assert said == [f"gradwatch: run look:here is live at {collector.http_url}/runs/look:here"][:lines]
    if said:
        url = said[0].rsplit(" ", 1)[1]
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b'id="heatmap"' in page.read()


def test_demo_ends_with_the_address_of_its_runs_and_exits_when_not_in_a_terminal() -> None:
    done = subprocess.run([sys.executable, "-m", "gradwatch", "demo", "--scenarios", "healthy", "--no-actions"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^see the runs: http://127\.0\.0\.1:\d+/$", done.stdout, re.MULTILINE), done.stdout
    assert "serving until Ctrl-C" not in done.stdout
