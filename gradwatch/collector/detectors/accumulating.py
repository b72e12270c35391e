"""`accumulating_gradients`: gradients summed across steps because nothing zeroes them.

The probe sees it directly: a gradient tensor still holding, at the next backward, exactly
what it held after the previous optimizer step was never cleared (`grads_kept`). Without
that signal (an older probe, a model updated by hand), the norm tells:
without `optimizer.zero_grad()` every backward adds to `.grad`: the gradient the optimizer
sees at step t is the sum of all t batch gradients, so its norm climbs steadily, almost
every step, roughly in proportion to the step count (Adam hides it: the loss may even keep
falling). A healthy norm fluctuates around its level, up as often as down; one that grows
as a model starts learning saturates instead of doubling with the step count.
"""

from __future__ import annotations

import statistics
from bisect import bisect_left
from collections import deque

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
)
from gradwatch.collector.detectors.stats import first_finite

# Norms kept for the "since half the run" comparison; beyond that, thinned to every other.
_HISTORY = 512


class AccumulatingGradientsSettings(DetectorSettings):
    kept_steps: int = Field(
        3, ge=1, description="Fires when the probe saw, on this many consecutive steps, that nothing "
        "cleared the gradients after the previous optimizer step (`grads_kept`: direct, and "
        "blind to clipping). Otherwise, from the gradient norm alone: the latest..."
    )
    window: int = Field(
        30, ge=5, description="...steps whose gradient norms must rise step over step..."
    )
    min_rising_fraction: float = Field(
        0.75, gt=0.5, le=1, description="...in at least this fraction of the steps (a healthy "
        "norm rises in about half)..."
    )
    min_growth: float = Field(
        4.0, gt=1, description="...while the norm has grown this many times over its first steps..."
    )
    min_growth_since_half: float = Field(
        1.3, gt=1, description="...and this many times since half the steps run so far (a norm "
        "that grows as the model starts learning saturates; a sum of gradients keeps growing)."
    )
    max_growth_since_half: float = Field(
        10.0, gt=1, description="...but less than this many times: a sum of gradients grows about "
        "linearly (2x since half the run), an explosion geometrically (`exploding_gradients`)."
    )
    resolve_after: int = Field(
        30, ge=1, description="Consecutive steps without the condition that resolve it."
    )


class AccumulatingGradientsDetector(Detector):
    """The probe saw `grads_kept` (no zero_grad after the previous step) on `kept_steps`
    consecutive steps. Or, without that signal, on every step with a gradient norm (pre-clip where clipping is used): the norm rose
    over the previous step in `min_rising_fraction` of the latest `window` steps, is
    `min_growth` times the median of the run's first 5 steps, and between
    `min_growth_since_half` and `max_growth_since_half` times its median around half the
    run's steps so far."""

    kind = "accumulating_gradients"
    Settings = AccumulatingGradientsSettings
    settings: AccumulatingGradientsSettings

    def __init__(self, settings: AccumulatingGradientsSettings | None = None) -> None:
        super().__init__(settings)
        self._first: list[float] = []
        self._latest: deque[float] = deque(maxlen=self.settings.window + 1)
        self._rises: deque[bool] = deque(maxlen=self.settings.window)
        self._steps: list[int] = []
        self._norms: list[float] = []
        self._stride = 1
        self._seen = 0
        self._calm = 0
        self._kept_since: int | None = None  # first step of the current run of `grads_kept`
        self._kept = 0

    def check(self, obs: Observation) -> list[Finding] | None:
        s = self.settings
        if obs.grads_kept:
            self._kept_since = obs.step if not self._kept else self._kept_since
            self._kept += 1
        else:
            self._kept = 0
        norm = first_finite(obs.grad_norm_preclip, obs.grad_norm)
        if norm is None or obs.skipped:
            return None
        if len(self._first) < 5:
            self._first.append(norm)
        if self._latest:
            self._rises.append(norm > self._latest[-1])
        self._latest.append(norm)
        self._remember(obs.step, norm)
        accumulating = self._kept >= s.kept_steps or self._accumulating(obs.step)
        if self.active:
            self._calm = 0 if accumulating else self._calm + 1
            return [] if self._calm >= s.resolve_after else [self._finding(obs.step, norm)]
        self._calm = 0
        return [self._finding(obs.step, norm)] if accumulating else []

    def _accumulating(self, step: int) -> bool:
        s = self.settings
        if len(self._rises) < s.window or sum(self._rises) < s.min_rising_fraction * s.window:
            return False  # the cheap test first: most steps of most runs stop here
        start = statistics.median(self._first)
        now = statistics.median(list(self._latest)[-5:])
        if start <= 0 or now < s.min_growth * start:
            return False
        half = bisect_left(self._steps, step // 2)
        around_half = self._norms[max(0, half - 2): half + 3]
        if not around_half:
            return False
        growth = now / max(statistics.median(around_half), 1e-30)
        return s.min_growth_since_half <= growth < s.max_growth_since_half

    def _remember(self, step: int, norm: float) -> None:
        self._seen += 1
        if self._seen % self._stride:
            return
        self._steps.append(step)
        self._norms.append(norm)
        if len(self._steps) > _HISTORY:
            self._steps, self._norms = self._steps[::2], self._norms[::2]
            self._stride *= 2

    def _finding(self, step: int, norm: float) -> Finding:
        if self._kept >= self.settings.kept_steps:
            return Finding(
                f"nothing cleared the gradients between optimizer steps since step {self._kept_since}: "
                f"each step adds its gradient to all the previous ones (gradient norm {norm:.4g} at step {step})",
                value=norm,
            )
        start = statistics.median(self._first)
        return Finding(
            f"gradient norm {norm:.4g} at step {step} has risen in {sum(self._rises)} of the last "
            f"{len(self._rises)} steps, {norm / start:.3g}x its first steps' {start:.4g}: gradients "
            "are summing across steps",
            value=norm,
        )

    def resolution(self, finding: Finding, obs: Observation) -> str:
        norm = first_finite(obs.grad_norm_preclip, obs.grad_norm)
        return (f"gradient norm {norm:.4g} at step {obs.step}, no longer climbing step after step "
                f"({self.settings.resolve_after} steps)")
