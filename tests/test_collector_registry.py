"""The sans-I/O core: registry (rank merging, statuses, lifecycle alerts), action planning
and the metrics collector, driven with messages and an explicit clock."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.collector.actions import ActionPlanner, lead_steps
from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
)
from gradwatch.collector.detectors.runbook import hint
from gradwatch.collector.metrics import IngestStats, MetricsCollector
from gradwatch.collector.registry import (
    ActionAcked,
    ActionIssued,
    AlertRaised,
    Registry,
    StatusChanged,
    merge_step,
)
from gradwatch.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Hello,
    ProtocolError,
    StepRecord,
    Steps,
)

LAYERS = ["a", "b"]


class LossAbove(Detector):
    """Test detector: fires while the loss is above 10 (the real ones live in detectors/)."""

    kind = "loss_spike"
    Settings = DetectorSettings

    def check(self, obs: Observation) -> list[Finding] | None:
        if obs.loss is None:
            return None
        return [Finding(f"loss {obs.loss} above 10")] if obs.loss > 10 else []


def hello(run: str = "r", rank: int = 0, world_size: int = 1, **kw: object) -> Hello:
    return Hello(v=PROTOCOL_VERSION, run=run, rank=rank, world_size=world_size, layers=LAYERS, **kw)


def record(step: int, **kw: object) -> StepRecord:
    return StepRecord(step=step, time=float(step), **kw)


def registry(policy: dict | None = None, **retention: object) -> Registry:
    config = CollectorConfig.model_validate({"actions": policy or {}, "retention": retention})
    return Registry(config.retention, lambda: [LossAbove()], ActionPlanner(config.actions))


def alerts(events: list) -> list[tuple[str, str, bool, int]]:
    return [(e.run, e.alert.kind, e.alert.resolved, e.alert.step) for e in events if isinstance(e, AlertRaised)]


# --- merging ------------------------------------------------------------------------------------

RANK0 = StepRecord(step=5, time=1.0, loss=1.0, grad_norm_sq=9.0, nonfinite_layers=0, skipped=False, lr=[0.1],
                   layer_grad_sq=[1.0, None], layer_weight_sq=[4.0, 1.0], layer_update_sq=[0.04, 0.0])
RANK1 = StepRecord(step=5, time=2.0, loss=3.0, grad_norm_sq=16.0, nonfinite_layers=2, skipped=True, lr=[0.1],
                   layer_grad_sq=[3.0, 4.0], layer_weight_sq=[12.0, 3.0], layer_update_sq=[0.12, 0.0])


@pytest.mark.parametrize(
    "sharded, grad_norm, layer_grad, layer_weight, ratio_a",
    [
        # sharded: partial squared norms are summed, then rooted: sqrt(9+16) = 5
        (True, 5.0, (2.0, 2.0), (4.0, 2.0), 0.4 / 4.0),
        # replicated (DDP): every rank saw the same gradients, read from the lowest rank
        (False, 3.0, (1.0, None), (2.0, 1.0), 0.2 / 2.0),
    ],
)
def test_merge_sharded_sums_replicated_reads_lowest_rank(sharded, grad_norm, layer_grad, layer_weight, ratio_a):
    obs = merge_step(5, {1: RANK1, 0: RANK0}, sharded, tuple(LAYERS)).observation
    assert obs.grad_norm == pytest.approx(grad_norm)
    assert obs.layer_grad_norm == pytest.approx(layer_grad)
    assert obs.layer_weight_norm == pytest.approx(layer_weight)
    assert obs.layer_update_ratio[0] == pytest.approx(ratio_a)
    assert obs.layer_update_ratio[1] == 0.0
    # whatever the layout: loss is the mean, skipped is any, non-finite the max
    assert (obs.loss, obs.skipped, obs.nonfinite_layers) == (2.0, True, 2)


def test_merge_keeps_nonfinite_values_visible():
    obs = merge_step(1, {0: record(1, grad_norm_sq=math.inf, loss=math.nan, layer_grad_sq=[-1.0, math.nan],
                                   layer_weight_sq=[0.0, 1.0], layer_update_sq=[1.0, 0.0])}, False, tuple(LAYERS)).observation
    assert obs.grad_norm == math.inf and math.isnan(obs.loss)
    assert all(math.isnan(v) for v in obs.layer_grad_norm)  # a negative square is shown as NaN
    assert obs.layer_update_ratio == (math.inf, 0.0)  # update on a zero weight


@pytest.mark.parametrize(
    "by_rank, sharded, frozen",
    [
        # the lowest rank's word holds, whatever the others say and however the run is laid out
        ({0: [1], 1: [0, 1]}, True, {1}),
        ({0: [1], 1: [0, 1]}, False, {1}),
        ({0: [], 1: [0]}, True, set()),
        ({0: None}, False, set()),  # a step without per-layer detail
        ({0: [0, 2, 7]}, False, {0}),  # indices beyond the hello's layers are ignored
    ],
)
def test_merge_reads_frozen_layers_from_the_lowest_rank(by_rank, sharded, frozen):
    records = {r: record(5, layer_frozen=f) for r, f in by_rank.items()}
    assert merge_step(5, records, sharded, tuple(LAYERS)).observation.layer_frozen == frozen


def test_frozen_layers_are_shown_without_values_and_counted_per_run():
    reg = registry()
    reg.hello(hello(), 0.0)
    detail = {"layer_grad_sq": [None, 4.0], "layer_weight_sq": [None, 4.0], "layer_update_sq": [None, 1.0]}
    reg.steps("r", 0, Steps(records=[record(1, layer_frozen=[0], **detail), record(2)]), 1.0)
    run = reg.runs["r"]
    obs = run.latest_layer_detail
    assert (obs.layer_grad_norm, obs.layer_weight_norm, obs.layer_update_ratio) == ((None, 2.0),) * 2 + ((None, 0.5),)
    assert run.frozen_layers == ("a",)  # as of the last detail step: step 2 had none
    assert all(not o.layer_frozen for o in run.history)  # per-layer detail stays out of the history
    text = scrape(reg, 1.0)
    assert 'gradwatch_run_frozen_layers{run="r"} 1.0' in text
    assert not re.search(r'^gradwatch_layer_\w+\{layer="a"', text, re.MULTILINE)  # no series for a frozen layer
    reg.steps("r", 0, Steps(records=[record(3, layer_frozen=[], layer_grad_sq=[1.0, 4.0])]), 2.0)
    assert run.frozen_layers == ()
    assert 'gradwatch_run_frozen_layers{run="r"} 0.0' in scrape(reg, 2.0)


def test_ranks_merge_only_when_all_ranks_reported():
    reg = registry()
    reg.hello(hello(rank=0, world_size=2), 0.0)
    reg.hello(hello(rank=1, world_size=2), 0.0)
    reg.steps("r", 0, Steps(records=[record(1, loss=1.0), record(2, loss=1.0)]), 1.0)
    assert reg.runs["r"].steps_total == 0  # waiting for rank 1
    reg.steps("r", 1, Steps(records=[record(1, loss=3.0)]), 1.0)
    run = reg.runs["r"]
    assert (run.steps_total, run.last_merged_step, run.latest.loss) == (1, 1, 2.0)


def test_a_step_waits_for_a_straggler_only_so_long():
    reg = registry(rank_wait_seconds=3)
    reg.hello(hello(rank=0, world_size=2), 0.0)
    reg.hello(hello(rank=1, world_size=2), 0.0)
    reg.steps("r", 0, Steps(records=[record(s, loss=1.0) for s in range(1, 6)]), 1.0)
    assert reg.tick(3.9) == [] and reg.runs["r"].steps_total == 0
    reg.tick(4.0)
    assert reg.runs["r"].last_merged_step == 5  # merged without rank 1
    reg.steps("r", 1, Steps(records=[record(5, loss=100.0), record(6, loss=3.0)]), 4.5)
    reg.steps("r", 0, Steps(records=[record(6, loss=1.0)]), 4.5)
    run = reg.runs["r"]  # rank 1's late step 5 is ignored; step 6 has both ranks
    assert (run.steps_total, run.latest.loss) == (6, 2.0)


def test_replayed_records_are_not_merged_twice():
    reg = registry()
    reg.hello(hello(), 0.0)
    batch = Steps(records=[record(1), record(2)])
    reg.steps("r", 0, batch, 1.0)
    reg.steps("r", 0, batch, 2.0)  # the probe replays after a reconnect
    assert reg.runs["r"].steps_total == 2


# --- statuses and lifecycle alerts -----------------------------------------------------------------


@pytest.mark.parametrize(
    "byes, status",
    [
        ([Bye()], "finished"),
        ([Bye(status="stopped", reason="stop action")], "stopped"),
        ([Bye(status="crashed", reason="OOM")], "crashed"),
    ],
)
def test_bye_ends_the_run(byes, status):
    reg = registry()
    reg.hello(hello(), 0.0)
    for bye in byes:
        events = reg.bye("r", 0, bye, 1.0)
    assert reg.runs["r"].status == status
    assert any(isinstance(e, StatusChanged) and e.new == status for e in events)


def test_a_run_ends_when_every_rank_said_bye():
    reg = registry()
    reg.hello(hello(rank=0, world_size=2), 0.0)
    reg.bye("r", 0, Bye(), 1.0)
    assert reg.runs["r"].status == "running"  # rank 1 has not even connected yet
    reg.hello(hello(rank=1, world_size=2), 2.0)
    reg.bye("r", 1, Bye(), 3.0)
    assert reg.runs["r"].status == "finished"


def test_heartbeat_timeout_loses_the_run_and_data_brings_it_back():
    reg = registry(heartbeat_timeout=10)
    reg.hello(hello(), 0.0)
    assert reg.tick(9.0) == [] and reg.runs["r"].status == "running"
    lost = reg.tick(11.0)
    assert reg.runs["r"].status == "lost"
    assert alerts(lost) == [("r", "run_lost", False, 0)]
    assert lost[0].alert.severity == "critical"
    back = reg.steps("r", 0, Steps(records=[record(1)]), 12.0)
    assert reg.runs["r"].status == "running" and alerts(back) == [("r", "run_lost", True, 0)]


def test_one_silent_rank_degrades_the_run_others_still_flow():
    reg = registry(heartbeat_timeout=10)
    reg.hello(hello(rank=0, world_size=2), 0.0)
    reg.hello(hello(rank=1, world_size=2), 0.0)
    reg.steps("r", 0, Steps(records=[record(1)]), 5.0)
    reg.steps("r", 1, Steps(records=[record(1)]), 5.0)
    events = reg.steps("r", 0, Steps(records=[record(2)]), 12.0)  # rank 1 silent since t=5
    events += reg.tick(16.0)
    run = reg.runs["r"]
    assert run.status == "degraded" and run.last_merged_step == 2
    assert alerts(events) == [("r", "rank_lost", False, 1)]


def test_a_rank_that_never_connects_degrades_the_run_after_the_timeout():
    reg = registry(heartbeat_timeout=10)
    reg.hello(hello(rank=0, world_size=4), 0.0)
    reg.steps("r", 0, Steps(records=[record(1)]), 5.0)
    assert reg.runs["r"].steps_total == 0  # waiting for ranks 1-3
    events = reg.steps("r", 0, Steps(records=[record(2)]), 11.0)
    assert reg.runs["r"].status == "degraded" and reg.runs["r"].last_merged_step == 2
    [alert] = [e.alert for e in events if isinstance(e, AlertRaised)]
    assert (alert.kind, alert.message) == ("rank_lost", "3 of 4 ranks of r never connected")


def test_duplicate_layer_names_export_one_series():
    reg = registry()
    reg.hello(Hello(v=PROTOCOL_VERSION, run="r", layers=["x", "x", "y"]), 0.0)
    reg.steps("r", 0, Steps(records=[record(1, layer_grad_sq=[1.0, 4.0, 9.0])]), 1.0)
    text = scrape(reg, 1.0)
    assert text.count("gradwatch_layer_grad_norm{") == 2 and 'layer="x",run="r"} 1.0' in text


def test_detector_alerts_fire_once_and_resolve_once():
    reg = registry()
    reg.hello(hello(), 0.0)
    losses = [1.0, 20.0, 30.0, 40.0, 1.0, 1.0]
    events = reg.steps("r", 0, Steps(records=[record(i, loss=x) for i, x in enumerate(losses)]), 1.0)
    assert alerts(events) == [("r", "loss_spike", False, 1), ("r", "loss_spike", True, 4)]
    assert reg.runs["r"].alerts_total["loss_spike"] == 1


@pytest.mark.parametrize(
    "end, status",
    [("bye", "finished"), ("stop", "stopped"), ("silence", "lost")],
)
def test_an_ended_runs_open_alerts_resolve_with_the_reason(end: str, status: str) -> None:
    """Prometheus and Alertmanager must stop firing for a run that no longer trains; a lost
    run keeps `run_lost`, the alert for that end."""
    reg = registry(heartbeat_timeout=10)
    reg.hello(hello(), 0.0)
    events = reg.steps("r", 0, Steps(records=[record(i, loss=x) for i, x in enumerate([1.0, 20.0, 30.0])]), 1.0)
    assert alerts(events) == [("r", "loss_spike", False, 1)]
    if end == "silence":
        events = reg.tick(12.0)
    else:
        events = reg.bye("r", 0, Bye(status="finished" if end == "bye" else "stopped"), 2.0)
    assert reg.runs["r"].status == status
    resolved = [e.alert for e in events if isinstance(e, AlertRaised) and e.alert.resolved]
    assert [(a.kind, a.step, a.message) for a in resolved] == [("loss_spike", 2, f"resolved: run {status}")]
    assert set(reg.runs["r"].active_alerts) == ({("run_lost", None)} if status == "lost" else set())


def test_an_lr_range_test_is_never_judged() -> None:
    """gradwatch.lr_find tags its run kind=lr-find: the loss exploding is its purpose."""
    reg = registry()
    reg.hello(hello(tags={"kind": "lr-find"}), 0.0)
    events = reg.steps("r", 0, Steps(records=[record(i, loss=x) for i, x in enumerate([1.0, 20.0, 30.0, 1e9])]), 1.0)
    assert alerts(events) == []


def test_fired_alerts_say_what_to_try_and_resolutions_do_not():
    reg = registry(heartbeat_timeout=10)
    reg.hello(hello(), 0.0)
    events = reg.steps("r", 0, Steps(records=[record(1, loss=20.0), record(2, loss=1.0)]), 1.0)
    events += reg.tick(12.0)  # silent for longer than the heartbeat timeout: run_lost
    events += reg.steps("r", 0, Steps(records=[record(3, loss=1.0)]), 13.0)
    assert [(e.alert.kind, e.alert.resolved, e.alert.hint) for e in events if isinstance(e, AlertRaised)] == [
        ("loss_spike", False, hint("loss_spike")),
        ("loss_spike", True, ""),
        ("run_lost", False, hint("run_lost")),
        ("run_lost", True, ""),
    ]


def test_a_finding_that_knows_better_overrides_the_kind_hint():
    class ClippedFlat(Detector):
        kind = "not_learning"
        Settings = DetectorSettings

        def check(self, obs: Observation) -> list[Finding] | None:
            return [Finding("loss has not moved", hint="Raise the clipping threshold.")]

    [event] = ClippedFlat().observe(Observation(step=1))
    assert event.hint == "Raise the clipping threshold."


def test_ended_runs_are_evicted_oldest_first_running_ones_never():
    reg = registry(max_runs=2)
    reg.hello(hello("a"), 0.0)
    reg.hello(hello("b"), 1.0)
    with pytest.raises(ProtocolError, match="max_runs=2"):
        reg.hello(hello("c"), 2.0)
    reg.bye("b", 0, Bye(), 3.0)
    reg.hello(hello("c"), 4.0)
    assert sorted(reg.runs) == ["a", "c"] and reg.evicted_total == 1


def test_a_running_run_refuses_another_layout():
    reg = registry()
    reg.hello(hello(), 0.0)
    with pytest.raises(ProtocolError, match="another layout"):
        reg.hello(hello(world_size=2), 1.0)


# --- actions ----------------------------------------------------------------------------------------


POLICY = {"loss_spike": {"action": "reduce_lr", "factor": 0.5, "cooldown": 100},
          "nonfinite": {"action": "skip_step"}}


def test_actions_only_for_runs_that_opted_in():
    reg = registry(POLICY)
    joined = reg.hello(hello("on", actions=True), 0.0)
    assert joined.welcome.actions is True
    assert [(a.kind, a.params) for a in joined.actions] == [("skip_step", {"on": "nonfinite"})]
    off = reg.hello(hello("off"), 0.0)
    assert off.welcome.actions is False and off.actions == []
    spike = Steps(records=[record(1, loss=50.0)])
    assert not [e for e in reg.steps("off", 0, spike, 1.0) if isinstance(e, ActionIssued)]
    issued = [e for e in reg.steps("on", 0, spike, 1.0) if isinstance(e, ActionIssued)]
    assert [(e.action.kind, e.action.params, e.alert_kind) for e in issued] == [
        ("reduce_lr", {"factor": 0.5, "min_lr": 1e-6}, "loss_spike")
    ]


def test_the_ranks_of_a_distributed_run_are_armed_together_once_all_joined():
    """Each rank judges every step on its own: they must arm at the same step, or one would
    skip a poisoned step that another takes."""
    reg = registry(POLICY)
    first = reg.hello(hello(actions=True, world_size=2), 0.0)
    assert first.actions == [] and not [e for e in first.events if isinstance(e, ActionIssued)]
    reg.steps("r", 0, Steps(records=[record(s) for s in range(1, 6)]), 1.0)
    second = reg.hello(hello(rank=1, actions=True, world_size=2), 2.0)
    assert second.actions == []
    armed = [e.action for e in second.events if isinstance(e, ActionIssued)]  # sent to every rank
    assert [(a.kind, a.params, a.step) for a in armed] == [("skip_step", {"on": "nonfinite"}, 5 + 2)]
    again = reg.hello(hello(rank=1, actions=True, world_size=2), 3.0)  # a rank that joins again
    assert again.actions == armed and not [e for e in again.events if isinstance(e, ActionIssued)]
    assert reg.runs["r"].actions_total[("skip_step", "armed")] == 1


def test_action_cooldown_in_steps():
    reg = registry(POLICY)
    reg.hello(hello(actions=True), 0.0)
    # spikes (fire) at 1, 51 and 151, each resolved in between: the second is inside the cooldown
    trace = [(1, 50.0), (2, 1.0), (51, 50.0), (52, 1.0), (151, 50.0)]
    events = [e for s, x in trace for e in reg.steps("r", 0, Steps(records=[record(s, loss=x)]), float(s))]
    assert [e.alert.step for e in events if isinstance(e, AlertRaised) and not e.alert.resolved] == [1, 51, 151]
    assert [e.action.step for e in events if isinstance(e, ActionIssued)] == [1 + 1, 151 + 1]


def test_action_step_leads_by_about_a_second_of_steps_for_distributed_runs():
    assert [lead_steps(r, world_size=4) for r in (None, 0.5, 10.0, 250.0)] == [2, 2, 10, 250]
    assert [lead_steps(r, world_size=1) for r in (None, 250.0)] == [1, 1]  # next boundary


def test_acks_are_traced_to_their_alert():
    reg = registry(POLICY)
    reg.hello(hello(actions=True), 0.0)
    action = next(e.action for e in reg.steps("r", 0, Steps(records=[record(1, loss=50.0)]), 1.0)
                  if isinstance(e, ActionIssued))
    events = reg.ack("r", 0, Ack(id=action.id, kind="reduce_lr", step=3, outcome="applied"), 2.0)
    assert [(e.alert_kind, e.ack.outcome) for e in events if isinstance(e, ActionAcked)] == [("loss_spike", "applied")]
    assert dict(reg.runs["r"].actions_total) == {
        ("skip_step", "armed"): 1, ("reduce_lr", "sent"): 1, ("reduce_lr", "applied"): 1
    }


# --- metrics ------------------------------------------------------------------------------------------


def scrape(reg: Registry, now: float, wanted: set[str] | None = None, **config: object) -> str:
    cfg = CollectorConfig.model_validate(config)
    return MetricsCollector(reg, IngestStats(), cfg, clock=lambda: now).exposition(wanted).decode()


def test_layer_series_leave_out_missing_values_and_spell_non_finite_ones_as_prometheus_does():
    reg = registry()
    reg.hello(Hello(v=PROTOCOL_VERSION, run="r", layers=["a", "b", "c", "d"]), 0.0)
    reg.steps("r", 0, Steps(records=[record(1, layer_grad_sq=[4.0, None, math.inf, math.nan])]), 1.0)
    reg.hello(Hello(v=PROTOCOL_VERSION, run="s", layers=["a"]), 0.0)
    reg.steps("s", 0, Steps(records=[record(1, layer_grad_sq=[0.25])]), 1.0)
    assert re.findall(r"^gradwatch_layer_grad_norm\{.*$", scrape(reg, 1.0), re.MULTILINE) == [
        'gradwatch_layer_grad_norm{layer="a",run="r"} 2.0',
        'gradwatch_layer_grad_norm{layer="c",run="r"} +Inf',
        'gradwatch_layer_grad_norm{layer="d",run="r"} NaN',
        'gradwatch_layer_grad_norm{layer="a",run="s"} 0.5',
    ]


def test_metrics_restricted_to_the_names_asked_for():
    reg = registry()
    reg.hello(hello(), 0.0)
    reg.steps("r", 0, Steps(records=[record(1, layer_grad_sq=[1.0, 4.0])]), 1.0)
    text = scrape(reg, 1.0, wanted={"gradwatch_steps_total", "gradwatch_layer_grad_norm", "gradwatch_run_up"})
    families = set(re.findall(r"^# TYPE (\w+)", text, re.MULTILINE))
    assert families == {"gradwatch_steps_total", "gradwatch_layer_grad_norm", "gradwatch_run_up"}
    assert 'gradwatch_steps_total{run="r"} 1.0' in text and 'gradwatch_layer_grad_norm{layer="b",run="r"} 2.0' in text


def test_layer_cap_and_dropped_count():
    reg = registry()
    reg.hello(hello(), 0.0)
    reg.steps("r", 0, Steps(records=[record(1, layer_grad_sq=[1.0, 4.0], layer_weight_sq=[1.0, 1.0],
                                            layer_update_sq=[0.0, 0.0])]), 1.0)
    text = scrape(reg, 1.0, metrics={"layer_cap": 1})
    assert 'gradwatch_layer_grad_norm{layer="a",run="r"} 1.0' in text
    assert 'layer="b"' not in text
    assert 'gradwatch_layers_dropped{run="r"} 1.0' in text


def test_ended_run_series_vanish_after_grace():
    reg = registry()
    reg.hello(hello(), 0.0)
    reg.bye("r", 0, Bye(), 10.0)
    grace = {"retention": {"finished_grace_seconds": 300}}
    assert 'gradwatch_run_up{run="r"} 0.0' in scrape(reg, 309.0, **grace)
    assert 'run="r"' not in scrape(reg, 311.0, **grace)
    assert 'gradwatch_collector_runs{status="finished"} 1.0' in scrape(reg, 311.0, **grace)


def test_per_layer_lines_say_what_prometheus_client_would_write():
    """The per-layer families' fast path against prometheus_client's own encoder reading the
    same collector: layers capped (a repeated name counts once), a frozen layer, non-finite
    values. Compared as parsed samples: the fast path spells 2e7 as Python does."""
    reg = registry()
    reg.hello(Hello(v=PROTOCOL_VERSION, run="r", layers=["a", "a", "b", "c"]), 0.0)
    reg.steps("r", 0, Steps(records=[record(1, layer_grad_sq=[4e14, 1.0, None, math.inf],
                                            layer_weight_sq=[1.0, 1.0, math.nan, 0.0],
                                            layer_update_sq=[0.0, 1.0, 1.0, 1.0])]), 1.0)
    reg.hello(Hello(v=PROTOCOL_VERSION, run="s", layers=["x"]), 0.0)
    reg.steps("s", 0, Steps(records=[record(1, layer_grad_sq=[0.25])]), 1.0)
    config = CollectorConfig.model_validate({"metrics": {"layer_cap": 2}})
    collector = MetricsCollector(reg, IngestStats(), config, clock=lambda: 1.0)
    through_prometheus_client = CollectorRegistry(auto_describe=False)
    through_prometheus_client.register(collector)

    def layer_samples(text: str) -> list[tuple[str, str, str, float]]:
        return sorted((s.name.removeprefix("gradwatch_layer_"), s.labels["run"], s.labels["layer"], s.value)
                      for family in text_string_to_metric_families(text) for s in family.samples
                      if s.name.startswith("gradwatch_layer_") and not math.isnan(s.value))

    fast = collector.exposition().decode()
    assert layer_samples(fast) == layer_samples(generate_latest(through_prometheus_client).decode()) == [
        ("grad_norm", "r", "a", 2e7), ("grad_norm", "s", "x", 0.5),
        ("update_ratio", "r", "a", 0.0), ("weight_norm", "r", "a", 1.0),
    ]
    assert 'gradwatch_layer_weight_norm{layer="b",run="r"} NaN' in fast


def test_every_alert_kind_has_a_series():
    reg = registry()
    reg.hello(hello(), 0.0)
    text = scrape(reg, 0.0)
    for kind in ("nonfinite", "plateau", "run_lost", "rank_lost"):
        for severity in ("info", "warning", "critical"):
            assert f'gradwatch_alert_active{{kind="{kind}",run="r",severity="{severity}"}} 0.0' in text



any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324])
layer_names = st.from_regex(r"[A-Za-z0-9_.:/\[\]<>-]{1,20}", fullmatch=True)


@settings(max_examples=20, deadline=None)
@given(
    layers=st.lists(layer_names, min_size=1, max_size=6),
    values=st.lists(st.tuples(any_float, any_float, any_float), min_size=1, max_size=8),
    scalars=st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,10}", fullmatch=True), any_float, max_size=3),
)
def test_metrics_stay_valid_exposition_whatever_the_values(layers, values, scalars):
    reg = registry()
    reg.hello(Hello(v=PROTOCOL_VERSION, run="fuzz", layers=layers, param_groups=1), 0.0)
    n = len(layers)
    records = [
        record(i + 1, loss=a, grad_norm_sq=b, grad_norm_preclip=c, loss_scale=a, lr=[b], momentum=[c],
               weight_decay=[None], scalars=scalars, step_time=abs(c) if not math.isnan(c) else None,
               layer_grad_sq=[a] * n, layer_weight_sq=[b] * n, layer_update_sq=[c] * n)
        for i, (a, b, c) in enumerate(values)
    ]
    reg.steps("fuzz", 0, Steps(records=records), 1.0)
    text = scrape(reg, 1.0)
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, check=False)
    assert result.returncode in (0, 3) and b"error" not in result.stderr.lower(), result.stderr.decode()
