"""`not_learning`: the loss has not moved from where the run started.

`plateau` is for runs that learned and then stopped; this is for runs that never started:
an LR far too small or a warm-up stuck near zero, a clipping threshold far too small,
labels that do not match their inputs, weight decay that overwhelms the gradient. A careful
reader sees each of them in the first tens of steps, so this judges early, and names the
likely cause from what else the probe measured (the LR, the update/weight ratios, clipping).
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
from gradwatch.collector.detectors.stats import (
    Latch,
    all_finite,
    max_lr,
    median_and_error,
)


class NotLearningSettings(DetectorSettings):
    initial_steps: int = Field(
        10, ge=3, description="The initial level is the median of the first this many finite losses."
    )
    min_steps: int = Field(
        60, ge=10, description="First judgement at this step; until the run has learned, every "
        "step is judged."
    )
    recent_steps: int = Field(
        30, ge=5, description="The current level is the median of this many latest losses."
    )
    min_progress: float = Field(
        0.03, ge=0, description="Not learning while the current level is not below the initial "
        "one by this fraction of it..."
    )
    noise_z: float = Field(
        1.0, ge=0, description="...even when credited with this many standard errors of the two "
        "medians (a loss too noisy to tell is not flagged)."
    )
    learned_after: float = Field(
        0.1, gt=0, description="Once the level has been this fraction below the initial level, "
        "the run has learned and this detector retires (`plateau` takes over)."
    )
    converged_loss: float = Field(
        1e-4, description="Not judged when the initial level is below this: nothing is left to learn."
    )
    resolve_after: int = Field(
        10, ge=1, description="Consecutive steps with the level below half the margin that resolve it."
    )
    tiny_update_ratio: float = Field(
        1e-5, gt=0, description="Cause: a median update/weight ratio below this is orders of "
        "magnitude under the usual band (1e-4 to 1e-2)."
    )


class NotLearningDetector(Detector):
    """From `min_steps` on, until the run has learned: the median of the latest
    `recent_steps` losses has not fallen below the median of the first `initial_steps` by
    `min_progress` of it, even credited with `noise_z` standard errors. While the LR is
    rising (a warm-up), only when the updates are tiny too. Resolves when it moves; retires
    for good once the level has fallen by `learned_after`."""

    kind = "not_learning"
    Settings = NotLearningSettings
    settings: NotLearningSettings

    def __init__(self, settings: NotLearningSettings | None = None) -> None:
        super().__init__(settings)
        self._initial: list[float] = []
        self._recent: deque[float] = deque(maxlen=self.settings.recent_steps)
        self._learned = False
        self._ratio: float | None = None  # median update/weight ratio of the latest detail step
        self._clipped_to: float | None = None  # post-clip norm when clipping cuts deep
        self._peak_lr = 0.0
        self._lr: float | None = None
        self._rising_until = -1  # the LR rose within the last `recent_steps` steps until then
        self._step = 0
        self._latch = Latch(on_after=1, off_after=self.settings.resolve_after)

    def check(self, obs: Observation) -> list[Finding] | None:
        if self._learned:
            return []  # retired: plateau's business from here on
        self._note_causes(obs)
        if not finite(obs.loss):
            return None
        s = self.settings
        if len(self._initial) < s.initial_steps:
            self._initial.append(obs.loss)
        self._recent.append(obs.loss)
        if obs.step < s.min_steps or len(self._initial) < s.initial_steps:
            return []
        initial, initial_error = median_and_error(self._initial)
        if abs(initial) < s.converged_loss:
            self._learned = True
            return []
        recent_values = list(self._recent)
        recent, recent_error = median_and_error(recent_values)
        progress = initial - recent
        if progress > s.learned_after * abs(initial):
            self._learned = True
            return []
        # Judged with the noise in the run's favour: a loss too noisy to tell is not flagged.
        error = s.noise_z * math.hypot(initial_error, recent_error)
        # Flat: short of min_progress downwards, and not clearly risen either (a loss above
        # where it started is `divergence`'s finding).
        flat = progress + error < s.min_progress * abs(initial) and -progress - error < s.min_progress * abs(initial)
        if flat and self._warming_up() and not self._tiny_updates():
            flat = False  # a warm-up still raising a sane LR: the loss has yet to move
        if not self._latch.update(flat):
            return []
        return [Finding(
            f"loss has not moved from its initial level in {obs.step} steps (median {recent:.4g} over "
            f"the last {len(recent_values)} steps, {initial:.4g} over the first {len(self._initial)})"
            + self._causes(),
            hint=self._hint(),
            value=recent,
        )]

    def resolution(self, finding: Finding, obs: Observation) -> str:
        recent = statistics.median(self._recent)
        return f"loss moving at step {obs.step}: median {recent:.4g}, from {finding.value:.4g} when flagged"

    def _note_causes(self, obs: Observation) -> None:
        lr = max_lr(obs.lr)
        if lr is not None:
            self._peak_lr = max(self._peak_lr, lr)
            if self._lr is not None and lr > self._lr * 1.0001:
                self._rising_until = obs.step + self.settings.recent_steps
            self._lr = lr
        self._step = obs.step
        ratios = obs.layer_update_ratio
        if ratios is not None and not obs.skipped:
            finite_ratios = ratios if all_finite(ratios) else [r for r in ratios if finite(r) and r > 0]
            if finite_ratios:
                self._ratio = statistics.median(finite_ratios)
        if finite(obs.grad_norm_preclip) and finite(obs.grad_norm):
            self._clipped_to = obs.grad_norm if obs.grad_norm < 0.1 * obs.grad_norm_preclip else None

    def _warming_up(self) -> bool:
        return self._step <= self._rising_until

    def _tiny_updates(self) -> bool:
        return self._ratio is not None and self._ratio < self.settings.tiny_update_ratio

    def _causes(self) -> str:
        seen = []
        if self._tiny_updates():
            seen.append(f"the median update/weight ratio is {self._ratio:.2g}, far below the usual 1e-4..1e-2")
        if self._clipped_to is not None:
            seen.append(f"gradients are clipped to a norm of {self._clipped_to:.2g}")
        if self._warming_up():
            seen.append(f"the LR is still rising (now up to {self._peak_lr:.2g})")
        return "; " + "; ".join(seen) if seen else ""

    def _hint(self) -> str:
        """The first things to check, the likeliest first given what was seen: clipping that
        cuts the gradient to nothing, updates far too small (the LR), or updates of a normal
        size that the loss does not follow (the labels, the weight decay)."""
        lr = "check the LR and its schedule (a warm-up stuck near zero, an LR far too small)"
        labels = "check that labels match their inputs (shuffled or misaligned targets)"
        decay = "check that weight decay does not overwhelm the gradient"
        clipping = "raise the clipping threshold (max_norm around 1.0 is usual)"
        if self._clipped_to is not None:
            steps = [clipping, lr, labels, decay]
        elif self._tiny_updates():
            steps = [lr, decay, labels]
        elif self._ratio is not None:  # the weights move at a normal pace: the target is the suspect
            steps = [labels, decay, lr]
        else:
            steps = [lr, labels, decay, "check the gradient clipping threshold"]
        text = "; ".join(steps)
        return text[0].upper() + text[1:] + "."

