"""Synthetic training traces for the detector tests: the shapes real runs have, seeded.

Every generator returns plain per-step lists; `make_trace` zips them into Observations
the way the collector would (per-layer detail only every `every` steps).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gradwatch.collector.detectors import Observation

NAN = float("nan")
INF = float("inf")


@dataclass(frozen=True)
class LayerDetail:
    """One step's per-layer values, aligned with `names` (input side first), and which
    layers the probe reports frozen (indices into `names`)."""

    names: tuple[str, ...]
    grad: tuple[float | None, ...]
    weight: tuple[float, ...]
    update: tuple[float, ...]
    frozen: frozenset[int] = frozenset()


DetailFn = Callable[[int], LayerDetail]


def make_trace(
    loss: Sequence[float | None],
    *,
    grad_norm: Sequence[float | None] | None = None,
    grad_norm_preclip: Sequence[float | None] | None = None,
    lr: Sequence[float] | None = None,
    loss_scale: Sequence[float] | None = None,
    skipped: Sequence[bool] | None = None,
    val: Mapping[int, float] | None = None,
    detail: DetailFn | None = None,
    every: int = 10,
) -> list[Observation]:
    trace = []
    for step in range(len(loss)):
        skip = bool(skipped[step]) if skipped else False
        layers = detail(step) if detail else None
        if layers and skip:  # an overflowed step: inf gradients, and nothing moved
            n = len(layers.names)
            layers = LayerDetail(layers.names, (INF,) * n, layers.weight, (0.0,) * n, layers.frozen)
        with_detail = layers is not None and step % every == 0
        norm = grad_norm[step] if grad_norm else None
        trace.append(
            Observation(
                step=step,
                loss=loss[step],
                grad_norm=INF if skip else norm,  # an AMP overflow is what made the step skip
                grad_norm_preclip=grad_norm_preclip[step] if grad_norm_preclip else None,
                nonfinite_layers=1 if skip else 0,
                skipped=skip,
                loss_scale=loss_scale[step] if loss_scale else None,
                lr=(lr[step],) if lr else (),
                scalars={"val_loss": val[step]} if val and step in val else {},
                layers=layers.names if layers else (),
                layer_grad_norm=layers.grad if with_detail and layers else None,
                layer_weight_norm=layers.weight if with_detail and layers else None,
                layer_update_ratio=layers.update if with_detail and layers else None,
                layer_frozen=layers.frozen if with_detail and layers else frozenset(),
            )
        )
    return trace


def noisy_decay(
    steps: int, start: float, end: float, tau: float, noise: float = 0.05, seed: int = 0
) -> list[float]:
    """Exponential decay from `start` towards `end` with multiplicative log-normal noise."""
    rng = random.Random(seed)
    return [
        (end + (start - end) * math.exp(-t / tau)) * math.exp(noise * rng.gauss(0, 1) - noise**2 / 2)
        for t in range(steps)
    ]


def hard_example_losses(steps: int, seed: int = 0) -> list[float]:
    """A small-batch classifier late in training: easy examples cost ~0, and each batch holds
    a Poisson number of misclassified ones (a heavy right tail, no trend)."""
    rng = random.Random(seed)

    def poisson(mean: float) -> int:
        threshold, k, p = math.exp(-mean), 0, rng.random()
        while p > threshold:
            k, p = k + 1, p * rng.random()
        return k

    return [0.01 + 0.06 * poisson(0.64) for _ in range(steps)]


def lognormal_noise(steps: int, level: float, sigma: float = 0.2, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level * math.exp(sigma * rng.gauss(0, 1)) for _ in range(steps)]


def warmup_cosine_lr(steps: int, peak: float, warmup: int) -> list[float]:
    """Linear warm-up from 0, then cosine decay to 0 (the common transformer schedule)."""
    return [
        peak * t / warmup
        if t < warmup
        else peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))
        for t in range(steps)
    ]


def grad_scaler(
    steps: int,
    headroom: float = 2.0**13,
    overflow_rate: float = 1 / 800,
    growth_interval: int = 2000,
    forced: Callable[[int], bool] = lambda step: False,
    seed: int = 0,
) -> tuple[list[float], list[bool]]:
    """torch.amp.GradScaler's dynamics: start at 65536, halve and skip on overflow (always
    above `headroom` or where `forced`, else at random with `overflow_rate` at the headroom,
    rarer at lower scales), double after `growth_interval` clean steps. Returns each step's
    scale and whether it was skipped."""
    rng = random.Random(seed)
    scale, clean = 65536.0, 0
    scales, skips = [], []
    for step in range(steps):
        overflow = scale > headroom or forced(step) or rng.random() < overflow_rate * scale / headroom
        scales.append(scale)
        skips.append(overflow)
        if overflow:
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean == growth_interval:
                scale, clean = scale * 2, 0
    return scales, skips


def healthy_layers(names: Sequence[str], seed: int = 0, grad: float = 0.3, update: float = 1e-3) -> DetailFn:
    """Per-layer detail of a healthy network: gradients within a factor of a few of each other,
    weight norms of a few units, update ratios around `update`."""
    rng = random.Random(seed)
    names = tuple(names)

    def detail(step: int) -> LayerDetail:
        return LayerDetail(
            names,
            tuple(grad * math.exp(0.3 * rng.gauss(0, 1)) * (1 + 0.2 * i) for i in range(len(names))),
            tuple(3.0 + 0.1 * i for i in range(len(names))),
            tuple(update * math.exp(0.3 * rng.gauss(0, 1)) for _ in names),
        )

    return detail


def mlp_names(depth: int) -> list[str]:
    return [f"{i}.{p}" for i in range(depth) for p in ("weight", "bias")]


_KEEP = object()


def with_layer(
    detail: DetailFn,
    name: str,
    since: int,
    until: int | None = None,
    *,
    grad: float | None | object = _KEEP,
    update: float | None | object = _KEEP,
    frozen: bool = False,
) -> DetailFn:
    """`detail` with one layer's gradient and/or update ratio replaced on steps in
    [since, until), and the layer reported frozen there if `frozen`: the way a pathology
    (or a fine-tune's freezing) hits a single layer."""

    def patched(step: int) -> LayerDetail:
        d = detail(step)
        if step < since or (until is not None and step >= until):
            return d
        i = d.names.index(name)
        grads, updates = list(d.grad), list(d.update)
        if grad is not _KEEP:
            grads[i] = grad  # type: ignore[assignment]
        if update is not _KEEP:
            updates[i] = update  # type: ignore[assignment]
        return LayerDetail(d.names, tuple(grads), d.weight, tuple(updates), d.frozen | {i} if frozen else d.frozen)

    return patched


def frozen_from(detail: DetailFn, names: Sequence[str], since: int) -> DetailFn:
    """`detail` with `names` frozen from `since` on, as the probe reports them: listed in
    `layer_frozen`, with no gradient and no update."""
    for name in names:
        detail = with_layer(detail, name, since, grad=None, update=None, frozen=True)
    return detail


def splice(base: Sequence[float | None], start: int, values: Sequence[float | None]) -> list[float | None]:
    """`base` with `values` written over it from `start`."""
    out = list(base)
    out[start : start + len(values)] = values
    return out
