"""`divergence`: the loss has risen far above where the run already was, and stays there.

Judged from the first steps on (a too-high LR shows in the first steps of a run, exactly
where a warm-up would look away) against references that a higher level can never move:
the run's first loss and the best smoothed level it has reached. A loss spike that
recovers within `confirm_steps` stays `loss_spike`'s finding.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
    finite,
)
from gradwatch.collector.detectors.stats import MAD_TO_SIGMA, RollingWindow


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
        "the loss's step-to-step noise (OLMo-core's z-score of 6)."
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
    lingering_above_start: float = Field(
        0.15, ge=0, description="A level that stays above the first loss by this fraction of it "
        "(and by `min_rise`)..."
    )
    lingering_noise_z: float = Field(
        3.0, ge=0, description="...and this many robust standard deviations of the step-to-step noise "
        "(a level held for many steps needs less margin than a sudden one)..."
    )
    lingering_steps: int = Field(
        10, ge=1, description="...for this many consecutive steps is a divergence too: the run "
        "stays worse than where it started."
    )
    resolve_after: int = Field(
        20, ge=1, description="Consecutive steps back below half the margin (of the threshold and "
        "of the lingering level, whichever is lower) that resolve it."
    )


class DivergenceDetector(Detector):
    """Critical when the median of the latest `level_window` losses stays, for
    `confirm_steps` steps, above any of: the first loss by `above_start` of it; the best
    level by `undone_progress` of the progress made; `above_best_factor` times the best
    level; or for `lingering_steps` above the first loss by `lingering_above_start`. Each rise must also beat `noise_z` robust deviations of the loss's own noise and
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
        # |loss - previous loss| of accepted steps: step-to-step noise, blind to a trend
        self._differences: deque[float] = deque(maxlen=4 * s.best_window)
        self._previous: float | None = None
        self._tail: deque[float] = deque(maxlen=s.tail_window)
        self._streak = 0  # consecutive steps above the threshold
        self._lingering = 0  # consecutive steps above `lingering_above_start`
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
        calm_so_far = not self.active and not self._streak and not self._lingering
        if calm_so_far and level <= min(self._threshold(level, cheap=True)[0], self._above_start(cheap=True)):
            self._learn(loss, obs.step)  # the usual step: below even the noise-free thresholds
            return []
        threshold, reference = self._threshold(level)
        above_start = self._above_start()
        high, lingering = level > threshold, level > above_start
        if not (high or lingering):
            self._learn(loss, obs.step)
        self._streak = self._streak + 1 if high else 0
        self._lingering = self._lingering + 1 if lingering else 0
        if self.active:
            back = min(reference + (threshold - reference) / 2, self._first + (above_start - self._first) / 2)
            self._calm = self._calm + 1 if level < back else 0
            if self._calm >= s.resolve_after:
                self._streak = self._lingering = self._calm = 0
                return []
            return [self._finding(obs.step, level)]
        if self._streak >= s.confirm_steps or self._lingering >= s.lingering_steps:
            return [self._finding(obs.step, level)]
        return []

    def _above_start(self, cheap: bool = False) -> float:
        """The level that, held for `lingering_steps`, is a divergence: the run stays above
        where it started."""
        s = self.settings
        first = self._first if self._first is not None else 0.0
        noise = 0.0 if cheap else self._noise()
        return first + max(s.lingering_above_start * abs(first), s.min_rise * abs(first), s.lingering_noise_z * noise)

    def _threshold(self, level: float, cheap: bool = False) -> tuple[float, float]:
        """The lowest level that counts as diverged now, and the reference it rises from.
        `cheap` leaves out the noise and the tail quantile, which only ever raise it: a
        level below the cheap threshold is below the real one."""
        s = self.settings
        first = self._first if self._first is not None else level
        scale = abs(first)
        noise = 0.0 if cheap else self._noise()
        floor = max(s.min_rise * scale, s.noise_z * noise)
        thresholds = [(first + max(s.above_start * scale, floor), first)]
        best = self._best
        if best is not None and first - best > floor:  # only a run that made progress can undo it
            thresholds.append((best + max(s.undone_progress * (first - best), floor), best))
            if best > 0:
                thresholds.append((max(s.above_best_factor * best, best + floor), best))
        threshold, reference = min(thresholds)
        if not cheap and len(self._tail) >= 10:
            ordered = sorted(self._tail)
            threshold = max(threshold, ordered[int(s.tail_quantile * (len(ordered) - 1))])
        return threshold, reference

    def _learn(self, loss: float, step: int) -> None:
        """Only levels that are not diverged shape the references and the noise estimate."""
        self._slow.add(loss)
        self._tail.append(loss)
        if self._previous is not None:
            self._differences.append(abs(loss - self._previous))
        self._previous = loss
        if len(self._slow) >= min(self.settings.best_window, 5):
            slow = self._slow.median()
            if self._best is None or slow < self._best:
                self._best, self._best_step = slow, step

    def _noise(self) -> float:
        """Robust sigma of the loss from its step-to-step differences (a difference of two
        draws has sqrt(2) sigma): a climbing trend does not inflate it, as deviations from
        a median would."""
        if len(self._differences) < 5:
            return 0.0
        return MAD_TO_SIGMA * statistics.median_high(self._differences) / math.sqrt(2)

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
