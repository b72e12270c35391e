"""Small constructors for the panels, variables and annotations gradwatch's dashboards use.

Panels are declared without positions; `layout` places them on Grafana's 24-column grid
row by row and numbers them, so a dashboard reads as a list of rows of panels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradwatch.dashboards.schema import (
    Annotation,
    DatasourceRef,
    FieldConfig,
    FieldDefaults,
    GridPos,
    Panel,
    PanelType,
    Target,
    Thresholds,
    ThresholdStep,
    Transformation,
    Variable,
    VariableOption,
)

# The uid the provisioned Prometheus datasource gets (dashboards/provisioning/datasources).
DATASOURCE_UID = "gradwatch-prometheus"
DATASOURCE_VARIABLE = "datasource"
# Panels query through the datasource variable, so a dashboard pushed to a Grafana whose
# Prometheus has another uid still works after picking it in the dropdown.
PROMETHEUS = DatasourceRef(type="prometheus", uid=f"${{{DATASOURCE_VARIABLE}}}")

GRID_COLUMNS = 24


def query(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> Target:
    """A PromQL target; refIds are assigned by the panel constructor."""
    return Target(
        refId="",
        datasource=PROMETHEUS,
        expr=expr,
        legendFormat=legend,
        range=not instant,
        instant=instant,
        format="table" if table else "time_series",
    )


def thresholds(base: str, *steps: tuple[float, str]) -> Thresholds:
    """Colour `base` below the first step, then each (value, colour) from its value up."""
    return Thresholds(
        steps=[ThresholdStep(color=base, value=None)] + [ThresholdStep(color=c, value=v) for v, c in steps]
    )


# Stat and bar-gauge panels show each series' last value, coloured by threshold steps.
LAST_VALUE = {"calcs": ["lastNotNull"], "fields": "", "values": False}


def _threshold_colored(unit: str, steps: Thresholds | None) -> FieldDefaults:
    return FieldDefaults(unit=unit, thresholds=steps or thresholds("blue"), color={"mode": "thresholds"})


def _panel(
    type_: PanelType,
    title: str,
    targets: Sequence[Target],
    *,
    w: int,
    h: int,
    description: str = "",
    defaults: FieldDefaults | None = None,
    options: dict[str, Any] | None = None,
    overrides: Sequence[dict[str, Any]] = (),
    transformations: Sequence[Transformation] = (),
) -> Panel:
    return Panel(
        id=0,
        type=type_,
        title=title,
        description=description,
        gridPos=GridPos(w=w, h=h, x=0, y=0),
        datasource=PROMETHEUS,
        targets=[t.model_copy(update={"refId": chr(ord("A") + i)}) for i, t in enumerate(targets)],
        fieldConfig=FieldConfig(defaults=defaults or FieldDefaults(), overrides=list(overrides)),
        options=options or {},
        transformations=list(transformations),
    )


def timeseries(
    title: str,
    *targets: Target,
    unit: str = "short",
    log_scale: int | None = None,
    band: Thresholds | None = None,
    bars: bool = False,
    w: int = 12,
    h: int = 8,
    description: str = "",
    overrides: Sequence[dict[str, Any]] = (),
) -> Panel:
    """A time series panel; `band` shades threshold regions (e.g. a healthy range)."""
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else 0,
        "showPoints": "never",
        "spanNulls": True,
    }
    if log_scale:
        custom["scaleDistribution"] = {"type": "log", "log": log_scale}
    if band:
        custom["thresholdsStyle"] = {"mode": "line+area"}
    return _panel(
        "timeseries",
        title,
        targets,
        w=w,
        h=h,
        description=description,
        defaults=FieldDefaults(unit=unit, custom=custom, thresholds=band),
        options={"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                 "tooltip": {"mode": "multi", "sort": "desc"}},
        overrides=overrides,
    )


def stat(
    title: str,
    *targets: Target,
    unit: str = "short",
    steps: Thresholds | None = None,
    show_name: bool = False,
    w: int = 4,
    h: int = 4,
    description: str = "",
) -> Panel:
    """A single-value panel showing each series' last value (or its name, for status labels)."""
    return _panel(
        "stat",
        title,
        targets,
        w=w,
        h=h,
        description=description,
        defaults=_threshold_colored(unit, steps),
        options={
            "reduceOptions": LAST_VALUE,
            "textMode": "name" if show_name else "auto",
            "colorMode": "background" if steps else "value",
            "graphMode": "none" if show_name else "area",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    )


def bargauge(
    title: str,
    *targets: Target,
    unit: str = "short",
    steps: Thresholds | None = None,
    w: int = 12,
    h: int = 8,
    description: str = "",
) -> Panel:
    """Horizontal bars, one per series, with each series' last value."""
    return _panel(
        "bargauge",
        title,
        targets,
        w=w,
        h=h,
        description=description,
        defaults=_threshold_colored(unit, steps),
        options={
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": LAST_VALUE,
            "showUnfilled": True,
            "valueMode": "color",
        },
    )


def heatmap(title: str, target: Target, *, w: int = 24, h: int = 10, description: str = "") -> Panel:
    """One row per series (e.g. per layer) over time, coloured on a log scale."""
    return _panel(
        "heatmap",
        title,
        [target],
        w=w,
        h=h,
        description=description,
        options={
            "calculate": False,  # series are the rows as they are, not bucketed
            "yAxis": {"axisPlacement": "left"},
            "rowsFrame": {"layout": "auto"},
            "color": {"mode": "scheme", "scheme": "Inferno", "scale": "exponential", "exponent": 0.5},
            "cellGap": 1,
            "tooltip": {"show": True, "yHistogram": False},
            "legend": {"show": True},
        },
    )


def table(
    title: str,
    *targets: Target,
    w: int = 12,
    h: int = 8,
    description: str = "",
    transformations: Sequence[Transformation] = (),
    overrides: Sequence[dict[str, Any]] = (),
) -> Panel:
    return _panel(
        "table",
        title,
        targets,
        w=w,
        h=h,
        description=description,
        options={"showHeader": True, "cellHeight": "sm"},
        transformations=transformations,
        overrides=overrides,
    )


def row(title: str) -> Panel:
    return Panel(id=0, type="row", title=title, gridPos=GridPos(w=GRID_COLUMNS, h=1, x=0, y=0), collapsed=False)


def layout(rows: Sequence[Sequence[Panel]]) -> list[Panel]:
    """Place each row of panels left to right below the previous row and number them from 1."""
    placed: list[Panel] = []
    y = 0
    for panels in rows:
        x = 0
        height = 0
        for panel in panels:
            pos = panel.gridPos
            if x + pos.w > GRID_COLUMNS:
                raise ValueError(f"row starting with {panels[0].title!r} is wider than {GRID_COLUMNS} columns")
            position = GridPos(w=pos.w, h=pos.h, x=x, y=y)
            placed.append(panel.model_copy(update={"id": len(placed) + 1, "gridPos": position}))
            x += pos.w
            height = max(height, pos.h)
        y += height
    return placed


def datasource_variable() -> Variable:
    return Variable(
        type="datasource",
        name=DATASOURCE_VARIABLE,
        label="Prometheus",
        query="prometheus",
        current=VariableOption(text=DATASOURCE_UID, value=DATASOURCE_UID),
    )


def label_variable(name: str, label: str, metric_selector: str, *, all_: bool = False, multi: bool = False) -> Variable:
    """A variable listing the values of label `name` on the series `metric_selector` selects.

    With `all_`, "All" means the regex `.*`, so queries must match it with `=~`.
    """
    definition = f"label_values({metric_selector}, {name})"
    return Variable(
        type="query",
        name=name,
        label=label,
        query=definition,
        definition=definition,
        datasource=PROMETHEUS,
        refresh=2,
        includeAll=all_,
        allValue=".*" if all_ else None,
        multi=multi,
        sort=1,
        current=VariableOption(text="All", value="$__all") if all_ else None,
    )


def alert_annotation(selector: str = "") -> Annotation:
    """Shade the time where a gradwatch detector alert is active, titled by its kind."""
    return Annotation(
        name="gradwatch alerts",
        datasource=PROMETHEUS,
        iconColor="red",
        expr=f"gradwatch_alert_active{{{selector}}} == 1",
        titleFormat="{{kind}}",
        textFormat="{{severity}} alert on run {{run}}",
        tagKeys="kind,severity,run",
    )
