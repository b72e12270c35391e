"""Prometheus exposition: a custom collector that yields metric families from the registry's
current state at scrape time (no per-run global gauge objects to create, update or forget),
and the one function that writes them in the format prometheus_client's `choose_encoder`
picked (the classic text format or OpenMetrics).

Every name here is listed with its type, labels and meaning in docs/metrics.md; dashboards
and alerting rules depend on them, so treat them as an API.
"""

from __future__ import annotations

import math
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.detectors.base import Observation
from gradwatch.collector.detectors.stats import all_finite
from gradwatch.collector.registry import Registry
from gradwatch.collector.run_state import RunState
from gradwatch.protocol import ALERT_KINDS

SEVERITIES = ("info", "warning", "critical")
MESSAGE_TYPES = ("hello", "steps", "heartbeat", "ack", "bye", "lr_find", "landscape")
# Every reason a message or connection is refused, so each has a series from the start.
REJECT_REASONS = (
    "invalid_message",  # not JSON, wrong types, unknown message type (close 1007)
    "unsupported_version",  # hello.v this collector does not speak (close 4001)
    "no_hello",  # first message was not a hello, or a second hello (close 1008)
    "run_refused",  # run layout conflict, rank out of range, max_runs reached (close 1008)
    "rate_limited",  # more messages per second than allowed (close 1008)
    "too_big",  # frame over max_frame_bytes (close 1009)
    "unauthorized",  # missing or wrong token (HTTP 401 at the handshake)
)
# Where the collector caught an exception it did not expect (logged with its traceback).
INTERNAL_ERROR_PLACES = (
    "effect",  # what a registry event does: history row, action sent, run state saved
    "http",  # an HTTP handler (answered 500)
    "connection",  # a probe connection's handling (closed with 1011)
    "tick",  # the periodic heartbeat check
    "detector",  # a detector raised: switched off for that run, the others go on
)


@dataclass
class IngestStats:
    """Counters the websocket shell updates and /metrics exports."""

    connections: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    ingest_lag_seconds: float = math.nan  # receive time minus the newest record's time
    internal_errors: Counter[str] = field(default_factory=Counter)  # by INTERNAL_ERROR_PLACES


def _gauge(name: str, doc: str, labels: list[str] | None = None, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels, unit=unit)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


class MetricsCollector(Collector):
    def __init__(
        self,
        registry: Registry,
        stats: IngestStats,
        config: CollectorConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.stats = stats
        self.config = config
        self.clock = clock
        self._lines_by_run: dict[str, LayerLines] = {}

    def describe(self) -> list[Metric]:
        return []  # families depend on state; do not collect at registration

    def collect(self, wanted: set[str] | None = None) -> Iterator[Metric]:
        """Every family, the per-layer ones last; only those named in `wanted` (as exposed: a
        counter by its `_total` name) when given. Each family holds its values when yielded
        (the per-layer ones an immutable observation per run), so a caller may format them
        over several turns of the event loop."""
        yield from self._run_families(wanted)
        yield from (family for family in self._health_families() if _exposed(family, wanted))
        yield from self._layer_families(wanted)

    def exposition(self, wanted: set[str] | None = None, encoder: Encoder = generate_latest) -> bytes:
        """The /metrics body in one go (tests; the server formats a snapshot in slices)."""
        return b"".join(exposition_chunks(self.collect(wanted), encoder))

    def _layer_families(self, wanted: set[str] | None) -> Iterator[LayerFamily]:
        if wanted is not None and wanted.isdisjoint(LAYER_FAMILY_NAMES):
            return
        now = self.clock()
        cap = self.config.metrics.layer_cap
        rows = []
        lines_by_run: dict[str, LayerLines] = {}  # only visible runs: evicted ones leave the cache
        for run in self.registry.visible_runs(now, self.config.retention.finished_grace_seconds):
            lines = self._lines_by_run.get(run.name)
            if lines is None or lines.layers is not run.layers:
                lines = LayerLines.build(run.name, run.layers, cap)
            lines_by_run[run.name] = lines
            if run.latest_layer_detail is not None:
                rows.append(LayerRows(lines, run.latest_layer_detail))
        self._lines_by_run = lines_by_run
        for name, doc, values_of in LAYER_FAMILIES:
            if wanted is None or name in wanted:
                yield LayerFamily(name, doc, values_of, rows)

    def _run_families(self, wanted: set[str] | None) -> Iterator[Metric]:
        families = {
            "up": _gauge("gradwatch_run_up", "1 while the run is running (or degraded), 0 once it ended", ["run"]),
            "status": _gauge("gradwatch_run_status", "1 for the run's current status", ["run", "status"]),
            "step": _gauge("gradwatch_run_step", "last merged optimizer step", ["run"]),
            "steps": _counter("gradwatch_steps_total", "merged optimizer steps", ["run"]),
            "last_ts": _gauge("gradwatch_run_last_step_timestamp_seconds",
                              "probe time of the last merged step (Unix seconds)", ["run"]),
            "ranks": _gauge("gradwatch_run_ranks", "ranks currently connected and reporting", ["run"]),
            "world": _gauge("gradwatch_run_world_size", "ranks the run was started with", ["run"]),
            "loss": _gauge("gradwatch_loss", "last loss: train (merged over ranks) or val (scalar val_loss)",
                           ["run", "split"]),
            "gap": _gauge("gradwatch_loss_gap", "val loss minus train loss", ["run"]),
            "gnorm": _gauge("gradwatch_grad_norm", "global gradient norm the optimizer saw", ["run"]),
            "gnorm_pre": _gauge("gradwatch_grad_norm_preclip", "total norm returned by clip_grad_norm_", ["run"]),
            "lr": _gauge("gradwatch_learning_rate", "learning rate per param group", ["run", "group"]),
            "momentum": _gauge("gradwatch_momentum", "momentum (or beta1) per param group", ["run", "group"]),
            "wd": _gauge("gradwatch_weight_decay", "weight decay per param group", ["run", "group"]),
            "scale": _gauge("gradwatch_amp_loss_scale", "AMP GradScaler loss scale", ["run"]),
            "skipped": _counter("gradwatch_amp_skipped_steps_total",
                                "optimizer steps skipped (AMP overflow or a skip_step action)", ["run"]),
            "nf_layers": _gauge("gradwatch_nonfinite_layers", "layers whose gradient holds NaN/inf at the last step",
                                ["run"]),
            "nf_steps": _counter("gradwatch_nonfinite_steps_total",
                                 "steps with a non-finite gradient, grad norm or loss", ["run"]),
            "duration": _gauge("gradwatch_step_duration_seconds", "last step time per rank", ["run", "rank"]),
            "scalar": _gauge("gradwatch_scalar", "last value of each scalar logged with run.log", ["run", "name"]),
            "l_dropped": _gauge("gradwatch_layers_dropped", "layers beyond the per-run layer cap, not exported",
                                ["run"]),
            "frozen": _gauge("gradwatch_run_frozen_layers",
                             "layers frozen (no parameter requires a gradient) at the last per-layer detail", ["run"]),
            "alert": _gauge("gradwatch_alert_active", "1 while an alert of this kind and severity is active",
                            ["run", "kind", "severity"]),
            "alerts": _counter("gradwatch_alerts_total", "alerts fired", ["run", "kind"]),
            "actions": _counter("gradwatch_actions_total",
                                "actions: armed/sent by the collector, applied/refused as acknowledged per rank",
                                ["run", "action", "outcome"]),
            "dropped": _counter("gradwatch_probe_dropped_records_total",
                                "step records a probe dropped (buffer full during an outage)", ["run", "rank"]),
        }
        # Families not asked for take their samples into a sink: one pass over the runs
        # serves a filtered scrape as cheaply as it can.
        f = {key: family if _exposed(family, wanted) else _SINK for key, family in families.items()}
        now = self.clock()
        cap = self.config.metrics.layer_cap
        for run in self.registry.visible_runs(now, self.config.retention.finished_grace_seconds):
            self._add_run(f, run, cap)
        yield from (family for family in f.values() if family is not _SINK)

    def _add_run(self, f: dict[str, Metric], run: RunState, cap: int) -> None:
        name = run.name
        f["up"].add_metric([name], 0.0 if run.ended else 1.0)
        f["status"].add_metric([name, run.status], 1.0)
        f["step"].add_metric([name], max(run.last_merged_step, 0))
        f["steps"].add_metric([name], run.steps_total)
        f["ranks"].add_metric([name], run.ranks_reporting)
        f["world"].add_metric([name], run.hello.world_size)
        f["skipped"].add_metric([name], run.skipped_steps_total)
        f["nf_steps"].add_metric([name], run.nonfinite_steps_total)
        for rank, state in run.ranks.items():
            f["dropped"].add_metric([name, str(rank)], state.dropped)
            if state.step_time is not None:
                f["duration"].add_metric([name, str(rank)], state.step_time)
        active = {(e.kind, e.severity) for e in run.active_alerts.values()}
        for kind in ALERT_KINDS:
            f["alerts"].add_metric([name, kind], run.alerts_total.get(kind, 0))
            for severity in SEVERITIES:
                f["alert"].add_metric([name, kind, severity], float((kind, severity) in active))
        for (action, outcome), count in sorted(run.actions_total.items()):
            f["actions"].add_metric([name, action, outcome], count)
        layers = run.layers
        f["l_dropped"].add_metric([name], max(0, len(layers) - cap))
        f["frozen"].add_metric([name], len(run.frozen_layers))

        latest = run.latest
        if latest.time is None:
            return
        f["last_ts"].add_metric([name], latest.time)
        f["nf_layers"].add_metric([name], latest.nonfinite_layers)
        for split, value in (("train", latest.loss), ("val", latest.val_loss)):
            if value is not None:
                f["loss"].add_metric([name, split], value)
        if latest.loss is not None and latest.val_loss is not None:
            f["gap"].add_metric([name], latest.val_loss - latest.loss)
        for key, value in (
            ("gnorm", latest.grad_norm), ("gnorm_pre", latest.grad_norm_preclip), ("scale", latest.loss_scale)
        ):
            if value is not None:
                f[key].add_metric([name], value)
        for key, values in (("lr", latest.lr), ("momentum", latest.momentum), ("wd", latest.weight_decay)):
            for group, value in enumerate(values):
                if value is not None:
                    f[key].add_metric([name, str(group)], value)
        for scalar, value in sorted(latest.scalars.items()):
            f["scalar"].add_metric([name, scalar], value)

    def _health_families(self) -> Iterator[Metric]:
        stats = self.stats
        connections = _gauge("gradwatch_collector_connections", "open probe connections")
        connections.add_metric([], stats.connections)
        messages = _counter("gradwatch_collector_messages_total", "probe messages accepted, by type", ["type"])
        for kind in MESSAGE_TYPES:
            messages.add_metric([kind], stats.messages.get(kind, 0))
        rejected = _counter("gradwatch_collector_rejected_messages_total",
                            "messages or connections refused, by reason", ["reason"])
        for reason in REJECT_REASONS:
            rejected.add_metric([reason], stats.rejected.get(reason, 0))
        lag = _gauge("gradwatch_collector_ingest_lag_seconds",
                     "receive time minus probe time of the newest record in the last batch")
        lag.add_metric([], stats.ingest_lag_seconds)
        runs = _gauge("gradwatch_collector_runs", "runs in memory, by status", ["status"])
        for status, count in self.registry.status_counts().items():
            runs.add_metric([status], count)
        evicted = _counter("gradwatch_collector_runs_evicted_total", "ended runs evicted to stay under max_runs")
        evicted.add_metric([], self.registry.evicted_total)
        cap = _gauge("gradwatch_collector_layer_cap", "per-run cap on exported per-layer series")
        cap.add_metric([], self.config.metrics.layer_cap)
        errors = _counter("gradwatch_collector_internal_errors_total",
                          "unexpected exceptions caught (each logged with its traceback), by where", ["where"])
        for where in INTERNAL_ERROR_PLACES:
            errors.add_metric([where], stats.internal_errors.get(where, 0))
        yield from (connections, messages, rejected, lag, runs, evicted, cap, errors)


def _exposed(family: Metric, wanted: set[str] | None) -> bool:
    """Whether a scrape restricted to `wanted` names (None: all) includes `family`; a counter
    is asked for by its exposed `_total` name."""
    return wanted is None or family.name in wanted or f"{family.name}_total" in wanted


class _Sink(GaugeMetricFamily):
    """Takes the samples of a family nobody asked for, and keeps none."""

    def __init__(self) -> None:
        super().__init__("gradwatch_unused", "")

    def add_metric(self, *args: object, **kwargs: object) -> None:
        pass


_SINK = _Sink()


def exported_layers(layers: tuple[str, ...], cap: int) -> list[tuple[int, str]]:
    """(index, name) of the layers exported: the first `cap` distinct names in hello order
    (a duplicate name would make two identical series, which is invalid exposition)."""
    seen: dict[str, int] = {}
    for index, layer in enumerate(layers):
        if len(seen) >= cap:
            break
        seen.setdefault(layer, index)
    return [(index, layer) for layer, index in seen.items()]


# The per-layer families hold most series (runs x layers x 3): their lines are written
# directly, about 10x faster than through prometheus_client's generic label handling.
# Run and layer names cannot need escaping (the protocol's name patterns exclude quotes,
# backslashes and newlines), which the fast path relies on; a gauge's sample line is the
# same in the text format and in OpenMetrics.
LAYER_FAMILIES: tuple[tuple[str, str, Callable[[Observation], tuple[float | None, ...] | None]], ...] = (
    ("gradwatch_layer_grad_norm", "per-layer gradient norm (capped, see layers_dropped)",
     lambda o: o.layer_grad_norm),
    ("gradwatch_layer_weight_norm", "per-layer weight norm", lambda o: o.layer_weight_norm),
    ("gradwatch_layer_update_ratio", "per-layer ||update|| / ||weight||", lambda o: o.layer_update_ratio),
)
LAYER_FAMILY_NAMES = frozenset(name for name, _, _ in LAYER_FAMILIES)


@dataclass(frozen=True)
class LayerLines:
    """What a run's per-layer series look like, built once per layout: which layers are
    exported and, per family, each exported layer's line up to its value."""

    run: str
    layers: tuple[str, ...]  # the run's layout these lines were built for
    indices: tuple[int, ...] | None  # the exported layers' indices; None when all are, in order
    prefixes: dict[str, tuple[str, ...]]  # family -> 'family{layer="…",run="…"} ' per exported layer

    @classmethod
    def build(cls, run: str, layers: tuple[str, ...], cap: int) -> LayerLines:
        exported = exported_layers(layers, cap)
        indices = tuple(index for index, _ in exported)
        return cls(
            run,
            layers,
            None if indices == tuple(range(len(layers))) else indices,
            {family: tuple(f'{family}{{layer="{layer}",run="{run}"}} ' for _, layer in exported)
             for family in LAYER_FAMILY_NAMES},
        )

    def exported(self, values: tuple[float | None, ...]) -> tuple[float | None, ...]:
        """The exported layers' entries of `values` (one per layer of the layout)."""
        return values if self.indices is None else tuple(values[i] for i in self.indices)


@dataclass(frozen=True)
class LayerRows:
    lines: LayerLines
    detail: Observation  # the run's latest observation with per-layer values


class LayerFamily(Metric):
    """A per-layer gauge family over the runs' latest detail. `lines` is the fast path
    `exposition_chunks` takes; `samples` holds the same series as prometheus_client's
    Sample tuples, built when asked, for any other reader of `collect()`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        values_of: Callable[[Observation], tuple[float | None, ...] | None],
        rows: list[LayerRows],
    ) -> None:
        # Not Metric.__init__: it assigns `samples`, which this family builds on demand.
        self.name, self.documentation, self.type, self.unit = name, documentation, "gauge", ""
        self._values_of, self._rows = values_of, rows

    def _values(self) -> Iterator[tuple[LayerLines, tuple[float | None, ...]]]:
        for row in self._rows:
            values = self._values_of(row.detail)
            if values is not None:
                yield row.lines, row.lines.exported(values)

    def lines(self) -> Iterator[bytes]:
        """The family's sample lines, a run at a time."""
        for lines, values in self._values():
            prefixes = lines.prefixes[self.name]
            if all_finite(values):  # the usual case: repr is the exposition of a finite float
                yield ("\n".join(map(operator.add, prefixes, map(repr, values))) + "\n").encode()
            else:  # a None (no line) or a non-finite value (+Inf, -Inf, NaN)
                yield "".join(f"{prefix}{floatToGoString(value)}\n" for prefix, value in zip(prefixes, values)
                              if value is not None).encode()

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]  # read-only: built from the rows
        samples = []
        for lines, values in self._values():
            names = lines.layers if lines.indices is None else [lines.layers[i] for i in lines.indices]
            samples += [Sample(self.name, {"layer": layer, "run": lines.run}, value)
                        for layer, value in zip(names, values) if value is not None]
        return samples


Encoder = Callable[[Collector], bytes]


def exposition_chunks(families: Iterable[Metric], encoder: Encoder = generate_latest) -> Iterator[bytes]:
    """`families` in the format of `encoder` (prometheus_client's `generate_latest` for the
    text format, or what `choose_encoder` picked), a family or one run's per-layer lines at a
    time, so that a caller on the event loop can let ingest in between."""
    # What the format writes after the last family (OpenMetrics: "# EOF"); the encoder writes
    # it after every call, so it is cut from each family's text and written once at the end.
    end = encoder(_Snapshot([]))
    for family in families:
        if isinstance(family, LayerFamily):
            yield encoder(_Snapshot([Metric(family.name, family.documentation, family.type)])).removesuffix(end)
            yield from family.lines()
        else:
            yield encoder(_Snapshot([family])).removesuffix(end)
    yield end


class _Snapshot(Collector):
    """Families already collected, handed to an encoder (which asks a Collector for them)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
