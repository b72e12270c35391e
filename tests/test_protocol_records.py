"""The probe's records as JSON text: what the probe writes without building a model is what
the collector's models read, value for value.

`build_record` (probe/record.py) writes a step's record with orjson, or with the standard
library when a float is NaN or infinite; `EncodedRecord` and `encode_steps` (protocol.py)
hold and batch that text. Each is checked against the pydantic models the collector
validates with: the reference below is the record as it was built before, as a model.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import protocol
from gradwatch.probe.measure import Layout
from gradwatch.probe.outbox import Batch, encode_frame
from gradwatch.probe.record import StepMeta, build_record, to_float
from gradwatch.protocol import (
    EncodedRecord,
    StepRecord,
    Steps,
    decode_probe_message,
    dumps,
    encode,
    encode_steps,
)


def reference(meta: StepMeta, values: list[float], layout: Layout) -> StepRecord:
    """The record as a validated model, the way the probe built it before it wrote text."""
    grad_sq = values[layout.grad()]
    layer_grad_sq = [v if i in meta.present else None for i, v in enumerate(grad_sq)]

    def unmeasured(part: list[float]) -> list[float | None]:
        return [None if i in meta.frozen else v for i, v in enumerate(part)]

    found_inf = meta.has_found_inf and values[layout.extra("found_inf")] > 0
    return StepRecord(
        step=meta.step,
        time=meta.time,
        step_time=meta.step_time,
        loss=values[layout.extra("loss")] if meta.has_loss else None,
        grad_norm_sq=sum(v for v in layer_grad_sq if v is not None) if meta.present else None,
        grad_norm_preclip=values[layout.extra("preclip_norm")] if meta.has_preclip else None,
        nonfinite_layers=sum(1 for v in layer_grad_sq if v is not None and not math.isfinite(v)),
        skipped=meta.skipped or found_inf or values[layout.extra("skipped")] > 0,
        grads_kept=meta.grads_kept,
        loss_scale=values[layout.extra("loss_scale")] if meta.has_scale else None,
        lr=[to_float(v) or 0.0 for v in meta.lr],
        momentum=[to_float(v) for v in meta.momentum],
        weight_decay=[to_float(v) for v in meta.weight_decay],
        scalars={k: v for k, v in ((k, to_float(v)) for k, v in meta.scalars.items()) if v is not None},
        layer_grad_sq=layer_grad_sq if meta.detail else None,
        layer_weight_sq=unmeasured(values[layout.weight()]) if meta.detail else None,
        layer_update_sq=unmeasured(values[layout.update()]) if meta.with_updates else None,
        layer_frozen=list(meta.frozen) if meta.detail else None,
    )


def decoded(record: EncodedRecord) -> StepRecord:
    message = decode_probe_message(encode_steps([record]))
    assert isinstance(message, Steps)
    [out] = message.records
    return out


def same(a: StepRecord, b: StepRecord) -> bool:
    return encode(a) == encode(b)  # NaN != NaN: compare the models' own text


# ---- any step: the text reads back as the model ---------------------------------------------

FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 5e-324, math.inf, -math.inf, math.nan]),
)
MAYBE = st.one_of(st.none(), FLOATS)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,10}", fullmatch=True)


@st.composite
def steps(draw: st.DrawFn) -> tuple[StepMeta, list[float], Layout]:
    layers = draw(st.integers(1, 6))
    layout = Layout(layers)
    values = draw(st.lists(FLOATS, min_size=layout.length, max_size=layout.length))
    values[layout.extra("found_inf")] = draw(st.sampled_from([0.0, 1.0]))
    values[layout.extra("skipped")] = draw(st.sampled_from([0.0, 1.0]))
    detail = draw(st.booleans())
    groups = draw(st.integers(0, 3))
    meta = StepMeta(
        step=draw(st.integers(1, protocol.MAX_COUNT)),
        time=draw(st.floats(0, 2e9)),
        step_time=draw(st.one_of(st.none(), st.floats(0, 1e3))),
        detail=detail,
        with_updates=detail and draw(st.booleans()),
        present=draw(st.one_of(st.just(set(range(layers))), st.sets(st.integers(0, layers - 1)))),
        frozen=tuple(draw(st.sets(st.integers(0, layers - 1)))) if detail else (),
        skipped=draw(st.booleans()),
        grads_kept=draw(st.booleans()),
        has_loss=draw(st.booleans()),
        has_scale=draw(st.booleans()),
        has_preclip=draw(st.booleans()),
        has_found_inf=draw(st.booleans()),
        lr=draw(st.lists(st.one_of(FLOATS, FLOATS.map(lambda v: torch.tensor(v))), min_size=groups, max_size=groups)),
        momentum=draw(st.lists(MAYBE, min_size=groups, max_size=groups)),
        weight_decay=draw(st.lists(MAYBE, min_size=groups, max_size=groups)),
        scalars=draw(st.dictionaries(NAMES, st.one_of(FLOATS, st.integers(-10, 10), st.just("text"), st.none(),
                                                      FLOATS.map(lambda v: torch.tensor([v]))), max_size=4)),
    )
    return meta, values, layout


@settings(max_examples=400, deadline=None)
@given(step=steps())
def test_any_step_reads_back_as_the_model_built_it(step: tuple[StepMeta, list[float], Layout]) -> None:
    meta, values, layout = step
    record = build_record(meta, list(values), layout)
    expected = reference(meta, list(values), layout)
    assert same(decoded(record), expected)
    assert record.step == meta.step and record.detail == meta.detail
    if record.detail:  # shedding the detail leaves the record as it was without it
        stripped = expected.model_copy(update=dict.fromkeys(protocol.DETAIL_FIELDS))
        assert same(decoded(record.without_detail()), stripped)


# ---- tables -----------------------------------------------------------------------------------

DUMPS = [  # (value, its text)
    ({"a": 1.5, "b": None, "c": [1, True]}, '{"a":1.5,"b":null,"c":[1,true]}'),
    ({"loss": math.nan}, '{"loss":NaN}'),
    ([math.inf, -math.inf, 2.0], "[Infinity,-Infinity,2.0]"),
]


@pytest.mark.parametrize("value, text", DUMPS)
def test_dumps_writes_the_constants_the_protocol_carries(value: Any, text: str) -> None:
    finite = not any(isinstance(v, float) and not math.isfinite(v)
                     for v in (value.values() if isinstance(value, dict) else value))
    assert dumps(value, finite) == text


RECORDS = [  # a model, as the collector would read it back through EncodedRecord.of
    StepRecord(step=1, time=2.0),
    StepRecord(step=2, time=2.0, loss=math.nan, grad_norm_sq=math.inf, lr=[1e-3], momentum=[None],
               scalars={"val_loss": -math.inf}),
    StepRecord(step=3, time=2.0, layer_grad_sq=[1.0, None], layer_weight_sq=[2.0, None], layer_frozen=[1]),
    StepRecord(step=4, time=2.0, layer_update_sq=[1.0]),  # detail without layer_grad_sq is still detail
]


@pytest.mark.parametrize("model", RECORDS, ids=lambda r: f"step {r.step}")
def test_a_replayed_record_keeps_its_values_and_its_detail(model: StepRecord) -> None:
    record = EncodedRecord.of(model)
    assert same(decoded(record), model)
    has_detail = any(getattr(model, f) is not None for f in protocol.DETAIL_FIELDS)
    assert record.detail == has_detail
    assert same(decoded(record.without_detail()), model.model_copy(update=dict.fromkeys(protocol.DETAIL_FIELDS)))
    assert not record.without_detail().detail


def test_a_batch_is_the_steps_frame_of_its_records() -> None:
    records = tuple(EncodedRecord.of(r) for r in RECORDS)
    for batch in (Batch(records, dropped=3), Batch((), dropped=1), Batch(records[:1])):
        message = decode_probe_message(encode_frame(batch))
        assert isinstance(message, Steps) and message.dropped == batch.dropped
        assert [encode(r) for r in message.records] == [encode(decoded(r)) for r in batch.records]


def test_other_frames_are_encoded_by_their_models() -> None:
    ack = protocol.Ack(id="a", kind="stop", step=3, outcome="applied")
    assert encode_frame(ack) == encode(ack)


BAD = [  # what the collector would refuse never leaves the probe: build_record raises, the step is dropped
    ("a logged name that is not a scalar name", {"scalars": {"1st": 1.0}}, "not a scalar name"),
    ("a name longer than a scalar name", {"scalars": {"a" * 65: 1.0}}, "not a scalar name"),
    ("more param groups than the protocol takes", {"lr": [0.1] * (protocol.MAX_PARAM_GROUPS + 1)}, "param groups"),
]


@pytest.mark.parametrize("change, says", [(c, s) for _, c, s in BAD], ids=[n for n, _, _ in BAD])
def test_what_the_collector_would_refuse_is_not_written(change: dict[str, Any], says: str) -> None:
    layout = Layout(2)
    meta = StepMeta(step=1, time=1.0, step_time=None, detail=False, with_updates=False, present={0, 1}, **change)
    with pytest.raises(ValueError, match=says):
        build_record(meta, [0.0] * layout.length, layout)
