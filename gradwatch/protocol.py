"""The wire protocol between probe and collector: one JSON object per websocket text frame.

Probe -> collector: ``hello`` (once per connection, first), then any number of ``steps``
batches, ``ack`` for actions, ``heartbeat`` when idle, ``lr_find`` (the range test's curve
and verdict) and ``landscape`` (a loss-landscape grid) as they are computed, ``bye`` at
detach.
Collector -> probe: ``welcome`` (answer to hello), ``received`` (after each ``steps``
batch is taken in: the probe keeps sent records until then and replays the rest after a
reconnect, so a collector killed mid-batch loses nothing), ``action``.

Norms travel squared (``*_sq``) so that the collector can *sum* the partial squared norms
of sharded parameters (FSDP2 / DTensor) across ranks; it never averages them.
Non-finite floats travel as the JSON constants ``NaN`` / ``Infinity`` (they are findings,
not errors), which both Python's ``json`` and pydantic's parser accept.

Errors are answered by closing the websocket with one of the close codes below and a
reason text that says what was wrong.

The probe builds no model per step: its records are JSON text from the start
(`EncodedRecord`, written with orjson by `probe/record.py`), batched into ``steps`` frames
by joining that text (`encode_steps`). The wire is the same either way, and the collector
validates every frame with the models below.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

# 2: StepRecord.layer_frozen and StepRecord.grads_kept. 3: Welcome.http_url. 4: LRFind and
# Landscape. Messages forbid unknown fields and types, so a new field or message is a new
# version: an older peer refuses it at hello, with a clear reason, not mid-run.
PROTOCOL_VERSION = 4

# Run names and label values end up in Prometheus labels, SQLite and log lines: keep them
# printable and bounded so no one can inject series or break the exposition format.
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"
LAYER_NAME_PATTERN = r"^[A-Za-z0-9_.:/\[\]<>-]{1,200}$"
SCALAR_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,63}$"

MAX_LAYERS = 20_000
MAX_RECORDS_PER_BATCH = 1_000
MAX_SCALARS = 64
MAX_PARAM_GROUPS = 256
MAX_TAGS = 32
MAX_LR_FIND_POINTS = 1_000  # the probe keeps every k-th point of a longer test
MAX_LANDSCAPE_AXIS = 101  # points per landscape axis: 101 x 101 losses are about 0.2 MB of JSON
MAX_TEXT = 500

# Close codes (RFC 6455 ranges; 4000-4999 are for applications).
CLOSE_INVALID_MESSAGE = 1007  # the payload did not validate
CLOSE_POLICY = 1008  # protocol misuse: no hello first, wrong run, rate limit
CLOSE_TOO_BIG = 1009  # frame larger than the collector's limit
CLOSE_UNSUPPORTED_VERSION = 4001
CLOSE_UNAUTHORIZED = 4003

RunName = Annotated[str, Field(pattern=RUN_NAME_PATTERN)]
LayerName = Annotated[str, Field(pattern=LAYER_NAME_PATTERN)]
ScalarName = Annotated[str, Field(pattern=SCALAR_NAME_PATTERN)]
TagValue = Annotated[str, Field(max_length=200)]
NonNegative = Annotated[float, Field(ge=0.0)]
# Bounded so that every count and step fits a SQLite INTEGER: a larger one would make the
# collector's history writes fail (OverflowError) for every run, not only the sender's.
MAX_COUNT = 2**63 - 1
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]

ActionKind = Literal["reduce_lr", "skip_step", "checkpoint", "stop"]
AlertKind = Literal[
    "nonfinite",
    "exploding_gradients",
    "vanishing_gradients",
    "dead_layer",
    "loss_spike",
    "plateau",
    "overfitting",
    "amp_scale_collapse",
    "update_ratio",
    "divergence",
    "not_learning",
    "not_updated",
    "accumulating_gradients",
    "run_lost",
    "rank_lost",
]
ALERT_KINDS: tuple[str, ...] = AlertKind.__args__  # type: ignore[attr-defined]
ACTION_KINDS: tuple[str, ...] = ActionKind.__args__  # type: ignore[attr-defined]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", frozen=True)


class Hello(_Message):
    """First message of every connection: who is talking and the layout of its vectors."""

    type: Literal["hello"] = "hello"
    v: int
    run: RunName
    rank: Count = 0
    world_size: Annotated[int, Field(ge=1, le=65_536)] = 1
    # True when parameters are sharded across ranks: per-layer squared norms are partial
    # and the collector sums them over ranks. False (DDP, single process): every rank
    # sees the same gradients and the collector reads them from the lowest rank.
    sharded: bool = False
    layers: Annotated[list[LayerName], Field(max_length=MAX_LAYERS)]
    param_groups: Annotated[int, Field(ge=0, le=MAX_PARAM_GROUPS)] = 0
    actions: bool = False
    every: Annotated[int, Field(ge=1)] = 1
    host: Annotated[str, Field(max_length=255)] = ""
    pid: Count = 0
    started: float = 0.0
    tags: Annotated[dict[ScalarName, TagValue], Field(max_length=MAX_TAGS)] = {}


class StepRecord(_Message):
    """Everything the probe measured at one optimizer step (or one backward, without an optimizer)."""

    step: Count
    time: float
    step_time: NonNegative | None = None  # seconds since the previous record
    loss: float | None = None  # mean over the micro-batches of this step
    grad_norm_sq: float | None = None  # squared global gradient norm the optimizer saw
    grad_norm_preclip: float | None = None  # total norm returned by clip_grad_norm_
    nonfinite_layers: Count = 0  # layers whose gradient holds a NaN or an inf
    skipped: bool = False  # the optimizer step was skipped (AMP overflow or a skip_step action)
    # Nothing cleared the gradients after the previous optimizer step (no zero_grad): this
    # step's gradients were added to that step's.
    grads_kept: bool = False
    loss_scale: float | None = None
    lr: Annotated[list[float], Field(max_length=MAX_PARAM_GROUPS)] = []
    momentum: Annotated[list[float | None], Field(max_length=MAX_PARAM_GROUPS)] = []
    weight_decay: Annotated[list[float | None], Field(max_length=MAX_PARAM_GROUPS)] = []
    scalars: Annotated[dict[ScalarName, float], Field(max_length=MAX_SCALARS)] = {}
    # Per-layer detail, aligned with Hello.layers; only on every `every`-th step.
    # A None gradient entry of a layer not in `layer_frozen` means that it got no gradient.
    layer_grad_sq: Annotated[list[float | None], Field(max_length=MAX_LAYERS)] | None = None
    layer_weight_sq: Annotated[list[float | None], Field(max_length=MAX_LAYERS)] | None = None
    layer_update_sq: Annotated[list[float | None], Field(max_length=MAX_LAYERS)] | None = None
    # On detail steps: the indices (into Hello.layers) of the layers none of whose
    # parameters requires a gradient, frozen before or after attach. The probe does not
    # measure them: their entries in the three lists above are None. The collector ignores
    # an index beyond the hello's layers, as it ignores per-layer values beyond them.
    layer_frozen: (
        Annotated[list[Annotated[int, Field(ge=0, lt=MAX_LAYERS)]], Field(max_length=MAX_LAYERS)] | None
    ) = None


class Steps(_Message):
    type: Literal["steps"] = "steps"
    records: Annotated[list[StepRecord], Field(max_length=MAX_RECORDS_PER_BATCH)]
    dropped: Count = 0  # records the probe had to drop since its last report


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    time: float


class Ack(_Message):
    """The probe's answer to an action: applied at `step`, or refused with a reason."""

    type: Literal["ack"] = "ack"
    id: Annotated[str, Field(max_length=64)]
    kind: ActionKind
    step: Count
    outcome: Literal["applied", "refused"]
    reason: Annotated[str, Field(max_length=500)] = ""


class Bye(_Message):
    type: Literal["bye"] = "bye"
    status: Literal["finished", "stopped", "crashed"] = "finished"
    reason: Annotated[str, Field(max_length=500)] = ""
    dropped: Count = 0  # records dropped over the whole run


class LRFind(_Message):
    """The LR range test's curve and verdict (`gradwatch.lr_find`, sent before its run
    detaches): `losses[i]` and `smoothed[i]` at `lrs[i]`; a non-finite loss stopped the test."""

    type: Literal["lr_find"] = "lr_find"
    lrs: Annotated[list[float], Field(min_length=1, max_length=MAX_LR_FIND_POINTS)]
    losses: Annotated[list[float], Field(max_length=MAX_LR_FIND_POINTS)]
    smoothed: Annotated[list[float], Field(max_length=MAX_LR_FIND_POINTS)]
    suggested_lr: float | None = None  # None: the loss did not fall in the range
    alternative_lr: float
    min_loss_lr: float
    reason: Annotated[str, Field(max_length=MAX_TEXT)] = ""
    stop_detail: Annotated[str, Field(max_length=MAX_TEXT)] = ""

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.lrs) == len(self.losses) == len(self.smoothed):
            raise ValueError(f"{len(self.lrs)} lrs, {len(self.losses)} losses and {len(self.smoothed)} smoothed: "
                             "one of each per point")
        return self


AxisValues = Annotated[list[float], Field(min_length=3, max_length=MAX_LANDSCAPE_AXIS)]


class Landscape(_Message):
    """A loss-landscape slice (`run.landscape`): `losses[j][i]` at ``alphas[i]`` along the
    first direction and ``betas[j]`` along the second; one row and no betas for a line."""

    type: Literal["landscape"] = "landscape"
    step: Count  # the run's optimizer steps when it was taken
    alphas: AxisValues
    betas: Annotated[list[float], Field(max_length=MAX_LANDSCAPE_AXIS)] = []
    losses: Annotated[list[Annotated[list[float], Field(max_length=MAX_LANDSCAPE_AXIS)]],
                      Field(min_length=1, max_length=MAX_LANDSCAPE_AXIS)]
    centre: float  # the loss at the current weights, the grid's middle
    directions: Annotated[list[Literal["random", "last_update"]], Field(min_length=1, max_length=2)]
    radius: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _shaped(self) -> Self:
        rows = len(self.betas) if len(self.directions) == 2 else 1
        if len(self.directions) == 2 and len(self.betas) < 3:
            raise ValueError("two directions need at least 3 betas")
        if len(self.directions) == 1 and self.betas:
            raise ValueError("one direction has no betas")
        if len(self.losses) != rows or any(len(row) != len(self.alphas) for row in self.losses):
            raise ValueError(f"losses must be {rows} rows of {len(self.alphas)} (betas x alphas)")
        return self


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    v: int = PROTOCOL_VERSION
    run: RunName
    actions: bool = False  # the collector has an actions policy for this run
    # The collector's HTTP address (its web view; the run's page is http_url/runs/RUN), or
    # "" where it has none to give.
    http_url: Annotated[str, Field(max_length=2048)] = ""


class Received(_Message):
    """Every record up to `step` sent on this connection has been taken in."""

    type: Literal["received"] = "received"
    step: Count


class Action(_Message):
    """An instruction from the collector; the probe applies it at the first boundary >= step."""

    type: Literal["action"] = "action"
    id: Annotated[str, Field(max_length=64)]
    kind: ActionKind
    step: Count
    params: dict[str, float | str | bool] = {}
    reason: Annotated[str, Field(max_length=500)] = ""


ProbeMessage = Annotated[Hello | Steps | Heartbeat | Ack | Bye | LRFind | Landscape, Field(discriminator="type")]
CollectorMessage = Annotated[Welcome | Received | Action, Field(discriminator="type")]

_probe_adapter: TypeAdapter[Hello | Steps | Heartbeat | Ack | Bye | LRFind | Landscape] = TypeAdapter(ProbeMessage)
_collector_adapter: TypeAdapter[Welcome | Received | Action] = TypeAdapter(CollectorMessage)


class ProtocolError(ValueError):
    """A message that cannot be accepted; `code` is the websocket close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _printable(text: str, limit: int = 200) -> str:
    """Keys and tags a peer chose can appear in an error: escape all but printable ASCII and
    bound the length, so that a reason can never forge a log line or flood one."""
    text = re.sub(r"[^\x20-\x7e]", lambda m: m.group().encode("unicode_escape").decode(), text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: ValidationError) -> str:
    first = err.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid {_printable(where)}: {_printable(first['msg'])}{more}"


def decode_probe_message(data: str | bytes) -> Hello | Steps | Heartbeat | Ack | Bye | LRFind | Landscape:
    """Parse and validate one frame from a probe; raise ProtocolError with a clear reason."""
    try:
        return _probe_adapter.validate_json(data)
    except ValidationError as err:
        raise ProtocolError(CLOSE_INVALID_MESSAGE, _describe(err)) from None


def decode_collector_message(data: str | bytes) -> Welcome | Received | Action:
    try:
        return _collector_adapter.validate_json(data)
    except ValidationError as err:
        raise ProtocolError(CLOSE_INVALID_MESSAGE, _describe(err)) from None


def check_version(hello: Hello) -> None:
    if hello.v != PROTOCOL_VERSION:
        raise ProtocolError(
            CLOSE_UNSUPPORTED_VERSION,
            f"protocol version {hello.v} is not supported; this collector speaks {PROTOCOL_VERSION}"
            " (upgrade the older of probe and collector)",
        )


def encode(message: _Message) -> str:
    return message.model_dump_json(exclude_defaults=False)


# ---- the probe's side of `steps`: records as JSON text --------------------------------------

DETAIL_FIELDS = ("layer_grad_sq", "layer_weight_sq", "layer_update_sq", "layer_frozen")

_nonfinite_json = json.JSONEncoder(separators=(",", ":"), allow_nan=True, check_circular=False).encode


def dumps(obj: Any, finite: bool = True) -> str:
    """Compact JSON text of plain data (dicts, lists, str, int, float, bool, None). orjson
    writes a non-finite float as null, so an object holding one (`finite=False`) goes
    through the standard library instead, which writes the ``NaN`` / ``Infinity``
    constants the protocol carries: slower (a float costs ~0.5 us there), and rare."""
    return orjson.dumps(obj).decode() if finite else _nonfinite_json(obj)


@dataclass(frozen=True, slots=True)
class EncodedRecord:
    """A `StepRecord` as the probe holds it: its JSON text, written once and sent as is
    however often it is sent again. `cut` is where its per-layer detail begins (0: it has
    none), so the detail can be let go without decoding anything."""

    step: int
    text: str
    cut: int = 0

    @property
    def detail(self) -> bool:
        return self.cut > 0

    def without_detail(self) -> EncodedRecord:
        return EncodedRecord(self.step, self.text[: self.cut] + "}") if self.cut else self

    @classmethod
    def build(cls, fields: dict[str, Any], detail: dict[str, Any] | None, finite: bool) -> EncodedRecord:
        """`fields` (holding ``step``) and, apart, the per-layer `detail` (`DETAIL_FIELDS`),
        each as `StepRecord` takes them; `finite`: no float among them is NaN or infinite."""
        head = dumps(fields, finite)
        if not detail:
            return cls(fields["step"], head)
        return cls(fields["step"], head[:-1] + "," + dumps(detail, finite)[1:], len(head) - 1)

    @classmethod
    def of(cls, record: StepRecord) -> EncodedRecord:
        """A validated record (a spool line being replayed), encoded for the outbox."""
        head = record.model_dump_json(exclude=set(DETAIL_FIELDS))
        detail = record.model_dump_json(include=set(DETAIL_FIELDS), exclude_none=True)
        if detail == "{}":
            return cls(record.step, head)
        return cls(record.step, head[:-1] + "," + detail[1:], len(head) - 1)


def encode_steps(records: Iterable[EncodedRecord], dropped: int = 0) -> str:
    """The ``steps`` frame of `records`: what `Steps(records=..., dropped=...)` reads back."""
    return '{"type":"steps","records":[' + ",".join(r.text for r in records) + f'],"dropped":{dropped:d}}}'
