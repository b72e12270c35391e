"""Merging the records of one step from the ranks of a run into the observation the
detectors see. With `hello.sharded`, squared norms are partial and summed over ranks;
otherwise every rank saw the same gradients and they are read from the lowest rank. Which
layers are frozen is read from the lowest rank either way."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from gradwatch.collector.detectors.base import Observation
from gradwatch.protocol import StepRecord


@dataclass
class MergedStep:
    """One merged step: what the detectors see, plus what only the metrics need."""

    observation: Observation
    momentum: tuple[float | None, ...] = ()
    weight_decay: tuple[float | None, ...] = ()



def merge_step(step: int, by_rank: Mapping[int, StepRecord], sharded: bool, layers: tuple[str, ...]) -> MergedStep:
    """Merge the records of one step from several ranks into one observation."""
    ranks = sorted(by_rank)
    records = [by_rank[r] for r in ranks]
    first = records[0]
    if sharded:
        grad_sq = _sum_scalars(r.grad_norm_sq for r in records)
        layer_grad_sq = _sum_layers([r.layer_grad_sq for r in records])
        layer_weight_sq = _sum_layers([r.layer_weight_sq for r in records])
        layer_update_sq = _sum_layers([r.layer_update_sq for r in records])
    else:
        grad_sq = first.grad_norm_sq
        layer_grad_sq, layer_weight_sq, layer_update_sq = (
            first.layer_grad_sq, first.layer_weight_sq, first.layer_update_sq
        )
    losses = [r.loss for r in records if r.loss is not None]
    scalars: dict[str, float] = {}
    for record in reversed(records):  # the lowest rank wins a name several ranks log
        scalars.update(record.scalars)
    n_layers = len(layers)
    layer_weight_norm = _layer_roots(layer_weight_sq, n_layers)
    observation = Observation(
        step=step,
        time=max(r.time for r in records),
        loss=sum(losses) / len(losses) if losses else None,
        grad_norm=_root(grad_sq),
        grad_norm_preclip=first.grad_norm_preclip,
        nonfinite_layers=max(r.nonfinite_layers for r in records),
        skipped=any(r.skipped for r in records),
        grads_kept=any(r.grads_kept for r in records),
        loss_scale=first.loss_scale,
        lr=tuple(first.lr),
        scalars=scalars,
        layers=layers,
        layer_grad_norm=_layer_roots(layer_grad_sq, n_layers),
        layer_weight_norm=layer_weight_norm,
        layer_update_ratio=_ratios(layer_update_sq, layer_weight_sq, layer_weight_norm, n_layers),
        # frozen is a fact of the model, not a partial value: the lowest rank's word holds
        layer_frozen=frozenset(i for i in first.layer_frozen if i < n_layers) if first.layer_frozen else frozenset(),
    )
    return MergedStep(observation, tuple(first.momentum), tuple(first.weight_decay))


def is_nonfinite(obs: Observation) -> bool:
    values = (obs.loss, obs.grad_norm)
    return obs.nonfinite_layers > 0 or any(v is not None and not math.isfinite(v) for v in values)


def _root(squared: float | None) -> float | None:
    if squared is None:
        return None
    if math.isnan(squared) or squared < 0:
        return math.nan  # a negative square is a probe bug; show it, do not crash on it
    return math.sqrt(squared)


def _sum_scalars(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _sum_layers(per_rank: Sequence[Sequence[float | None] | None]) -> list[float | None] | None:
    """Element-wise sum over ranks; a layer is None only if no rank has a value for it."""
    present = [v for v in per_rank if v is not None]
    if not present:
        return None
    width = max(len(v) for v in present)
    sums: list[float | None] = []
    for i in range(width):
        values = [v[i] for v in present if i < len(v) and v[i] is not None]
        sums.append(sum(values) if values else None)  # type: ignore[arg-type]
    return sums


def _aligned(
    values: Sequence[float | None] | None, n: int, f: Callable[[float | None], float | None]
) -> tuple[float | None, ...] | None:
    """Per-layer values aligned with hello.layers: a probe sending the wrong length is padded
    with None / truncated rather than misattributing values to layers."""
    if values is None:
        return None
    out = [f(v) for v in values[:n]]
    return tuple(out + [None] * (n - len(out)))


def _layer_roots(squares: Sequence[float | None] | None, n: int) -> tuple[float | None, ...] | None:
    """`_aligned(squares, n, _root)`, with a fast path for the usual all-valid vector: this
    runs for every layer of every detail step and dominated ingest time."""
    if squares is not None and len(squares) == n:
        try:
            return tuple(map(math.sqrt, squares))  # type: ignore[arg-type]
        except (TypeError, ValueError):  # a None or a negative: the careful path below
            pass
    return _aligned(squares, n, _root)


def _ratios(
    update_sq: Sequence[float] | None,
    weight_sq: Sequence[float] | None,
    weight_norm: Sequence[float | None] | None,
    n: int,
) -> tuple[float | None, ...] | None:
    if update_sq is None or weight_sq is None:
        return None
    if len(update_sq) == n and weight_norm is not None:
        try:  # the usual all-valid case in C (see _layer_roots), from the weight norms at hand
            return tuple(map(operator.truediv, map(math.sqrt, update_sq), weight_norm))  # type: ignore[arg-type]
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    ratios: list[float | None] = []
    for u, w in zip(update_sq[:n], weight_sq[:n]):
        du, nw = _root(u), _root(w)
        if du is None or nw is None:
            ratios.append(None)
        elif nw == 0:
            ratios.append(0.0 if du == 0 else math.inf)
        else:
            ratios.append(du / nw)
    return tuple(ratios + [None] * (n - len(ratios)))
