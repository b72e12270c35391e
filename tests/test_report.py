"""`gradwatch report`: the run page as one self-contained file (gradwatch/client/report.py)."""

from __future__ import annotations

import json
import re

from gradwatch.client.report import report_html
from gradwatch.collector.detectors.base import Observation
from gradwatch.collector.series import RunSeries
from gradwatch.protocol import Landscape, LRFind

HOSTILE = "</script><script>alert(1)</script>"


def page() -> str:
    series = RunSeries()
    for step in range(20):
        series.observe(Observation(step=step, time=float(step), loss=1.0, layers=("a",), layer_grad_norm=(1.0,)))
    data = json.loads(json.dumps(series.since(0)))
    alerts = [{"run": "r", "event": "fired", "kind": "loss_spike", "severity": "warning", "step": 3, "layer": None,
               "message": HOSTILE, "hint": "lower the LR & <retry>", "time": 1.0, "id": 1}]
    return report_html({"name": "r", "status": "finished", "tags": {"note": HOSTILE}}, data, alerts, 0.0)


def test_the_report_needs_nothing_outside_itself() -> None:
    html = page()
    assert re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?!data:)', html) == []
    assert "uPlot" in html and "class Heatmap" in html and ".panel" in html


def test_network_text_cannot_end_the_data_script() -> None:
    html = page()
    data = html[html.index("window.GRADWATCH_REPORT = "):]
    data = data[:data.index("</script>")]
    assert HOSTILE not in html and "\\u003c/script\\u003e" in data
    payload = json.loads(data[len("window.GRADWATCH_REPORT = "):].rstrip().rstrip(";"))
    assert payload["series"]["markers"][0]["message"] == HOSTILE  # the page sets it as text
    assert payload["series"]["reset"] is True


def test_the_lr_range_test_and_the_landscape_are_in_the_report() -> None:
    series = RunSeries()
    series.keep(LRFind(lrs=[1e-4, 1e-3, 1e-2], losses=[2.0, 1.0, 9.0], smoothed=[2.0, 1.5, 4.0], suggested_lr=1e-3,
                       alternative_lr=1e-4, min_loss_lr=1e-3, reason=HOSTILE))
    series.keep(Landscape(step=3, alphas=[-1.0, 0.0, 1.0], betas=[-1.0, 0.0, 1.0], losses=[[1.0, 2.0, 3.0]] * 3,
                          centre=2.0, directions=["random", "random"], radius=1.0))
    html = report_html({"name": "r-lr-find", "tags": {"kind": "lr-find"}}, json.loads(json.dumps(series.since(0))),
                       [], 0.0)
    assert "class Results" in html and 'id="lr-find-chart"' in html and 'id="landscape-chart"' in html
    data = html[html.index("window.GRADWATCH_REPORT = ") + len("window.GRADWATCH_REPORT = "):]
    payload = json.loads(data[:data.index("</script>")].rstrip().rstrip(";"))
    results = payload["series"]["results"]
    assert results["lr_find"]["reason"] == HOSTILE and results["lr_find"]["suggested_lr"] == 1e-3
    assert results["landscape"]["betas"] == [-1.0, 0.0, 1.0]
