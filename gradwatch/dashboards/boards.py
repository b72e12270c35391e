"""The three gradwatch dashboards, declared panel by panel.

Every query matches variables with `=~` so "All" (the regex `.*`) and multi-selection work.
Range windows use `$__rate_interval`, which Grafana keeps at four scrape intervals or more.
"""

from __future__ import annotations

from gradwatch.dashboards.panels import (
    PROMETHEUS,
    alert_annotation,
    bargauge,
    datasource_variable,
    heatmap,
    label_variable,
    layout,
    query,
    row,
    stat,
    table,
    thresholds,
    timeseries,
)
from gradwatch.dashboards.schema import (
    Annotation,
    Annotations,
    Dashboard,
    Panel,
    Templating,
    TimeRange,
    Transformation,
    Variable,
)

RUN = 'run=~"$run"'
RUN_RANK = 'run=~"$run", rank=~"$rank"'
RUN_LAYER = 'run=~"$run", layer=~"$layer"'
RATE = "$__rate_interval"

# The update-to-weight ratio ||dw||/||w|| of a healthily learning layer sits around 1e-3;
# well below 1e-4 it barely moves, well above 1e-2 it is being rewritten every step.
UPDATE_RATIO_LOW = 1e-4
UPDATE_RATIO_HIGH = 1e-2
UPDATE_RATIO_BAND = thresholds("orange", (UPDATE_RATIO_LOW, "green"), (UPDATE_RATIO_HIGH, "red"))

ALERTS_FIRING = thresholds("green", (1, "red"))
TAGS = ["gradwatch"]


def _dashboard(
    uid: str,
    title: str,
    description: str,
    variables: list[Variable],
    annotations: list[Annotation],
    rows: list[list[Panel]],
) -> Dashboard:
    return Dashboard(
        uid=uid,
        title=title,
        description=description,
        tags=TAGS,
        time=TimeRange(from_="now-1h"),
        templating=Templating(list=[datasource_variable(), *variables]),
        annotations=Annotations(list=annotations),
        panels=layout(rows),
    )


def run_overview() -> Dashboard:
    run_var = label_variable("run", "Run", "gradwatch_run_up")
    rank_var = label_variable("rank", "Rank", f"gradwatch_step_duration_seconds{{{RUN}}}", all_=True, multi=True)
    return _dashboard(
        "gradwatch-run-overview",
        "gradwatch / Run overview",
        "One training run: loss, learning rate, gradient norms, AMP, throughput and alerts.",
        [run_var, rank_var],
        [alert_annotation(RUN)],
        [
            [
                stat("Status", query(f"gradwatch_run_status{{{RUN}}} == 1", "{{status}}"), show_name=True),
                stat("Optimizer step", query(f"gradwatch_run_step{{{RUN}}}", "{{run}}")),
                stat("Steps / s", query(f"rate(gradwatch_steps_total{{{RUN}}}[{RATE}])", "{{run}}"), unit="ops"),
                stat(
                    "Ranks seen / world size",
                    query(f"gradwatch_run_ranks{{{RUN}}}", "ranks"),
                    query(f"gradwatch_run_world_size{{{RUN}}}", "world size"),
                ),
                stat(
                    "Alerts active",
                    query(f"sum by (run) (gradwatch_alert_active{{{RUN}}})", "{{run}}"),
                    steps=ALERTS_FIRING,
                ),
                stat(
                    "Probe records dropped",
                    query(f"sum by (run) (gradwatch_probe_dropped_records_total{{{RUN}}})", "{{run}}"),
                    steps=thresholds("green", (1, "orange")),
                    description="Records the probe dropped because the collector could not keep up "
                    "or was unreachable.",
                ),
            ],
            [
                timeseries("Loss", query(f"gradwatch_loss{{{RUN}}}", "{{split}}")),
                timeseries(
                    "Generalization gap (val - train)",
                    query(f"gradwatch_loss_gap{{{RUN}}}", "{{run}}"),
                    description="Validation minus training loss; a steady rise means overfitting.",
                ),
            ],
            [
                timeseries(
                    "Gradient norm (pre / post clip)",
                    query(f"gradwatch_grad_norm_preclip{{{RUN}}}", "pre-clip"),
                    query(f"gradwatch_grad_norm{{{RUN}}}", "post-clip"),
                    log_scale=10,
                ),
                timeseries(
                    "Learning rate per param group",
                    query(f"gradwatch_learning_rate{{{RUN}}}", "group {{group}}"),
                    log_scale=10,
                ),
            ],
            [
                timeseries(
                    "Momentum and weight decay per param group",
                    query(f"gradwatch_momentum{{{RUN}}}", "momentum, group {{group}}"),
                    query(f"gradwatch_weight_decay{{{RUN}}}", "weight decay, group {{group}}"),
                    w=8,
                ),
                timeseries(
                    "AMP loss scale", query(f"gradwatch_amp_loss_scale{{{RUN}}}", "loss scale"), log_scale=2, w=8
                ),
                timeseries(
                    "AMP skipped steps",
                    query(f"increase(gradwatch_amp_skipped_steps_total{{{RUN}}}[{RATE}])", "skipped"),
                    bars=True,
                    w=8,
                    description="Optimizer steps skipped because the scaled gradients overflowed.",
                ),
            ],
            [
                timeseries(
                    "Step rate", query(f"rate(gradwatch_steps_total{{{RUN}}}[{RATE}])", "{{run}}"), unit="ops", w=8
                ),
                timeseries(
                    "Step duration per rank",
                    query(f"gradwatch_step_duration_seconds{{{RUN_RANK}}}", "rank {{rank}}"),
                    unit="s",
                    w=8,
                    description="A rank slower than the others holds every rank back at the next collective.",
                ),
                timeseries(
                    "Non-finite gradients",
                    query(f"gradwatch_nonfinite_layers{{{RUN}}}", "layers with NaN/inf"),
                    query(f"increase(gradwatch_nonfinite_steps_total{{{RUN}}}[{RATE}])", "steps with NaN/inf"),
                    w=8,
                ),
            ],
            [
                timeseries("Logged scalars", query(f"gradwatch_scalar{{{RUN}}}", "{{name}}"), w=8),
                table(
                    "Active alerts",
                    query(f"gradwatch_alert_active{{{RUN}}} == 1", instant=True, table=True),
                    w=8,
                    transformations=[Transformation(id="organize", options={
                        "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True,
                                          "instance": True},
                    })],
                ),
                bargauge(
                    "Alerts raised in the time range",
                    query(f"sum by (kind) (increase(gradwatch_alerts_total{{{RUN}}}[$__range]))", "{{kind}}",
                          instant=True),
                    steps=ALERTS_FIRING,
                    w=8,
                ),
            ],
        ],
    )


def gradient_flow() -> Dashboard:
    run_var = label_variable("run", "Run", "gradwatch_run_up")
    layer_var = label_variable("layer", "Layer", f"gradwatch_layer_grad_norm{{{RUN}}}", all_=True, multi=True)
    ratio = f"gradwatch_layer_update_ratio{{{RUN_LAYER}}}"
    return _dashboard(
        "gradwatch-gradient-flow",
        "gradwatch / Gradient flow",
        "Per-layer gradient norms, weight norms and update-to-weight ratios of one run.",
        [run_var, layer_var],
        [alert_annotation(RUN)],
        [
            [
                heatmap(
                    "Gradient norm by layer",
                    query(f"gradwatch_layer_grad_norm{{{RUN_LAYER}}}", "{{layer}}"),
                    description="One row per layer. Dark rows are layers that stopped learning (vanishing or "
                    "dead); bright bands at the input end that grow over time are exploding gradients.",
                ),
            ],
            [
                bargauge(
                    "Gradient norm by layer, latest",
                    query(f"gradwatch_layer_grad_norm{{{RUN_LAYER}}}", "{{layer}}", instant=True),
                ),
                timeseries(
                    "Weight norm by layer",
                    query(f"gradwatch_layer_weight_norm{{{RUN_LAYER}}}", "{{layer}}"),
                    log_scale=10,
                ),
            ],
            [
                timeseries(
                    "Update-to-weight ratio by layer",
                    query(ratio, "{{layer}}"),
                    log_scale=10,
                    band=UPDATE_RATIO_BAND,
                    w=16,
                    description=f"||dw|| / ||w|| per optimizer step. Green is the healthy band "
                    f"{UPDATE_RATIO_LOW:g}..{UPDATE_RATIO_HIGH:g}: below it a layer barely learns, above it "
                    "the learning rate is too high for it.",
                ),
                stat(
                    "Layers outside the healthy update band",
                    query(f"count({ratio} < {UPDATE_RATIO_LOW:g} or {ratio} > {UPDATE_RATIO_HIGH:g}) or vector(0)",
                          "layers"),
                    steps=thresholds("green", (1, "orange")),
                    w=8,
                    h=4,
                ),
            ],
            [
                bargauge(
                    "Update-to-weight ratio by layer, latest",
                    query(ratio, "{{layer}}", instant=True),
                    unit="sci",
                    steps=UPDATE_RATIO_BAND,
                    w=16,
                ),
                stat(
                    "Layers beyond the collector's layer cap",
                    query(f"gradwatch_layers_dropped{{{RUN}}}", "{{run}}"),
                    steps=thresholds("green", (1, "orange")),
                    w=8,
                    description="Per-layer series are exported for at most the collector's layer cap per run "
                    "(to bound Prometheus cardinality); these layers are watched by the detectors but not graphed.",
                ),
            ],
        ],
    )


def fleet() -> Dashboard:
    firing_alerts = Annotation(
        name="Prometheus alerts",
        datasource=PROMETHEUS,
        iconColor="orange",
        expr='ALERTS{alertname=~"Gradwatch.+", alertstate="firing"}',
        titleFormat="{{alertname}}",
        textFormat="{{severity}}: run {{run}}",
        tagKeys="alertname,severity",
    )
    return _dashboard(
        "gradwatch-fleet",
        "gradwatch / Fleet",
        "Every run of every collector at a glance, and the collectors' own health.",
        [],
        [alert_annotation(), firing_alerts],
        [
            [
                stat("Runs by status", query("sum by (status) (gradwatch_collector_runs)", "{{status}}"), w=8),
                stat("Alerts active", query("sum(gradwatch_alert_active)", "alerts"), steps=ALERTS_FIRING, w=4),
                stat("Runs with alerts",
                     query("count(max by (run) (gradwatch_alert_active) == 1) or vector(0)", "runs"),
                     steps=ALERTS_FIRING, w=4),
                stat("Total steps / s", query(f"sum(rate(gradwatch_steps_total[{RATE}]))", "steps/s"), unit="ops", w=8),
            ],
            [
                table(
                    "Runs",
                    query("max by (run, status) (gradwatch_run_status == 1)", instant=True, table=True),
                    query("max by (run) (gradwatch_run_step)", instant=True, table=True),
                    query(f"sum by (run) (rate(gradwatch_steps_total[{RATE}]))", instant=True, table=True),
                    query("sum by (run) (gradwatch_alert_active)", instant=True, table=True),
                    w=24,
                    h=9,
                    # One row per run: join the four queries on the run label.
                    transformations=[
                        Transformation(id="merge"),
                        Transformation(id="organize", options={
                            "excludeByName": {"Time": True, "Value #A": True},
                            "renameByName": {"Value #B": "step", "Value #C": "steps/s", "Value #D": "alerts active"},
                        }),
                    ],
                ),
            ],
            [
                timeseries("Steps / s by run", query(f"sum by (run) (rate(gradwatch_steps_total[{RATE}]))", "{{run}}"),
                           unit="ops"),
                table(
                    "Alerts firing",
                    query("gradwatch_alert_active == 1", instant=True, table=True),
                    transformations=[Transformation(id="organize", options={
                        "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
                    })],
                ),
            ],
            [row("Collectors")],
            [
                stat("Collectors up", query('up{job="gradwatch"}', "{{instance}}"),
                     steps=thresholds("red", (1, "green")), w=6),
                stat("Probe connections", query("gradwatch_collector_connections", "{{instance}}"), w=6),
                stat("Ingest lag", query("gradwatch_collector_ingest_lag_seconds", "{{instance}}"), unit="s",
                     steps=thresholds("green", (1, "orange"), (10, "red")), w=6),
                stat("Layer cap per run", query("gradwatch_collector_layer_cap", "{{instance}}"), w=6),
            ],
            [
                timeseries("Messages / s by type",
                           query(f"sum by (type) (rate(gradwatch_collector_messages_total[{RATE}]))", "{{type}}"),
                           unit="ops", w=8),
                timeseries("Rejected messages / s by reason",
                           query(f"sum by (reason) (rate(gradwatch_collector_rejected_messages_total[{RATE}]))",
                                 "{{reason}}"),
                           unit="ops", w=8),
                timeseries("Runs evicted",
                           query(f"sum(increase(gradwatch_collector_runs_evicted_total[{RATE}]))", "evicted"),
                           bars=True, w=8),
            ],
            [
                timeseries("Scrape: samples and duration",
                           query('scrape_samples_scraped{job="gradwatch"}', "samples {{instance}}"),
                           query('scrape_duration_seconds{job="gradwatch"}', "duration {{instance}}"),
                           overrides=[{"matcher": {"id": "byRegexp", "options": "duration.*"},
                                       "properties": [{"id": "unit", "value": "s"},
                                                      {"id": "custom.axisPlacement", "value": "right"}]}],
                           description="Samples per scrape is the collector's series count: the cardinality budget "
                           "that the layer cap bounds."),
                bargauge("Series by metric (top 10)",
                         query('topk(10, count by (__name__) ({__name__=~"gradwatch_.+"}))', "{{__name__}}",
                               instant=True)),
            ],
        ],
    )


def all_dashboards() -> list[Dashboard]:
    return [run_overview(), gradient_flow(), fleet()]
