"""The web view in a real browser: Debian's chromium, headless, driven by Playwright (from
PyPI, pointed at /usr/bin/chromium: never `playwright install`), against a real collector
subprocess and real trainings. Skipped where chromium or playwright is missing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from websockets.sync.client import connect

import gradwatch
from gradwatch import protocol
from gradwatch.scenarios import SCENARIOS

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup installs it)"),
]

# What a page may take to show what the collector has: its stream pushes every 0.25 s.
LIVE_SECONDS = 2.0
# Counts the drawn (non-transparent) pixels of every shown canvas under an element (a panel
# with nothing to show is hidden).
CANVAS_PIXELS_IN = """(root) => [...document.querySelector(root).querySelectorAll('canvas')]
  .filter((c) => c.getClientRects().length).map((c) => {
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let drawn = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i]) drawn++;
  return drawn;
})"""
CANVAS_PIXELS = f"({CANVAS_PIXELS_IN})('body')"


class Page:
    """A browser tab that remembers every console error and uncaught exception."""

    def __init__(self, browser: Any) -> None:
        self.tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.tab.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.tab.on("pageerror", lambda e: self.errors.append(str(e)))

    def wait(self, script: str, timeout: float = 20.0) -> Any:
        """Polls `script` (evaluated in the page) until it is truthy. Not the in-page
        `wait_for_function`: the page's CSP refuses its eval."""
        deadline = time.monotonic() + timeout
        while not (result := self.tab.evaluate(script)):
            assert time.monotonic() < deadline, f"timed out waiting for {script}; console: {self.errors}"
            time.sleep(0.05)
        return result

    def drawn(self) -> None:
        self.wait("performance.getEntriesByName('gradwatch:drawn').length > 0")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        # --no-sandbox: the tests may run as root, where chromium's sandbox refuses to start
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield instance
        instance.close()


def train_in_background(collector: Any, scenario: str, name: str, pace: float) -> threading.Thread:
    thread = threading.Thread(
        target=SCENARIOS[scenario].run, kwargs={"url": collector.ws_url, "name": name, "every": 5, "pace": pace},
        daemon=True,
    )
    thread.start()
    collector.wait_for(lambda: any(r["name"] == name for r in collector.get_json("/api/runs")), what=f"run {name}")
    return thread


def open_run_from_the_list(browser: Any, collector: Any, name: str) -> Page:
    """As a person would: the run list, then a click on the run."""
    page = Page(browser)
    page.tab.goto(collector.http_url + "/")
    page.drawn()
    page.tab.get_by_role("link", name=name, exact=True).click()
    page.tab.wait_for_url(f"**/runs/{urllib.parse.quote(name, safe='')}")
    page.drawn()
    return page


def test_run_list_and_run_page_draw_without_errors(browser: Any, collector: Any) -> None:
    train_in_background(collector, "dead_layer", "browser-drawn", pace=0.0).join(timeout=120)
    page = open_run_from_the_list(browser, collector, "browser-drawn")
    page.wait("document.querySelectorAll('.uplot').length >= 6")
    pixels = page.tab.evaluate(CANVAS_PIXELS)
    assert len(pixels) >= 8 and all(n > 0 for n in pixels), pixels  # 6+ charts, the heatmap and its scale
    box = page.tab.locator("#heatmap").bounding_box()
    page.tab.locator("#heatmap").hover(position={"x": box["width"] * 0.9, "y": 3})
    tip = page.tab.locator("#flow-tip")
    assert tip.is_visible() and "step" in tip.text_content() and "grad norm" in tip.text_content()
    assert page.tab.locator("#alerts tr", has_text="dead_layer").count() >= 1
    assert page.errors == []


def test_an_alert_appears_on_the_open_page_without_reload(browser: Any, collector: Any) -> None:
    scenario = SCENARIOS["loss_spike"]
    # Paced so that the page is open well before the pathology's onset (step 200).
    training = train_in_background(collector, "loss_spike", "browser-live", pace=0.03)
    page = open_run_from_the_list(browser, collector, "browser-live")
    assert page.tab.locator("#alerts tr").count() == 0, "the alert fired before the page was open"
    seen = None
    while seen is None and training.is_alive():
        if page.tab.locator("#alerts tr", has_text="loss_spike").count():
            seen = time.time()
        time.sleep(0.02)
    training.join(timeout=60)
    fired = [e for e in collector.get_json("/api/alerts?run=browser-live") if e["kind"] == "loss_spike"]
    assert fired and seen is not None, f"{scenario.name}: fired {fired}, on the page: {seen}"
    assert seen - fired[0]["time"] <= LIVE_SECONDS
    assert page.tab.evaluate("performance.getEntriesByType('navigation').length") == 1  # never reloaded
    assert page.errors == []


def test_network_text_is_shown_as_text(browser: Any, collector: Any) -> None:
    hostile = '<img src=x onerror="document.body.dataset.owned=1">'
    layers = ["<b>dead</b>", "head"]
    with connect(collector.ws_url) as ws:
        ws.send(protocol.encode(protocol.Hello(v=protocol.PROTOCOL_VERSION, run="hostile", layers=layers,
                                               tags={"note": hostile})))
        ws.recv()
        records = [protocol.StepRecord(step=s, time=time.time(), loss=1.0, grad_norm_sq=1.0,
                                       layer_grad_sq=[0.0, 1.0], layer_weight_sq=[1.0, 1.0])
                   for s in range(60)]
        ws.send(protocol.encode(protocol.Steps(records=records)))
        ws.recv()
        page = Page(browser)
        page.tab.goto(f"{collector.http_url}/runs/hostile")
        page.drawn()
        page.wait("document.querySelector('#alerts tr') !== null")
    assert page.tab.locator("#facts", has_text=hostile).count() == 1
    assert page.tab.locator("#alerts", has_text="<b>dead</b>").count() == 1
    assert page.tab.evaluate("document.querySelectorAll('img, main b').length") == 0
    assert page.tab.evaluate("document.body.dataset.owned") is None
    assert page.errors == []


def test_a_finished_run_page_works_after_a_restart_and_as_a_report(browser: Any, collector: Any,
                                                                  tmp_path: Path) -> None:
    train_in_background(collector, "nonfinite", "browser-kept", pace=0.0).join(timeout=120)
    collector.wait_for(lambda: [r for r in collector.get_json("/api/runs")
                                if r["name"] == "browser-kept" and r["status"] == "finished"], what="the run to end")
    before = collector.get_json("/api/runs/browser-kept/series")
    collector.kill()  # kill -9: the page was saved when the run ended, not at shutdown
    collector.start()
    after = collector.get_json("/api/runs/browser-kept/series")
    assert (after["last_step"], after["curves"], after["markers"]) == (
        before["last_step"], before["curves"], before["markers"])
    assert any(m["kind"] == "nonfinite" for m in after["markers"])
    page = Page(browser)
    page.tab.goto(f"{collector.http_url}/runs/browser-kept")
    page.drawn()
    assert all(n > 0 for n in page.tab.evaluate(CANVAS_PIXELS))
    assert page.errors == []

    report = tmp_path / "run.html"
    written = subprocess.run([sys.executable, "-m", "gradwatch", "report", "browser-kept", "-o", str(report),
                              "--url", collector.http_url], capture_output=True, text=True, timeout=60, check=False)
    assert written.returncode == 0, written.stderr
    collector.stop()  # the report needs no collector
    page = Page(browser)
    page.tab.goto(report.as_uri())
    page.drawn()
    assert all(n > 0 for n in page.tab.evaluate(CANVAS_PIXELS))
    assert page.tab.locator("#alerts tr", has_text="nonfinite").count() >= 1
    assert page.errors == []


def canvas_pixels(page: Page, selector: str) -> int:
    return sum(page.tab.evaluate(CANVAS_PIXELS_IN, selector))


def teacher(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 8, generator=generator)
    return [(inputs, inputs @ torch.linspace(-1, 1, 8).unsqueeze(1))]


def test_an_lr_find_run_and_a_landscape_draw_on_their_pages(browser: Any, collector: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result = gradwatch.lr_find(model, optimizer, teacher(0), F.mse_loss, steps=60, name="browser",
                               url=collector.ws_url)
    page = Page(browser)
    page.tab.goto(f"{collector.http_url}/runs/browser-lr-find")
    page.drawn()
    page.wait("!document.querySelector('#lr-find').hidden && document.querySelector('.verdict b') !== null")
    assert canvas_pixels(page, "#lr-find") > 0
    verdict = page.tab.locator("#lr-find-verdict").text_content()
    assert result.reason in verdict and "suggested lr" in verdict and "alternative" in verdict
    assert page.tab.locator("#landscape").is_hidden()
    page.tab.locator("#lr-find").screenshot(path=str(tmp_path / "lr-find.png"))
    assert page.errors == []

    for directions in (1, 2):
        name = f"browser-landscape-{directions}"
        run = gradwatch.attach(model, optimizer, name=name, url=collector.ws_url)
        for inputs, targets in teacher(1) * 3:
            optimizer.zero_grad()
            F.mse_loss(model(inputs), targets).backward()
            optimizer.step()
        run.landscape(teacher(2), F.mse_loss, directions=directions, points=9)
        run.detach()
        page = Page(browser)
        page.tab.goto(f"{collector.http_url}/runs/{name}")
        page.drawn()
        page.wait("!document.querySelector('#landscape').hidden")
        assert canvas_pixels(page, "#landscape") > 0 and page.tab.locator("#lr-find").is_hidden()
        assert "step 3" in page.tab.locator("#landscape-note").text_content()
        page.tab.locator("#landscape").screenshot(path=str(tmp_path / f"{name}.png"))
        assert page.errors == []

    report = tmp_path / "landscape.html"
    written = subprocess.run([sys.executable, "-m", "gradwatch", "report", "browser-landscape-2", "-o", str(report),
                              "--url", collector.http_url], capture_output=True, text=True, timeout=60, check=False)
    assert written.returncode == 0, written.stderr
    page = Page(browser)
    page.tab.goto(report.as_uri())
    page.drawn()
    assert canvas_pixels(page, "#landscape") > 0
    assert page.errors == []
