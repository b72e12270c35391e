"""Detector tables: traces in, alerts out.

Every trace runs through the full default detector set, as the collector would. Healthy
traces must raise nothing at all. A pathology trace must raise exactly the episodes listed
(kind, layer, the step window it fires in and, where it ends, resolves in), and nothing else.
Fire windows are [onset, onset + the latency documented in docs/detectors.md].
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gradwatch.collector.detectors import (
    DETECTORS,
    AlertEvent,
    DetectorsConfig,
    Observation,
    build_detectors,
)
from gradwatch.protocol import ALERT_KINDS
from tests.detector_traces import (
    NAN,
    LayerDetail,
    frozen_from,
    grad_scaler,
    hard_example_losses,
    healthy_layers,
    lognormal_noise,
    make_trace,
    mlp_names,
    noisy_decay,
    splice,
    warmup_cosine_lr,
    with_layer,
)


def run(trace: list[Observation], config: DetectorsConfig | None = None) -> list[AlertEvent]:
    detectors = build_detectors(config or DetectorsConfig())
    return [event for obs in trace for detector in detectors for event in detector.observe(obs)]


def describe(events: list[AlertEvent]) -> list[str]:
    return [f"{'resolve' if e.resolved else 'FIRE'} {e.kind}[{e.layer}] @{e.step}: {e.message}" for e in events]


# ---------------------------------------------------------------------------------------
# Healthy traces: silence from every detector.


def tiny_losses() -> list[Observation]:
    """A loss near 1e-6 decreasing noisily, with tiny gradients and updates (SGD on a nearly
    solved problem) and a val loss as tiny: relative-only rules fire here."""
    steps = 2000
    loss = noisy_decay(steps, 2e-6, 5e-7, 800, noise=0.3, seed=1)
    loss = splice(loss, 1200, [x * 3 for x in loss[1200:1203]])  # a 3x "spike" of 4e-6
    val = {t: v for t, v in zip(range(0, steps, 50), noisy_decay(steps // 50, 2e-6, 6e-7, 16, 0.3, seed=2))}
    return make_trace(
        loss,
        grad_norm=lognormal_noise(steps, 1e-4, 0.3, seed=3),
        val=val,
        detail=healthy_layers(mlp_names(4), seed=4, grad=1e-5, update=1e-6),
    )


def lr_warmup() -> list[Observation]:
    """A 1000-step linear LR warm-up during which the loss barely moves, then cosine decay."""
    steps = 3000
    lr = warmup_cosine_lr(steps, 1e-3, 1000)
    noise = lognormal_noise(steps, 1.0, 0.03, seed=5)
    loss = [(0.9 + 1.4 * math.exp(-max(0, t - 600) / 800)) * noise[t] for t in range(steps)]
    rising = lognormal_noise(steps, 1.0, 0.2, seed=6)
    grad = [g * (0.5 + 1.5 * min(1.0, t / 1000)) for t, g in enumerate(rising)]
    return make_trace(loss, grad_norm=grad, lr=lr, detail=healthy_layers(mlp_names(6), seed=7))


def loss_scale_growth() -> list[Observation]:
    """GradScaler finding its scale, growing it every 2000 clean steps, overflowing back, and
    overflowing now and then at random: every skip is healthy."""
    steps = 6000
    scales, skipped = grad_scaler(steps, seed=8)
    return make_trace(
        noisy_decay(steps, 2.0, 0.5, 1500, seed=9),
        grad_norm=lognormal_noise(steps, 1.0, 0.2, seed=10),
        loss_scale=scales,
        skipped=skipped,
        detail=healthy_layers(mlp_names(3), seed=11),
    )


def noisy_improving() -> list[Observation]:
    """A loss with 25% noise that improves, clipped gradients, val every 50 steps a constant
    gap above the training loss."""
    steps = 3000
    preclip = lognormal_noise(steps, 1.5, 0.4, seed=12)
    val = dict(zip(range(0, steps, 50), noisy_decay(steps // 50, 3.4, 0.6, 20, 0.03, seed=13)))
    return make_trace(
        noisy_decay(steps, 3.0, 0.3, 1000, noise=0.25, seed=14),
        grad_norm=[min(g, 1.0) for g in preclip],
        grad_norm_preclip=preclip,
        val=val,
    )


def hard_examples() -> list[Observation]:
    """A small-batch classifier: fast convergence, then a heavy-tailed loss made of a Poisson
    number of misclassified examples per batch, and gradients to match."""
    steps = 2000
    loss = [h + 2.3 * math.exp(-t / 150) for t, h in enumerate(hard_example_losses(steps, seed=15))]
    # most batches are solved (tiny gradient), each hard example adds a large one
    return make_trace(loss, grad_norm=[0.01 + 1.5 * (x - 0.01) for x in loss])


def fine_tune(every: int = 10) -> Callable[[], list[Observation]]:
    """A normal fine-tune: short warm-up, linear decay, small updates, val tracking train."""

    def build() -> list[Observation]:
        steps = 800
        lr = [2e-5 * min(1.0, t / 50) * (1 - t / steps) for t in range(steps)]
        val = dict(zip(range(0, steps, 50), noisy_decay(steps // 50, 1.25, 0.55, 8, 0.01, seed=16)))
        grad = [g * (1 - 0.5 * t / steps) for t, g in enumerate(lognormal_noise(steps, 2.0, 0.3, seed=17))]
        return make_trace(
            noisy_decay(steps, 1.2, 0.5, 400, noise=0.08, seed=18),
            grad_norm=grad,
            lr=lr,
            val=val,
            detail=healthy_layers(mlp_names(6), seed=19, update=1e-4),
            every=every,
        )

    return build


def frozen_then_unfrozen() -> list[Observation]:
    """Only the head trains for 300 steps (the backbone is reported frozen: no gradient, no
    update), then the backbone joins: the gradient norm grows, the loss drops faster."""
    steps = 1000
    full = healthy_layers(mlp_names(4) + ["head.weight", "head.bias"], seed=21, update=2e-3)
    head = frozen_from(full, mlp_names(4), 0)
    loss = [
        (0.8 + 0.7 * math.exp(-t / 1000) if t < 300 else 0.3 + 0.9 * math.exp(-(t - 300) / 250)) * n
        for t, n in enumerate(lognormal_noise(steps, 1.0, 0.05, seed=22))
    ]
    grad = [g * (1.0 if t < 300 else 1.8) for t, g in enumerate(lognormal_noise(steps, 1.0, 0.2, seed=23))]
    return make_trace(loss, grad_norm=grad, detail=lambda t: head(t) if t < 300 else full(t))


def zero_init_biases() -> list[Observation]:
    """Biases that start at zero and stay small move by a large fraction of themselves every
    step: not an update_ratio finding."""
    steps = 600
    detail = healthy_layers(mlp_names(3), seed=24)
    for name in ("0.bias", "1.bias", "2.bias"):
        detail = with_layer(detail, name, 0, update=0.8)
    loss, grad = noisy_decay(steps, 1.0, 0.2, 200, seed=25), lognormal_noise(steps, 1.0, seed=26)
    return make_trace(loss, grad_norm=grad, detail=detail)


def clipped_rnn_learning() -> list[Observation]:
    """A clipped recurrent net starting to learn: its pre-clip norm grows 30x over 150 steps
    while the loss falls; clipping holds the applied norm at 0.25."""
    steps = 600
    preclip = [g * (1 + 29 * min(t, 150) / 150) for t, g in enumerate(lognormal_noise(steps, 0.1, 0.3, seed=40))]
    clipped = [min(g, 0.25) for g in preclip]
    return make_trace(noisy_decay(steps, 4.2, 1.5, 120, noise=0.05, seed=41), grad_norm=clipped,
                      grad_norm_preclip=preclip)


def early_bump() -> list[Observation]:
    """SGD without warm-up: the loss rises 12% over its first steps, then falls (healthy)."""
    steps = 400
    bump = [1 + 0.12 * math.sin(math.pi * min(t, 20) / 20) for t in range(steps)]
    loss = [b * x for b, x in zip(bump, noisy_decay(steps, 2.3, 0.4, 80, noise=0.05, seed=42))]
    return make_trace(loss, grad_norm=lognormal_noise(steps, 1.0, 0.3, seed=43))


def layer_not_updated_by_rounding() -> list[Observation]:
    """Vanishing-size gradients whose float32 updates round away: no update, no real gradient."""
    detail = with_layer(healthy_layers(mlp_names(3), seed=44), "0.weight", 0, grad=1e-9, update=0.0)
    return make_trace(base_loss(300), grad_norm=base_grad(300), detail=detail)


def attention_key_bias() -> list[Observation]:
    """A BERT-like layer: the key projection's bias gets an exactly zero gradient (softmax
    ignores a shift shared by all keys) and never moves."""
    names = ["attention.query.weight", "attention.query.bias", "attention.key.weight", "attention.key.bias"]
    detail = with_layer(healthy_layers(names, seed=48), "attention.key.bias", 0, grad=0.0, update=0.0)
    return make_trace(base_loss(400), grad_norm=base_grad(400), detail=detail, lr=[1e-3] * 400)


HEALTHY: dict[str, Callable[[], list[Observation]]] = {
    "tiny losses near zero": tiny_losses,
    "LR warm-up": lr_warmup,
    "loss-scale growth": loss_scale_growth,
    "noisy but improving, clipped": noisy_improving,
    "heavy-tailed minibatch losses": hard_examples,
    "normal fine-tune, detail every 10": fine_tune(every=10),
    "normal fine-tune, detail every step": fine_tune(every=1),
    "frozen then unfrozen layers": frozen_then_unfrozen,
    "zero-initialised biases": zero_init_biases,
    "clipped recurrent net whose pre-clip norm grows as it learns": clipped_rnn_learning,
    "loss bump in the first steps without warm-up": early_bump,
    "a layer whose tiny updates round away": layer_not_updated_by_rounding,
    "an attention key bias, which gets no gradient by design": attention_key_bias,
}


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_trace_stays_silent(name: str) -> None:
    events = run(HEALTHY[name]())
    assert events == [], "\n".join(describe(events))


# ---------------------------------------------------------------------------------------
# Pathologies: the right kind, inside its latency, once per episode, and nothing else.


@dataclass(frozen=True)
class Episode:
    kind: str
    fires: tuple[int, int]  # inclusive step window
    resolves: tuple[int, int] | None = None  # None: still active at the end of the trace
    layer: str | None = None


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], list[Observation]]
    episodes: tuple[Episode, ...]


def base_loss(steps: int, seed: int = 30) -> list[float | None]:
    return list(noisy_decay(steps, 2.0, 0.5, 500, noise=0.05, seed=seed))


def base_grad(steps: int, seed: int = 31) -> list[float | None]:
    return list(lognormal_noise(steps, 1.0, 0.2, seed=seed))


def nan_from(step: int, steps: int = 1000) -> list[Observation]:
    loss = splice(base_loss(steps), step, [NAN] * (steps - step))
    grad = splice(base_grad(steps), step, [NAN] * (steps - step))
    return make_trace(loss, grad_norm=grad)


def nan_burst_then_healthy() -> list[Observation]:
    return make_trace(splice(base_loss(1500), 500, [NAN] * 3), grad_norm=base_grad(1500))


def inf_grad_without_scaler() -> list[Observation]:
    return make_trace(base_loss(1000), grad_norm=splice(base_grad(1000), 700, [math.inf] * 3))


def exploding_growth() -> list[Observation]:
    steps = 900
    grad = splice(base_grad(steps), 800, [1.6 ** (t + 1) for t in range(30)] + [NAN] * 70)
    return make_trace(splice(base_loss(steps), 830, [NAN] * 70), grad_norm=grad)


def exploding_hidden_by_clipping() -> list[Observation]:
    preclip = splice(base_grad(1200), 700, [40 * g for g in base_grad(60, seed=32)])
    clipped = [min(g, 1.0) for g in preclip]  # type: ignore[type-var]
    return make_trace(base_loss(1200), grad_norm=clipped, grad_norm_preclip=preclip)


def vanishing_layers(names: list[str], depth_factor: float) -> Callable[[int], LayerDetail]:
    """Gradients shrinking by `depth_factor` per layer away from the output."""
    healthy = healthy_layers(names, seed=33)

    def detail(step: int) -> LayerDetail:
        d = healthy(step)
        n = len(names)
        depth = [(n - 1 - i) // 2 for i in range(n)]  # weight and bias share a depth
        grads = tuple(g * depth_factor**k for g, k in zip(d.grad, depth))  # type: ignore[operator]
        return LayerDetail(d.names, grads, d.weight, d.update)

    return detail


def vanishing_from_start() -> list[Observation]:
    steps = 1000
    return make_trace(noisy_decay(steps, 2.3, 1.2, 1000, seed=34), grad_norm=base_grad(steps),
                      detail=vanishing_layers(mlp_names(10), 0.1))


def vanishing_mid_run() -> list[Observation]:
    steps = 1200
    healthy, sick = healthy_layers(mlp_names(8), seed=35), vanishing_layers(mlp_names(8), 0.1)
    return make_trace(base_loss(steps), grad_norm=base_grad(steps),
                      detail=lambda t: sick(t) if 500 <= t < 800 else healthy(t))


def dead_layer(
    every: int, grad: float | None, since: int, until: int | None = None
) -> Callable[[], list[Observation]]:
    """Layer 1.weight gets `grad` (None: no gradient at all) and so does not move."""

    def build() -> list[Observation]:
        steps = 900
        healthy = healthy_layers(mlp_names(4), seed=36)
        detail = with_layer(healthy, "1.weight", since, until, grad=grad, update=0.0)
        return make_trace(base_loss(steps), grad_norm=base_grad(steps), detail=detail, every=every)

    return build


def loss_spikes(at: tuple[int, ...], nan_at: int | None = None) -> Callable[[], list[Observation]]:
    def build() -> list[Observation]:
        loss = base_loss(1500)
        for start in at:
            loss = splice(loss, start, [6 * x for x in loss[start : start + 3]])  # type: ignore[operator]
        if nan_at is not None:
            loss = splice(loss, nan_at, [NAN] * 5)
        return make_trace(loss, grad_norm=base_grad(1500))

    return build


def plateau_mid_run() -> list[Observation]:
    """The loss stops improving at step 500 and falls again from 1400."""

    def level(t: int) -> float:
        stalled = 0.8 + 1.2 * math.exp(-min(t, 500) / 200)
        return stalled if t < 1400 else stalled - 0.3 * (1 - math.exp(-(t - 1400) / 50))

    noise = lognormal_noise(2000, 1.0, 0.03, seed=37)
    return make_trace([level(t) * n for t, n in enumerate(noise)], grad_norm=base_grad(2000))


def flat_loss(
    lr: list[float] | None = None, nan_at: int | None = None, steps: int = 700
) -> list[Observation]:
    """LR far too small: the loss never moves from where it started."""
    loss: list[float | None] = list(lognormal_noise(steps, 2.3, 0.02, seed=38))
    if nan_at is not None:
        loss = splice(loss, nan_at, [NAN] * 5)
    return make_trace(loss, grad_norm=base_grad(steps), lr=lr or [1e-7] * steps)


def overfitting(recovers: bool) -> Callable[[], list[Observation]]:
    """val_loss falls until step 1000, then rises by 0.0008 a step while the training loss keeps
    falling; with `recovers` it comes back down to its best between 1300 and 1600 (say, a
    regulariser switched on)."""

    def rise(t: int) -> float:
        if recovers and t > 1300:
            return 0.0008 * 300 * max(0.0, (1600 - t) / 300)
        return 0.0008 * max(0, t - 1000)

    def build() -> list[Observation]:
        steps = 2000
        noise = lognormal_noise(steps, 1.0, 0.01, seed=39)
        val = {t: (0.6 + 0.6 * math.exp(-t / 300) + rise(t)) * noise[t] for t in range(0, steps, 50)}
        return make_trace(noisy_decay(steps, 2.0, 0.2, 400, seed=40), grad_norm=base_grad(steps), val=val)

    return build


def amp(
    forced: Callable[[int], bool], headroom: float = 2.0**13, steps: int = 3000
) -> Callable[[], list[Observation]]:
    """GradScaler with overflows forced where `forced` says (below `headroom`)."""

    def build() -> list[Observation]:
        scales, skipped = grad_scaler(steps, headroom=headroom, forced=forced, seed=41)
        return make_trace(base_loss(steps), grad_norm=base_grad(steps), loss_scale=scales, skipped=skipped)

    return build


def update_ratio(
    name: str, update: float, since: int, until: int | None = None
) -> Callable[[], list[Observation]]:
    def build() -> list[Observation]:
        steps = 1200
        detail = with_layer(healthy_layers(mlp_names(4), seed=42), name, since, until, update=update)
        return make_trace(base_loss(steps), grad_norm=base_grad(steps), detail=detail)

    return build


def dead_then_frozen() -> list[Observation]:
    """1.weight gets no gradient from 300, and the user freezes it at 600."""
    steps = 900
    dead = with_layer(healthy_layers(mlp_names(4), seed=36), "1.weight", 300, grad=None, update=0.0)
    return make_trace(base_loss(steps), grad_norm=base_grad(steps), detail=frozen_from(dead, ["1.weight"], 600))


def too_fast_then_frozen() -> list[Observation]:
    """2.weight rewrites half of itself per step from 600, and the user freezes it at 900."""
    steps = 1200
    fast = with_layer(healthy_layers(mlp_names(4), seed=42), "2.weight", 600, update=0.5)
    return make_trace(base_loss(steps), grad_norm=base_grad(steps), detail=frozen_from(fast, ["2.weight"], 900))


def diverging_from_start() -> list[Observation]:
    """LR far too high: the loss jumps from 4.2 to ~7 by step 4 and stays above its start."""
    loss = [4.2] + [7.0 + 0.5 * math.sin(t) for t in range(1, 200)]
    return make_trace(loss, grad_norm=base_grad(200))


def diverging_in_stages() -> list[Observation]:
    """The loss falls to ~1.1, then climbs in stages (2.0 at 300, 3.0 at 400) and stays: the
    second stage alone is no larger than the first, but together they undo most of the run's
    progress."""
    loss = noisy_decay(600, 4.0, 1.1, 60, noise=0.05, seed=45)
    loss = [x * (1 if t < 300 else 1.8 if t < 400 else 2.7) for t, x in enumerate(loss)]
    return make_trace(loss, grad_norm=base_grad(600))


def spike_that_recovers() -> list[Observation]:
    loss = base_loss(600)
    loss = splice(loss, 300, [5 * x for x in loss[300:302]])  # type: ignore[operator]
    return make_trace(loss, grad_norm=base_grad(600))


def layer_left_out() -> list[Observation]:
    detail = with_layer(healthy_layers(mlp_names(3), seed=46), "2.weight", 0, update=0.0)
    return make_trace(base_loss(300), grad_norm=base_grad(300), detail=detail, lr=[1e-3] * 300)


def missing_zero_grad() -> list[Observation]:
    """Each step's gradient is the sum of all batch gradients so far: the norm grows about
    linearly, rising nearly every step."""
    batch = lognormal_noise(400, 1.0, 0.2, seed=47)
    summed = [0.6 * sum(batch[: t + 1]) / math.sqrt(1 + 0.002 * t) for t in range(400)]
    return make_trace(base_loss(400), grad_norm=summed)


def gradients_never_cleared() -> list[Observation]:
    """Clipped training without zero_grad: the norm stays at the clip level, but the probe
    sees that nothing cleared the gradients after each step from step 50 on."""
    trace = make_trace(base_loss(300), grad_norm=[1.0] * 300, grad_norm_preclip=base_grad(300))
    return [dataclasses.replace(obs, grads_kept=obs.step >= 50) for obs in trace]


PATHOLOGIES = [
    Case("loss above its start from step 4 (LR far too high)", diverging_from_start,
         (Episode("divergence", (5, 10)),)),
    Case("loss climbing in stages from its best", diverging_in_stages,
         (Episode("divergence", (400, 410)), Episode("loss_spike", (300, 300), (300, 430)),
          Episode("plateau", (330, 360)))),
    Case("a 5x loss spike for 2 steps: only loss_spike", spike_that_recovers,
         (Episode("loss_spike", (300, 300), (302, 330)),)),
    Case("a layer with a gradient the optimizer never moves", layer_left_out,
         (Episode("not_updated", (10, 20), layer="2.weight"),)),
    Case("gradients never cleared under clipping (grads_kept)", gradients_never_cleared,
         (Episode("accumulating_gradients", (52, 52)),)),
    Case("gradients summed across steps (no zero_grad)", missing_zero_grad,
         (Episode("accumulating_gradients", (20, 60)),)),
    Case("NaN loss and gradients from step 600 on", lambda: nan_from(600), (Episode("nonfinite", (600, 600)),)),
    Case("three NaN losses, then healthy again", nan_burst_then_healthy,
         (Episode("nonfinite", (500, 500), (512, 512)),)),
    Case("infinite gradient norm without a GradScaler", inf_grad_without_scaler,
         (Episode("nonfinite", (700, 700), (712, 712)),)),
    Case("gradient norm growing 1.6x per step, then NaN", exploding_growth,
         (Episode("exploding_gradients", (800, 808)), Episode("nonfinite", (830, 830)))),
    Case("40x gradients for 60 steps, hidden by clipping", exploding_hidden_by_clipping,
         (Episode("exploding_gradients", (700, 701), (760, 780)),)),
    Case("10-layer network whose gradients vanish from the start", vanishing_from_start,
         (Episode("vanishing_gradients", (100, 130)), Episode("not_learning", (60, 60), (61, 100)))),
    Case("input-side gradients vanish at 500, recover at 800", vanishing_mid_run,
         (Episode("vanishing_gradients", (500, 529), (800, 829)),)),
    Case("a layer gets no gradient (None) from 403, every=10", dead_layer(10, None, 403),
         (Episode("dead_layer", (403, 452), layer="1.weight"),)),
    Case("a layer's gradient is zero for 300 steps, every=1", dead_layer(1, 0.0, 300, 600),
         (Episode("dead_layer", (300, 340), (600, 600), layer="1.weight"),)),
    Case("a 6x loss spike for 3 steps", loss_spikes((900,)),
         (Episode("loss_spike", (900, 900), (903, 925)),)),
    Case("two separate loss spikes", loss_spikes((700, 1200)),
         (Episode("loss_spike", (700, 700), (703, 725)), Episode("loss_spike", (1200, 1200), (1203, 1225)))),
    Case("NaN burst, then a loss spike", loss_spikes((800,), nan_at=600),
         (Episode("nonfinite", (600, 600), (614, 614)), Episode("loss_spike", (800, 800), (803, 825)))),
    Case("loss stops improving at 500, improves again at 1400", plateau_mid_run,
         (Episode("plateau", (500, 850), (1400, 1600)),)),
    Case("LR far too small: flat loss from the start", flat_loss,
         (Episode("not_learning", (60, 61)),)),
    Case("flat loss under an 800-step LR warm-up",
         lambda: flat_loss([1e-4 * min(1, t / 800) for t in range(1600)], steps=1600),
         (Episode("not_learning", (800, 840)),)),
    Case("flat loss with a NaN burst", lambda: flat_loss(nan_at=100),
         (Episode("nonfinite", (100, 100), (114, 114)), Episode("not_learning", (60, 61)))),
    Case("val_loss rises from step 1000 while train falls", overfitting(recovers=False),
         (Episode("overfitting", (1150, 1350)),)),
    Case("val_loss rises, then comes back", overfitting(recovers=True),
         (Episode("overfitting", (1150, 1350), (1400, 1750)),)),
    Case("GradScaler overflows on every step from 2000", amp(lambda t: t >= 2000),
         (Episode("amp_scale_collapse", (2000, 2008)),)),
    Case("GradScaler overflows every 30 steps from 2000", amp(lambda t: t >= 2000 and t % 30 == 0),
         (Episode("amp_scale_collapse", (2000, 2220)),)),
    Case("loss scale falls below 1 at the start", amp(lambda t: False, headroom=0.25, steps=300),
         (Episode("amp_scale_collapse", (0, 17)),)),
    Case("a layer's update ratio is 0.5 from 600 to 900", update_ratio("2.weight", 0.5, 600, 900),
         (Episode("update_ratio", (600, 649), (900, 949), layer="2.weight"),)),
    Case("a layer the optimizer does not update", update_ratio("0.weight", 0.0, 0),
         (Episode("not_updated", (10, 20), layer="0.weight"),)),
    Case("a dead layer that is then frozen: resolved at the freeze", dead_then_frozen,
         (Episode("dead_layer", (300, 350), (600, 600), layer="1.weight"),)),
    Case("a too-large update ratio, then the layer is frozen: resolved at the freeze", too_fast_then_frozen,
         (Episode("update_ratio", (600, 649), (900, 900), layer="2.weight"),)),
]


@pytest.mark.parametrize("case", PATHOLOGIES, ids=[c.name for c in PATHOLOGIES])
def test_pathology_fires_right_kind_within_latency_once(case: Case) -> None:
    events = run(case.build())
    log = "\n".join(describe(events))
    expected_keys = {(e.kind, e.layer) for e in case.episodes}
    assert {(e.kind, e.layer) for e in events} <= expected_keys, log
    for key in expected_keys:
        episodes = sorted((e for e in case.episodes if (e.kind, e.layer) == key), key=lambda e: e.fires)
        fires = [e for e in events if (e.kind, e.layer) == key and not e.resolved]
        resolves = [e for e in events if (e.kind, e.layer) == key and e.resolved]
        assert len(fires) == len(episodes), log
        assert len(resolves) == sum(e.resolves is not None for e in episodes), log
        for episode, fire in zip(episodes, fires):
            assert episode.fires[0] <= fire.step <= episode.fires[1], log
        for episode, resolve in zip([e for e in episodes if e.resolves], resolves):
            assert episode.resolves is not None, log
            assert episode.resolves[0] <= resolve.step <= episode.resolves[1], log


def test_fired_alerts_carry_kind_severity_and_layer() -> None:
    events = run(exploding_growth()) + run(dead_layer(10, None, 403)())
    severity = {e.kind: e.severity for e in events}
    assert severity == {"exploding_gradients": "warning", "nonfinite": "critical", "dead_layer": "warning"}
    assert [e.layer for e in events if e.kind == "dead_layer"] == ["1.weight"]
    assert all(e.message for e in events)


def test_nan_loss_does_not_poison_spike_or_plateau_windows() -> None:
    """A NaN burst in an improving run: only `nonfinite`, and the spike right after the burst
    is still judged against the pre-burst baseline."""
    loss = splice(base_loss(1500), 500, [NAN] * 3)
    loss = splice(loss, 520, [6 * loss[520]])  # type: ignore[operator]
    events = run(make_trace(loss, grad_norm=base_grad(1500)))
    assert [(e.kind, e.step, e.resolved) for e in events] == [
        ("nonfinite", 500, False),
        ("nonfinite", 512, True),
        ("loss_spike", 520, False),
        ("loss_spike", 540, True),
    ], "\n".join(describe(events))


# ---------------------------------------------------------------------------------------
# Frozen layers (reported in `layer_frozen`) are never judged by a per-layer rule. Each
# trace raises the `unflagged` kind if the same values come without the frozen flag.


def frozen_layer(
    name: str, since: int, grad: float | None, update: float | None, every: int = 10
) -> Callable[[], list[Observation]]:
    def build() -> list[Observation]:
        steps = 900
        detail = with_layer(healthy_layers(mlp_names(4), seed=43), name, since, grad=grad, update=update, frozen=True)
        return make_trace(base_loss(steps), grad_norm=base_grad(steps), detail=detail, every=every)

    return build


def frozen_input_side() -> list[Observation]:
    """The first two layers are frozen and still carry a tiny gradient (values a probe
    reported anyway): the input side of the vanishing rule is the first layers that train."""
    steps = 900
    detail = healthy_layers(mlp_names(10), seed=44)
    for name in mlp_names(1):
        detail = with_layer(detail, name, 0, grad=1e-9, update=0.0, frozen=True)
    return make_trace(base_loss(steps), grad_norm=base_grad(steps), detail=detail)


FROZEN = [
    ("a layer frozen after attach, every=10", frozen_layer("1.weight", 403, None, None), "dead_layer"),
    ("a layer frozen after attach, every=1", frozen_layer("1.weight", 403, None, None, every=1), "dead_layer"),
    ("a frozen layer with a zero gradient", frozen_layer("1.weight", 200, 0.0, 0.0), "dead_layer"),
    ("a frozen layer with a stale gradient and no update", frozen_layer("2.weight", 0, 0.3, 0.0), "not_updated"),
    ("a frozen layer with a stale update ratio of 0.5", frozen_layer("2.weight", 0, 0.3, 0.5), "update_ratio"),
    ("frozen input-side layers with a tiny gradient", frozen_input_side, "vanishing_gradients"),
]


@pytest.mark.parametrize("build, unflagged", [c[1:] for c in FROZEN], ids=[c[0] for c in FROZEN])
def test_frozen_layers_are_never_judged(build: Callable[[], list[Observation]], unflagged: str) -> None:
    trace = build()
    events = run(trace)
    assert events == [], "\n".join(describe(events))
    without_flag = run([dataclasses.replace(obs, layer_frozen=frozenset()) for obs in trace])
    assert unflagged in {e.kind for e in without_flag}, "\n".join(describe(without_flag))


# ---------------------------------------------------------------------------------------
# Whatever comes in: no crash, and per alert key strictly fire, resolve, fire, ...

_SPECIAL = (None, 0.0, NAN, math.inf, -math.inf)


@st.composite
def observations(draw: st.DrawFn) -> list[Observation]:
    """Anything at all: None, NaN, infinities, negatives, per-layer tuples with holes (the
    collector pads a short per-layer vector with None), layers frozen and unfrozen."""
    rng = random.Random(draw(st.integers(0, 2**32)))

    def value() -> float | None:
        return rng.choice(_SPECIAL) if rng.random() < 0.3 else rng.uniform(-10, 1e6) * rng.random() ** 8

    names = ("a.weight", "a.bias", "b.weight")
    trace = []
    for step in range(draw(st.integers(1, 150))):
        detail = rng.random() < 0.5
        val = value()
        trace.append(
            Observation(
                step=step,
                loss=value(),
                grad_norm=value(),
                grad_norm_preclip=value(),
                nonfinite_layers=rng.randint(0, 2),
                skipped=rng.random() < 0.2,
                loss_scale=value(),
                lr=tuple(rng.random() for _ in range(rng.randint(0, 2))),
                scalars={"val_loss": val} if val is not None else {},
                layers=names,
                layer_grad_norm=tuple(value() for _ in names) if detail else None,
                layer_weight_norm=tuple(value() for _ in names) if detail else None,  # type: ignore[misc]
                layer_update_ratio=tuple(value() for _ in names) if detail else None,  # type: ignore[misc]
                # an index past the layers included: detectors must not trust it
                layer_frozen=frozenset(rng.sample(range(len(names) + 1), rng.randint(0, 2))),
            )
        )
    return trace


@settings(max_examples=100, deadline=None)
@given(observations())
def test_any_input_gives_alternating_fire_and_resolve(trace: list[Observation]) -> None:
    small = DetectorsConfig.model_validate(
        {"loss_spike": {"warmup": 4, "window": 8}, "exploding_gradients": {"warmup": 4, "window": 8},
         "plateau": {"patience": 10}, "vanishing_gradients": {"warmup": 0}, "update_ratio": {"warmup": 0}}
    )
    active: set[tuple[str, str | None]] = set()
    for event in run(trace, small):
        key = (event.kind, event.layer)
        assert (key in active) == event.resolved, event
        active ^= {key}


# ---------------------------------------------------------------------------------------
# Configuration: the collector's `[detectors.<kind>]` tables.


def test_config_overrides_map_onto_settings() -> None:
    config = DetectorsConfig.model_validate(
        {"plateau": {"patience": 300}, "loss_spike": {"z_threshold": 8}, "update_ratio": {"enabled": False}}
    )
    assert config.plateau.patience == 300 and config.plateau.min_delta_rel == 0.01
    assert config.loss_spike.z_threshold == 8.0
    assert "update_ratio" not in {d.kind for d in build_detectors(config)}


def test_config_overrides_change_behaviour() -> None:
    trace = flat_loss(steps=1400)
    late = DetectorsConfig.model_validate({"not_learning": {"min_steps": 400}})
    assert [e.step for e in run(trace) if e.kind == "not_learning"] == [60]
    assert [e.step for e in run(trace, late) if e.kind == "not_learning"] == [400]


@pytest.mark.parametrize(
    "table, names",
    [
        ({"plateau": {"patiense": 3}}, "plateau.patiense"),
        ({"plateu": {}}, "plateu"),
        ({"loss_spike": {"window": 0}}, "loss_spike.window"),
        ({"update_ratio": {"ignore_layers": "(["}}, "update_ratio.ignore_layers"),
    ],
)
def test_bad_config_key_gives_a_clear_error(table: dict, names: str) -> None:
    with pytest.raises(ValidationError) as error:
        DetectorsConfig.model_validate(table)
    assert names in str(error.value)


def test_build_detectors_returns_fresh_instances_per_run() -> None:
    first, second = build_detectors(DetectorsConfig()), build_detectors(DetectorsConfig())
    assert [d.kind for d in first] == list(DETECTORS)
    assert all(a is not b for a, b in zip(first, second))
    trace = nan_from(600)
    assert run(trace) == run(trace)  # state never leaks between runs


def test_registry_covers_the_contract_kinds() -> None:
    assert set(DETECTORS) == set(DetectorsConfig.model_fields) <= set(ALERT_KINDS)
    assert set(DETECTORS) == {
        "nonfinite", "exploding_gradients", "vanishing_gradients", "dead_layer", "loss_spike",
        "plateau", "overfitting", "amp_scale_collapse", "update_ratio", "divergence", "not_learning",
        "not_updated", "accumulating_gradients",
    }


@pytest.mark.parametrize("kind", DETECTORS)
def test_every_setting_is_described_and_documented_with_its_default(kind: str) -> None:
    """docs/detectors.md holds a defaults table per kind; it must not drift from the code."""
    docs = (Path(__file__).parent.parent / "docs" / "detectors.md").read_text()
    section = docs.split(f"## `{kind}`\n", 1)[1].split("\n## ", 1)[0]
    for name, field in DETECTORS[kind].Settings.model_fields.items():
        if name == "enabled":
            continue
        assert field.description, name
        row = re.search(rf"^\| `{name}` \| `([^`]*)` \|", section, re.MULTILINE)
        assert row, f"{kind}.{name} missing from the defaults table"
        cell = row.group(1).replace("\\|", "|")
        if isinstance(field.default, bool):
            assert cell == str(field.default).lower(), name
        elif isinstance(field.default, (int, float)):
            assert float(cell) == field.default, name
        else:
            assert cell == field.default, name


@pytest.mark.parametrize(
    "update, preclip, first",
    [
        (1e-7, None, "Check the LR"),  # updates far too small: the LR (or a stuck warm-up)
        (1e-3, None, "Check that labels match"),  # normal updates, yet the loss does not follow
        (1e-3, 50.0, "Raise the clipping threshold"),  # clipped to 1e-4 from a norm of 50
    ],
)
def test_not_learning_names_the_likeliest_cause_first(update: float, preclip: float | None, first: str) -> None:
    steps = 100
    detail = healthy_layers(mlp_names(3), seed=50, update=update)
    trace = make_trace(list(lognormal_noise(steps, 2.3, 0.02, seed=51)), grad_norm=[1e-4] * steps,
                       grad_norm_preclip=[preclip] * steps if preclip else None, lr=[1e-3] * steps, detail=detail)
    fired = [e for e in run(trace) if e.kind == "not_learning" and not e.resolved]
    assert len(fired) == 1 and fired[0].step == 60
    assert fired[0].hint.startswith(first), fired[0].hint


@pytest.mark.parametrize("case", [c for c in PATHOLOGIES if any(e.resolves for e in c.episodes)],
                         ids=lambda c: c.name)
def test_a_resolution_says_what_changed(case: Case) -> None:
    """Not the firing text again: the value now (or what happened), at the resolving step."""
    events = run(case.build())
    fired = {(e.kind, e.layer): e for e in events if not e.resolved}
    for resolved in (e for e in events if e.resolved):
        assert resolved.message != fired[(resolved.kind, resolved.layer)].message
        assert f"step {resolved.step}" in resolved.message, resolved.message
        assert not resolved.hint  # what to try belongs to the firing
