"""The subset of Grafana's dashboard JSON model that gradwatch emits.

These models are both the builder's output types and the schema the committed JSON is
validated against: every object forbids unknown keys, so a typo in the builder or a
hand edit of a committed file fails validation instead of being silently ignored by
Grafana. Panel-type specific `options` and `fieldConfig.defaults.custom` stay free-form
dicts: they differ per panel type and Grafana ignores what it does not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# Grafana 10.4 / 11 write this schema version; older dashboards are migrated on load.
SCHEMA_VERSION = 39


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasourceRef(_Model):
    type: Literal["prometheus", "datasource"]
    uid: str


class Target(_Model):
    """One Prometheus query of a panel."""

    refId: str
    datasource: DatasourceRef
    expr: str
    legendFormat: str = ""
    editorMode: Literal["code"] = "code"
    range: bool = True
    instant: bool = False
    format: Literal["time_series", "table", "heatmap"] = "time_series"


class GridPos(_Model):
    h: Annotated[int, Field(ge=1)]
    w: Annotated[int, Field(ge=1, le=24)]
    x: Annotated[int, Field(ge=0, le=23)]
    y: Annotated[int, Field(ge=0)]


class ThresholdStep(_Model):
    color: str
    value: float | None  # None: the base step, below every other

    @model_serializer
    def _keep_null_value(self) -> dict[str, Any]:
        # Grafana needs the base step's `"value": null`; dumping with exclude_none would drop it.
        return {"color": self.color, "value": self.value}


class Thresholds(_Model):
    mode: Literal["absolute", "percentage"] = "absolute"
    steps: list[ThresholdStep]


class FieldDefaults(_Model):
    unit: str | None = None
    decimals: int | None = None
    min: float | None = None
    max: float | None = None
    thresholds: Thresholds | None = None
    color: dict[str, Any] | None = None
    custom: dict[str, Any] = {}
    mappings: list[dict[str, Any]] = []


class FieldConfig(_Model):
    defaults: FieldDefaults = FieldDefaults()
    overrides: list[dict[str, Any]] = []


class Transformation(_Model):
    id: str
    options: dict[str, Any] = {}


PanelType = Literal["timeseries", "stat", "table", "heatmap", "bargauge", "row"]


class Panel(_Model):
    id: int
    type: PanelType
    title: str
    description: str = ""
    gridPos: GridPos
    datasource: DatasourceRef | None = None  # None only for rows
    targets: list[Target] = []
    fieldConfig: FieldConfig = FieldConfig()
    options: dict[str, Any] = {}
    transformations: list[Transformation] = []
    collapsed: bool | None = None  # rows only


class VariableOption(_Model):
    text: str | list[str]
    value: str | list[str]
    selected: bool = False


class Variable(_Model):
    """A dashboard template variable; referenced as `$name` / `${name}` in queries."""

    type: Literal["query", "datasource", "custom"]
    name: str
    label: str
    query: str
    datasource: DatasourceRef | None = None  # query variables only
    definition: str | None = None
    current: VariableOption | None = None
    refresh: Literal[0, 1, 2] = 0  # 1: on dashboard load, 2: on time range change
    includeAll: bool = False
    allValue: str | None = None
    multi: bool = False
    regex: str = ""
    sort: int = 0
    hide: Literal[0, 1, 2] = 0


class Templating(_Model):
    list: list[Variable]


class Annotation(_Model):
    """A PromQL annotation: Grafana marks the time ranges where the query returns samples."""

    name: str
    datasource: DatasourceRef
    enable: bool = True
    hide: bool = False
    iconColor: str
    expr: str
    step: str = "$__interval"
    titleFormat: str = ""
    textFormat: str = ""
    tagKeys: str = ""
    useValueForTime: bool = False


class Annotations(_Model):
    list: list[Annotation]


class TimeRange(_Model):
    # "from" is a Python keyword: the field is aliased and always serialized by alias.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    from_: str = Field(alias="from")
    to: str = "now"


class Dashboard(_Model):
    uid: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")]
    title: str
    description: str = ""
    tags: list[str]
    timezone: Literal["browser", "utc"] = "browser"
    editable: bool = True
    graphTooltip: Literal[0, 1, 2] = 1  # shared crosshair across panels
    refresh: str = "10s"
    schemaVersion: int = SCHEMA_VERSION
    version: int = 1
    time: TimeRange
    templating: Templating
    annotations: Annotations
    panels: list[Panel]

    def to_json(self) -> str:
        """The committed file's exact text: stable key order, two-space indent, final newline."""
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n"
