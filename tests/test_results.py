"""The LR range test's verdict and the landscape grid: the protocol's messages (round trip,
refused shapes and sizes), kept with a run's series, served as strict JSON, saved and read
back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gradwatch.collector.series import RunSeries
from gradwatch.collector.series_store import SeriesStore
from gradwatch.protocol import (
    MAX_LANDSCAPE_AXIS,
    MAX_LR_FIND_POINTS,
    ProtocolError,
    decode_probe_message,
    encode,
)

AXIS = [-1.0, -0.5, 0.0, 0.5, 1.0]


def lr_find(**change: Any) -> dict[str, Any]:
    message = {"type": "lr_find", "lrs": [1e-5, 1e-4, 1e-3], "losses": [2.0, 1.5, math.nan],
               "smoothed": [2.0, 1.8, math.nan], "suggested_lr": 1e-4, "alternative_lr": 1e-5,
               "min_loss_lr": 1e-4, "reason": "steepest <descent>", "stop_detail": "the loss was not finite"}
    return message | change


def landscape(**change: Any) -> dict[str, Any]:
    message = {"type": "landscape", "step": 7, "alphas": AXIS, "betas": AXIS, "losses": [[1.0 + a * a + b for a in AXIS]
               for b in AXIS], "centre": 1.0, "directions": ["last_update", "random"], "radius": 1.0}
    return message | change


def frame(message: dict[str, Any]) -> str:
    return json.dumps(message)  # NaN as the JSON constant, as the probe sends it


@pytest.mark.parametrize("message", [lr_find(), lr_find(suggested_lr=None), landscape(),
                                     landscape(betas=[], losses=[[1.0] * 5], directions=["random"])])
def test_round_trip(message: dict[str, Any]) -> None:
    decoded = decode_probe_message(frame(message))
    assert encode(decode_probe_message(encode(decoded))) == encode(decoded)  # (NaN != NaN: compare frames)
    assert decoded.type == message["type"]


TOO_MANY = MAX_LR_FIND_POINTS + 1
WIDE = [0.0] * (MAX_LANDSCAPE_AXIS + 2)


@pytest.mark.parametrize(
    ("what", "message", "error"),
    [
        ("lr-find points unaligned", lr_find(smoothed=[1.0]), "one of each per point"),
        ("lr-find no points", lr_find(lrs=[], losses=[], smoothed=[]), "lrs"),
        ("lr-find too many points", lr_find(lrs=[1.0] * TOO_MANY, losses=[1.0] * TOO_MANY,
                                            smoothed=[1.0] * TOO_MANY), "lrs"),
        ("lr-find reason too long", lr_find(reason="x" * 501), "reason"),
        ("landscape rows mismatch", landscape(losses=[[1.0] * 5] * 4), "betas x alphas"),
        ("landscape row too short", landscape(losses=[[1.0] * 5] * 4 + [[1.0]]), "betas x alphas"),
        ("landscape axis too long", landscape(alphas=WIDE, losses=[WIDE] * 5), "alphas"),
        ("landscape row too long", landscape(losses=[WIDE] * 5), "losses"),
        ("landscape too few points", landscape(alphas=[0.0]), "alphas"),
        ("landscape line with betas", landscape(directions=["random"]), "no betas"),
        ("landscape plane without betas", landscape(betas=[]), "at least 3 betas"),
        ("landscape unknown direction", landscape(directions=["up", "down"]), "directions"),
        ("landscape three directions", landscape(directions=["random"] * 3), "directions"),
        ("landscape radius", landscape(radius=0.0), "radius"),
        ("landscape unknown field", landscape(extra=1), "extra"),
    ],
)
def test_bad_shapes_and_sizes_are_refused(what: str, message: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtocolError, match=error) as refused:
        decode_probe_message(frame(message))
    assert refused.value.code == 1007


def with_results() -> RunSeries:
    series = RunSeries()
    series.keep(decode_probe_message(frame(lr_find())))  # type: ignore[arg-type]
    series.keep(decode_probe_message(frame(landscape())))  # type: ignore[arg-type]
    return series


def test_results_are_served_once_as_strict_json() -> None:
    series = with_results()
    first = series.since(0)
    json.dumps(first, allow_nan=False)
    assert first["results"]["lr_find"]["losses"] == [2.0, 1.5, None]  # not finite: not drawn
    assert first["results"]["landscape"]["losses"][2][2] == 1.0
    assert series.since(series.version)["results"] == {}
    newer = decode_probe_message(frame(landscape(step=9)))
    series.keep(newer)  # type: ignore[arg-type]
    assert list(series.since(series.version - 1)["results"]) == ["landscape"]
    assert series.since(0)["results"]["landscape"]["step"] == 9  # the newest grid replaces the older


def test_results_are_saved_and_read_back_exactly(tmp_path: Path) -> None:
    series = with_results()
    SeriesStore(tmp_path).save("lr-run", series)
    loaded = SeriesStore(tmp_path).load("lr-run")
    assert loaded is not None
    assert loaded.results.to_json() == series.results.to_json()  # NaN kept, not turned into null
    assert loaded.since(0)["results"] == series.since(0)["results"]
    assert loaded.nbytes >= series.results.nbytes > 0


@pytest.mark.parametrize("saved", [{"lr_find": "{}"}, {"lr_find": json.dumps(landscape())}, {"landscape": 3}])
def test_a_bad_saved_result_is_refused(saved: dict[str, Any]) -> None:
    data = json.loads(json.dumps(RunSeries().to_json())) | {"results": saved}
    with pytest.raises(ValueError, match="saved"):
        RunSeries.from_json(data)


def test_a_file_saved_before_results_still_loads() -> None:
    data = json.loads(json.dumps(RunSeries().to_json()))
    del data["results"]
    assert RunSeries.from_json(data).since(0)["results"] == {}
