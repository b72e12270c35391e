"""The web view's history (collector/series.py, flow.py, buckets.py): observations in, the
JSON the page draws out. Tables of cases, each a trace and what the page must get."""

from __future__ import annotations

import base64
import json
import math
from array import array
from pathlib import Path
from typing import Any

import pytest

from gradwatch.collector.detectors.base import Observation
from gradwatch.collector.flow import EMPTY, MAX_ROWS, GradientFlow
from gradwatch.collector.series import (
    BUCKETS,
    MAX_LOGGED,
    MAX_LR_GROUPS,
    MAX_MARKERS,
    Marker,
    RunSeries,
)
from gradwatch.collector.series_store import SeriesStore

INF = math.inf
NAN = math.nan


def feed(observations: list[Observation]) -> RunSeries:
    series = RunSeries()
    for obs in observations:
        series.observe(obs)
    return series


def steps(n: int, start: int = 0, **values: Any) -> list[Observation]:
    """n consecutive steps, one per 0.1 s, with the same values (callables get the step)."""
    return [
        Observation(step=s, time=s / 10, **{k: v(s) if callable(v) else v for k, v in values.items()})
        for s in range(start, start + n)
    ]


def curve(series: RunSeries, name: str, which: str = "last") -> list[Any]:
    return series.since(0)["curves"]["curves"][name][which]


def cells(data: dict[str, Any]) -> list[float]:
    """The heatmap cells of a `layers` answer, as Python floats (EMPTY: no value)."""
    return list(array("f", base64.b64decode(data["max"])))


# --- curves: which value lands in which curve ---------------------------------------------------

LAYERS = ("a", "b")

CURVE_CASES = [
    # (what, trace, curve, which, expected)
    ("train loss, last per bucket", steps(3, loss=lambda s: 3.0 - s), "loss", "last", [3.0, 2.0, 1.0]),
    ("a loss the probe missed leaves a gap", steps(2, loss=None) + steps(1, 2, loss=1.0), "loss", "last",
     [None, None, 1.0]),
    ("post-clip and pre-clip norms", steps(2, grad_norm=1.0, grad_norm_preclip=5.0), "grad_norm_preclip", "max",
     [5.0, 5.0]),
    ("one curve per param group", steps(1, lr=(1e-3, 1e-4)), "lr/1", "last", [1e-4]),
    ("the gap: val_loss minus the mean train loss since the previous evaluation",
     steps(2, loss=lambda s: 2.0 + s) + steps(1, 2, loss=4.0, scalars={"val_loss": 5.0})
     + steps(1, 3, loss=1.0, scalars={"val_loss": 2.5}),
     "gap", "last", [None, None, 2.0, 1.5]),
    ("steps/s from the probe's step times", steps(3), "steps_per_second", "last", [None, 10.0, 10.0]),
    ("weight norm over all measured layers (squares add up)",
     steps(1, layers=LAYERS, layer_weight_norm=(3.0, 4.0)), "weight_norm", "last", [5.0]),
    ("update ratio: ||Δw|| / ||w|| of the whole model",
     steps(1, layers=LAYERS, layer_weight_norm=(3.0, 4.0), layer_update_ratio=(0.0, 0.5)),
     "update_ratio", "last", [0.4]),
    ("other logged scalars get their own curve", steps(1, scalars={"val_acc": 0.9}), "log/val_acc", "last", [0.9]),
    ("an infinite norm is kept, as a string JSON can carry", steps(1, grad_norm=INF), "grad_norm", "max",
     ["Infinity"]),
    ("a NaN loss is not drawn", steps(2, loss=lambda s: 1.0 if s else NAN), "loss", "last", [None, 1.0]),
]


@pytest.mark.parametrize(("what", "trace", "name", "which", "expected"), CURVE_CASES, ids=[c[0] for c in CURVE_CASES])
def test_curves(what: str, trace: list[Observation], name: str, which: str, expected: list[Any]) -> None:
    assert curve(feed(trace), name, which) == pytest.approx(expected)


COUNTER_CASES = [
    # (what, trace, counter, expected)
    ("skipped steps are counted where they happen", steps(3, skipped=lambda s: s == 1), "skipped", [0, 1, 0]),
    ("a NaN loss counts as non-finite", steps(2, loss=lambda s: NAN if s else 1.0), "nonfinite", [0, 1]),
    ("so do layers with non-finite gradients", steps(1, nonfinite_layers=3), "nonfinite", [1]),
    ("and an infinite norm", steps(1, grad_norm=INF), "nonfinite", [1]),
]


@pytest.mark.parametrize(("what", "trace", "counter", "expected"), COUNTER_CASES, ids=[c[0] for c in COUNTER_CASES])
def test_counters(what: str, trace: list[Observation], counter: str, expected: list[int]) -> None:
    assert feed(trace).since(0)["curves"][counter] == expected


BOUND_CASES = [
    # (what, trace, curves that exist among those of the kind, how many)
    ("at most MAX_LR_GROUPS learning rates", steps(1, lr=tuple(range(1, 40))), "lr/", MAX_LR_GROUPS),
    ("at most MAX_LOGGED logged scalars, the first ones kept",
     steps(1, scalars={f"m{i}": 1.0 for i in range(20)}), "log/", MAX_LOGGED),
]


@pytest.mark.parametrize(("what", "trace", "prefix", "count"), BOUND_CASES, ids=[c[0] for c in BOUND_CASES])
def test_curve_count_is_bounded(what: str, trace: list[Observation], prefix: str, count: int) -> None:
    names = [n for n in feed(trace).curves if n.startswith(prefix)]
    assert len(names) == count


def test_an_older_step_is_ignored() -> None:
    series = feed(steps(1, 5, loss=1.0) + steps(1, 3, loss=9.0))
    assert (series.last_step, curve(series, "loss", "max")) == (5, [1.0])


# --- downsampling: bounded, and a spike never disappears ----------------------------------------

DOWNSAMPLING_CASES = [
    # (steps, first step, bucket width, buckets in use)
    (BUCKETS, 0, 1, BUCKETS),
    (BUCKETS + 1, 0, 2, BUCKETS // 2 + 1),
    (10_000, 0, 16, 625),
    (3, 1_000_000, 1, 3),  # a resumed run starts its buckets at its first step
]


@pytest.mark.parametrize(("n", "start", "width", "used"), DOWNSAMPLING_CASES)
def test_buckets_double_in_width_as_the_run_grows(n: int, start: int, width: int, used: int) -> None:
    data = feed(steps(n, start, loss=1.0)).since(0)["curves"]
    assert (data["width"], len(data["step"]), data["step"][-1]) == (width, used, start + n - 1)


@pytest.mark.parametrize("spike_at", [0, 1, 777, 4_095, 9_998])
def test_a_spike_survives_downsampling(spike_at: int) -> None:
    trace = steps(10_000, loss=lambda s: 100.0 if s == spike_at else 1.0, skipped=lambda s: s == spike_at)
    data = feed(trace).since(0)["curves"]
    at = spike_at // data["width"]  # the bucket holding it
    assert data["curves"]["loss"]["max"][at] == 100.0
    assert max(data["curves"]["loss"]["max"][:at] + data["curves"]["loss"]["max"][at + 1:]) == 1.0
    assert set(data["curves"]["loss"]["min"]) == {1.0}
    assert sum(data["skipped"]) == 1 and data["skipped"][at] == 1


def test_a_far_step_after_a_few_merges_them_all() -> None:
    series = feed(steps(3, loss=lambda s: [5.0, 1.0, 2.0][s]) + steps(1, 5_000, loss=3.0))
    data = series.since(0)["curves"]
    assert (data["width"], data["step"][0], data["step"][-1]) == (8, 2, 5_000)
    assert (data["curves"]["loss"]["max"][0], data["curves"]["loss"]["min"][0]) == (5.0, 1.0)
    assert data["step"][1:-1] == [None] * (len(data["step"]) - 2)


def test_merged_buckets_keep_their_last_value_and_step() -> None:
    data = feed(steps(BUCKETS + 1, loss=float)).since(0)["curves"]  # loss = step
    assert data["step"][:2] == [1, 3]
    assert data["curves"]["loss"]["last"][:2] == [1.0, 3.0]
    assert data["curves"]["loss"]["min"][:2] == [0.0, 2.0]


def test_memory_is_bounded_whatever_the_run_length() -> None:
    layers = tuple(f"l{i}" for i in range(300))
    detail = {"layers": layers, "layer_grad_norm": lambda s: (1.0,) * 300 if s % 10 == 0 else None,
              "layer_weight_norm": lambda s: (1.0,) * 300 if s % 10 == 0 else None}
    series = feed(steps(2_000, loss=1.0, grad_norm=1.0, lr=(0.1,), **detail))
    early = series.nbytes
    for obs in steps(30_000, 2_000, loss=1.0, grad_norm=1.0, lr=(0.1,), **detail):
        series.observe(obs)
    assert series.nbytes == early < 2 * 2**20


# --- live updates: everything since version N -------------------------------------------------

def test_since_sends_only_the_changed_tail() -> None:
    series = feed(steps(10, loss=1.0))
    version = series.version
    series.observe(Observation(step=10, time=1.0, loss=2.0))
    delta = series.since(version)
    assert (delta["reset"], delta["curves"]["reset"], delta["curves"]["from"]) == (False, False, 10)
    assert (delta["curves"]["step"], delta["curves"]["curves"]["loss"]["last"]) == ([10], [2.0])
    assert series.since(series.version)["curves"]["step"] == []  # nothing new


SINCE_RESET_CASES = [
    # (what, version asked for, whole answer reset, curves reset)
    ("a first look", 0, True, True),
    ("a version from another collector process", 10**9, True, True),
    ("a version before the buckets were merged", 1, False, True),
    ("a version after it", BUCKETS + 1, False, False),
]


@pytest.mark.parametrize(("what", "version", "reset", "curves_reset"), SINCE_RESET_CASES,
                         ids=[c[0] for c in SINCE_RESET_CASES])
def test_since_resets_when_the_asker_cannot_patch(what: str, version: int, reset: bool, curves_reset: bool) -> None:
    series = feed(steps(BUCKETS + 3, loss=1.0))  # merged at version BUCKETS + 1
    delta = series.since(version)
    assert (delta["reset"], delta["curves"]["reset"]) == (reset, curves_reset)
    if curves_reset:
        assert delta["curves"]["from"] == 0 and len(delta["curves"]["step"]) == BUCKETS // 2 + 2


def test_gaps_in_the_steps_keep_since_exact() -> None:
    series = feed(steps(1, 0, loss=1.0) + steps(1, 50, loss=2.0))
    version = series.version
    series.observe(Observation(step=51, time=9.0, loss=3.0))
    assert series.since(version)["curves"]["from"] == 51
    assert series.since(1)["curves"]["step"][0] is None  # the gap, then step 50


def test_markers_arrive_once_and_are_bounded() -> None:
    series = feed(steps(3, loss=1.0))
    version = series.version
    series.mark(Marker(2, "fired", "loss_spike", "warning", "<img src=x onerror=alert(1)>", hint="lower the LR"))
    new = series.since(version)["markers"]
    assert [(m["step"], m["kind"], m["message"], m["hint"]) for m in new] == [
        (2, "loss_spike", "<img src=x onerror=alert(1)>", "lower the LR")  # escaped by the page, kept as is here
    ]
    assert series.since(series.version)["markers"] == []
    for i in range(MAX_MARKERS + 5):
        series.mark(Marker(i, "ack", "plateau", "info", "reduce_lr applied", action="reduce_lr", outcome="applied"))
    assert len(series.since(0)["markers"]) == MAX_MARKERS


# --- the gradient-flow matrix ----------------------------------------------------------------

def test_matrix_columns_are_detail_steps_and_cells_their_norms() -> None:
    trace = steps(25, layers=LAYERS,
                  layer_grad_norm=lambda s: (float(s), None) if s % 10 == 0 else None)
    flow = feed(trace).since(0)["layers"]
    # Columns are step buckets, as the curves' x: between detail steps they are empty.
    assert (flow["rows"], flow["width"], len(flow["step"])) == (["a", "b"], 1, 21)
    assert [(j, s) for j, s in enumerate(flow["step"]) if s is not None] == [(0, 0), (10, 10), (20, 20)]
    column_major = cells(flow)
    assert column_major[:2] + column_major[20:22] + column_major[40:] == [0.0, EMPTY, 10.0, EMPTY, 20.0, EMPTY]
    assert set(column_major[2:20]) == {EMPTY}  # no gradient (or no detail step): no value


def test_matrix_keeps_non_finite_norms_as_inf() -> None:
    flow = feed(steps(1, layers=LAYERS, layer_grad_norm=(NAN, INF))).since(0)["layers"]
    assert cells(flow) == [INF, INF]


def test_matrix_of_a_deep_model_groups_neighbouring_layers() -> None:
    layers = tuple(f"block{i}" for i in range(MAX_ROWS * 2 + 1))
    norms = tuple(float(i) for i in range(len(layers)))
    flow = feed(steps(1, layers=layers, layer_grad_norm=norms)).since(0)["layers"]
    assert (len(flow["rows"]), flow["layers_per_row"]) == (math.ceil(len(layers) / 3), 3)
    assert len(flow["rows"]) <= MAX_ROWS
    assert (flow["rows"][0], flow["rows"][-1]) == ("block0 … block2", "block1023 … block1024")
    assert cells(flow)[:2] == [2.0, 5.0]  # the largest of each group


def test_matrix_downsamples_keeping_the_peak() -> None:
    trace = steps(4_000, layers=LAYERS,
                  layer_grad_norm=lambda s: (1e3 if s == 1234 else 1.0, None if s % 2 else 1.0))
    flow = feed(trace).since(0)["layers"]
    width, maxima = flow["width"], cells(flow)
    at = 1234 // width
    assert len(flow["step"]) <= GradientFlow.for_layers(LAYERS).buckets.capacity
    assert maxima[2 * at] == 1e3 and set(maxima[:2 * at] + maxima[2 * at + 1:]) == {1.0}


def test_matrix_deltas_send_changed_columns_without_row_names() -> None:
    series = feed(steps(2, layers=LAYERS, layer_grad_norm=(1.0, 2.0)))
    version = series.version
    series.observe(Observation(step=2, time=1.0, layers=LAYERS, layer_grad_norm=(3.0, 4.0)))
    delta = series.since(version)["layers"]
    assert (delta["reset"], delta["from"], delta["step"], "rows" in delta) == (False, 2, [2], False)
    assert cells(delta) == [3.0, 4.0]


# --- persistence -----------------------------------------------------------------------------

def busy_run() -> RunSeries:
    trace = steps(3_000, loss=lambda s: 1.0 / (s + 1), lr=(0.1, 0.01), loss_scale=2.0**16,
                  skipped=lambda s: s % 500 == 0, scalars=lambda s: {"val_loss": 0.5} if s % 100 == 0 else {},
                  layers=LAYERS, layer_grad_norm=lambda s: (1.0, NAN) if s % 7 == 0 else None,
                  layer_weight_norm=lambda s: (1.0, 1.0) if s % 7 == 0 else None)
    series = feed(trace)
    series.mark(Marker(42, "fired", "loss_spike", "warning", "loss 9.1 at step 42", "lower the LR", time=5.0))
    return series


def test_json_round_trip_keeps_what_the_page_draws() -> None:
    series = busy_run()
    restored = RunSeries.from_json(json.loads(json.dumps(series.to_json())))
    assert restored.since(0) == series.since(0)
    assert restored.nbytes == series.nbytes
    # and it goes on where it stopped
    for s in (series, restored):
        s.observe(Observation(step=3_000, time=300.0, loss=0.1, scalars={"val_loss": 0.2}))
    assert restored.since(0)["curves"] == series.since(0)["curves"]


def test_json_is_strict_json() -> None:
    json.dumps(busy_run().to_json(), allow_nan=False)


def broken(change: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(busy_run().to_json()))
    change(data)
    return data


MALFORMED_CASES = [
    ("another format", lambda d: d.update(format=99)),
    ("a missing part", lambda d: d.pop("curves")),
    ("a curve that is not one", lambda d: d["curves"]["curves"].update({"<script>": d["curves"]["curves"]["loss"]})),
    ("a curve shorter than its steps", lambda d: d["curves"]["curves"]["loss"]["min"].pop()),
    ("a value that is not a number", lambda d: d["curves"]["curves"]["loss"]["min"].__setitem__(0, "x")),
    ("too many buckets", lambda d: d["curves"].update(step=list(range(BUCKETS + 2)))),
    ("a negative count", lambda d: d["curves"]["skipped"].__setitem__(0, -1)),
    ("matrix cells that do not fill its columns", lambda d: d["layers"].update(max="AAAA")),
    ("matrix rows that do not match its layers", lambda d: d["layers"].update(layers_total=1)),
    ("matrix cells that are not base64", lambda d: d["layers"].update(max="!!")),
    ("a marker with a field of its own", lambda d: d["markers"][0].update(extra=1)),
    ("a marker without a step", lambda d: d["markers"][0].update(step="x")),
]


@pytest.mark.parametrize(("what", "change"), MALFORMED_CASES, ids=[c[0] for c in MALFORMED_CASES])
def test_malformed_json_is_refused_with_a_value_error(what: str, change: Any) -> None:
    with pytest.raises(ValueError):
        RunSeries.from_json(broken(change))


# --- the data directory ---------------------------------------------------------------------

def test_store_keeps_a_run_page_across_processes(tmp_path: Path) -> None:
    series = busy_run()
    SeriesStore(tmp_path).save("exp-1:lr@3e-4", series)
    loaded = SeriesStore(tmp_path).load("exp-1:lr@3e-4")
    assert loaded is not None and loaded.since(0) == series.since(0)
    SeriesStore(tmp_path).delete(["exp-1:lr@3e-4", "never-saved"])
    assert SeriesStore(tmp_path).load("exp-1:lr@3e-4") is None


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 1}', ""])
def test_store_treats_an_unreadable_file_as_absent(tmp_path: Path, content: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = SeriesStore(tmp_path)
    store.path.mkdir()
    (store.path / "r.json").write_text(content)
    assert store.load("r") is None
    assert "cannot read the page history of run r" in caplog.text


def test_a_probe_clock_that_is_not_finite_neither_sticks_nor_breaks_saving() -> None:
    trace = steps(2, loss=1.0) + [Observation(step=2, time=NAN, loss=1.0)] + steps(1, 3, loss=1.0)
    series = feed(trace)
    assert curve(series, "steps_per_second") == [None, 10.0, None, 10.0]
    json.dumps(series.to_json(), allow_nan=False)
