"""`divergence`: the loss has risen far above where the run already was, and stays there.

Judged from the first steps on (a too-high LR shows in the first steps of a run, exactly
where a warm-up would look away) against references that a higher level can never move:
the run's first loss and the best smoothed level it has reached. A loss spike that
recovers within `confirm_steps` stays `loss_spike`'s finding.
"""

from __future__ import annotations

from collections import deque

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
    finite,
)
from gradwatch.collector.detectors.stats import RollingWindow

# Robust sigma from the median absolute deviation of a normal sample.
_MAD_TO_SIGMA = 1.4826


class DivergenceSettings(DetectorSettings):
    level_window: int = Field(
        5, ge=1, description="The current level is the median of this many latest finite losses "
        "(one odd batch cannot move it)."
    )
    best_window: int = Field(
        20, ge=2, description="The best level is the lowest median of this many consecutive "
        "losses seen so far (a lucky batch cannot set it)."
    )
    above_start: float = Field(
        0.5, ge=0, description="Diverging when the level exceeds the run's first loss by this "
        "fraction of it..."
    )
    undone_progress: float = Field(
        0.5, gt=0, description="...or the level has risen above the best level by this fraction "
        "of the progress made from the first loss to the best..."
    )
    above_best_factor: float = Field(
        4.0, gt=1, description="...or the level exceeds this multiple of a positive best level, "
        "by at least `min_rise` of the first loss (a loss that fell 100x and rose 10x is diverging)."
    )
    min_rise: float = Field(
        0.05, ge=0, description="Rises smaller than this fraction of the first loss are never a "
        "divergence (losses near zero wander by large factors)."
    )
    noise_z: float = Field(
        6.0, ge=0, description="The rise must also exceed this many robust standard deviations of "
        "the loss around its recent level (OLMo-core's z-score of 6)."
    )
    tail_quantile: float = Field(
        0.9, gt=0.5, lt=1, description="...and the level must exceed this quantile of the latest "
        "`tail_window` losses that were not diverged: heavy-tailed minibatch losses (a batch of "
        "hard examples) have bursts that a standard deviation understates..."
    )
    tail_window: int = Field(
        100, ge=10, description="...over this many losses (a quantile, unlike the largest value, "
        "cannot ratchet up with a slow climb)."
    )
    confirm_steps: int = Field(
        4, ge=1, description="Consecutive steps the level must stay diverged to fire: a spike that "
        "recovers at once is `loss_spike`."
    )
    resolve_after: int = Field(
        20, ge=1, description="Consecutive steps back below half the margin that resolve it."
    )


class DivergenceDetector(Detector):
    """Critical when the median of the latest `level_window` losses stays, for
    `confirm_steps` steps, above any of: the first loss by `above_start` of it; the best
    level by `undone_progress` of the progress made; `above_best_factor` times the best
    level. Each rise must also beat `noise_z` robust deviations of the loss's own noise and
    `min_rise` of the first loss. No warm-up, and the references never adopt a higher level:
    a run that diverges in stages is judged against where it had been."""

    kind = "divergence"
    Settings = DivergenceSettings
    settings: DivergenceSettings

    def __init__(self, settings: DivergenceSettings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        self._first: float | None = None
        self._best: float | None = None
        self._best_step = 0
        self._recent = RollingWindow(s.level_window)
        self._slow = RollingWindow(s.best_window)
        self._deviations: deque[float] = deque(maxlen=4 * s.best_window)
        self._tail: deque[float] = deque(maxlen=s.tail_window)
        self._streak = 0  # consecutive diverged steps while calm
        self._calm = 0  # consecutive steps back below the exit threshold while active

    def check(self, obs: Observation) -> list[Finding] | None:
        loss = obs.loss
        if not finite(loss):
            return None  # `nonfinite` reports NaN and inf; they never enter the windows
        s = self.settings
        if self._first is None:
            self._first = loss
        self._recent.add(loss)
        level = self._recent.median()
        threshold, reference = self._threshold(level)
        diverged = level > threshold
        if not diverged:
            self._learn(loss, obs.step)
        if self.active:
            exit_threshold = reference + (threshold - reference) / 2
            self._calm = self._calm + 1 if level < exit_threshold else 0
            if self._calm >= s.resolve_after:
                self._streak = self._calm = 0
                return []
            return [self._finding(obs.step, level)]
        self._streak = self._streak + 1 if diverged else 0
        if self._streak < s.confirm_steps:
            return []
        return [self._finding(obs.step, level)]

    def _threshold(self, level: float) -> tuple[float, float]:
        """The lowest level that counts as diverged now, and the reference it rises from."""
        s = self.settings
        first = self._first if self._first is not None else level
        scale = abs(first)
        noise = self._noise()
        floor = max(s.min_rise * scale, s.noise_z * noise)
        thresholds = [(first + max(s.above_start * scale, floor), first)]
        best = self._best
        if best is not None and first - best > floor:  # only a run that made progress can undo it
            thresholds.append((best + max(s.undone_progress * (first - best), floor), best))
            if best > 0:
                thresholds.append((max(s.above_best_factor * best, best + floor), best))
        threshold, reference = min(thresholds)
        if len(self._tail) >= 10:
            ordered = sorted(self._tail)
            threshold = max(threshold, ordered[int(s.tail_quantile * (len(ordered) - 1))])
        return threshold, reference

    def _learn(self, loss: float, step: int) -> None:
        """Only levels that are not diverged shape the references and the noise estimate."""
        self._slow.add(loss)
        self._tail.append(loss)
        if len(self._slow) >= min(self.settings.best_window, 5):
            slow = self._slow.median()
            self._deviations.append(abs(loss - slow))
            if self._best is None or slow < self._best:
                self._best, self._best_step = slow, step

    def _noise(self) -> float:
        if len(self._deviations) < 5:
            return 0.0
        ordered = sorted(self._deviations)
        return _MAD_TO_SIGMA * ordered[len(ordered) // 2]

    def _finding(self, step: int, level: float) -> Finding:
        first = self._first if self._first is not None else level
        parts = [f"loss level {level:.4g} at step {step} (median of the last {len(self._recent)})"]
        if level > first:
            parts.append(f"is above the run's first loss {first:.4g}")
        if self._best is not None:
            parts.append(f"{'and ' if level > first else 'is '}up from its best {self._best:.4g} "
                         f"(step {self._best_step})")
        return Finding(" ".join(parts), "critical", value=level)

    def resolution(self, finding: Finding, obs: Observation) -> str:
        best = f" (best {self._best:.4g})" if self._best is not None else ""
        return (f"loss level back to {self._recent.median():.4g} at step {obs.step}{best}, "
                f"for {self.settings.resolve_after} steps")
