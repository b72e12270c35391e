"""`plateau`: the training loss has stopped improving."""

from __future__ import annotations

import math
import statistics
from bisect import bisect_right
from collections import deque

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
    finite,
)
from gradwatch.collector.detectors.stats import max_lr, median_and_error

# A one-step LR fall of more than 10% is a deliberate reduction (a reduce_lr action, a step
# schedule), not the slow slide of cosine or linear decay.
_LR_DROP = 0.9

# Block medians move slowly: they are recomputed every block/_EVALUATIONS_PER_BLOCK steps
# (10 at defaults), which keeps the detector cheap for a collector with many runs.
_EVALUATIONS_PER_BLOCK = 20

# Noise-aware decisions: to fire, the improvement must fall short of min_delta by one
# standard error of the difference of the block medians (a slowly improving noisy loss is
# not flat on an unlucky draw); to resolve, it must beat twice min_delta by as much.
_NOISE_K = 1.0
# Blocks of history: the last block is compared with the first, a block apart, so that a
# slowly improving loss shows twice the progress against the same noise.
_SPAN = 3

# Losses kept per comparison block at most; beyond that, history is thinned to every other
# sample, so memory stays bounded however long the run (the median barely needs more).
_BLOCK_SAMPLES = 256


class PlateauSettings(DetectorSettings):
    patience: int = Field(
        80, ge=10, description="Block length in steps: the median loss of the last block must be "
        "below the median of the block two blocks before it..."
    )
    patience_fraction: float = Field(
        0.1, ge=0, lt=1 / 3, description="...with blocks of this fraction of the steps run so far, if "
        "longer: late in a long run the loss improves slowly (a power law), so a fixed block would "
        "call that a plateau."
    )
    min_delta_rel: float = Field(
        0.01, ge=0, description="Improving means the median falling by more than this fraction..."
    )
    min_delta_abs: float = Field(
        1e-8, ge=0, description="...and by more than this absolute amount (for losses near or below zero)."
    )
    converged_loss: float = Field(
        1e-4, description="No plateau while the loss median is below this: nothing is left to gain."
    )
    annealed_lr_fraction: float = Field(
        0.3, ge=0, description="No plateau while the LR is below this fraction of its peak so far: a "
        "loss that flattens as the schedule anneals is the schedule ending, not a stall."
    )
    min_learned: float = Field(
        0.1, ge=0, description="No plateau unless the loss median is below the first block's by "
        "this fraction: a run that never learned is `not_learning`'s finding, not a stall."
    )
    converged_ratio: float = Field(
        0.1, ge=0, description="No plateau once the loss median is below this fraction of the first "
        "block's: the run has converged, not stalled (0 turns this off)."
    )


class PlateauDetector(Detector):
    """Keras ReduceLROnPlateau made robust for per-step losses: the median of the last block
    of steps is compared with the median of the block two blocks before it (medians of many
    steps, not one noisy value or a running minimum that a lucky low resets). Plateau when it has not
    fallen by min_delta; resolved once it falls by twice that. Comparison starts afresh while
    the LR rises (warm-up) and after a sharp LR drop (Keras' cooldown).

    An `info` note, not a warning: a loss that flattens at a constant LR is also what every
    healthy run does before its next scheduled LR drop; the note (and a `reduce_lr` action
    policy, which acts on notes too) says that lowering the LR is the next move."""

    kind = "plateau"
    Settings = PlateauSettings
    settings: PlateauSettings

    def __init__(self, settings: PlateauSettings | None = None) -> None:
        super().__init__(settings)
        self._first_block: list[float] = []
        # Every `_stride`-th (step, loss), in two aligned deques: the steps are sorted, so
        # each block is found by bisection instead of a scan of every sample.
        self._steps: deque[int] = deque()
        self._losses: deque[float] = deque()
        self._stride = 1
        self._seen = 0
        self._since: int | None = None  # first step of the current comparison history
        self._evaluated_at: int | None = None
        self._lr: float | None = None
        self._peak_lr = 0.0
        self._last_recent = math.nan  # the latest evaluated block median

    def check(self, obs: Observation) -> list[Finding] | None:
        if not finite(obs.loss):
            return None  # a NaN is `nonfinite`'s finding and never enters the history
        s = self.settings
        lr = max_lr(obs.lr)
        self._peak_lr = max(self._peak_lr, lr or 0.0)
        if self._lr_moved(lr) or self._since is None:
            self._steps.clear()
            self._losses.clear()
            self._since, self._evaluated_at = obs.step, None
        self._remember(obs.step, obs.loss)
        block = max(s.patience, s.patience_fraction * obs.step)
        while self._steps and self._steps[0] <= obs.step - _SPAN * block:
            self._steps.popleft()
            self._losses.popleft()
        if obs.step - self._since < _SPAN * block or len(self._first_block) < s.patience:
            return []  # warm-up: three full blocks since the start, the LR warm-up or a drop
        evaluated_at = self._evaluated_at
        if evaluated_at is not None and obs.step - evaluated_at < block / _EVALUATIONS_PER_BLOCK:
            return None  # between evaluations the alert state stands
        losses = list(self._losses)
        recent_losses = losses[bisect_right(self._steps, obs.step - block):]
        earlier_losses = losses[: bisect_right(self._steps, obs.step - (_SPAN - 1) * block)]
        if not recent_losses or not earlier_losses:
            return None  # a block lost to NaNs: cannot tell
        self._evaluated_at = obs.step
        recent, recent_error = median_and_error(recent_losses)
        self._last_recent = recent
        earlier, earlier_error = median_and_error(earlier_losses)
        improvement = earlier - recent
        noise = _NOISE_K * math.hypot(recent_error, earlier_error)
        min_delta = max(s.min_delta_rel * abs(earlier), s.min_delta_abs)
        if self.active:  # hysteresis: only clear progress ends it
            if improvement - noise > 2 * min_delta:
                return []
        else:
            first = statistics.median(self._first_block)
            converged = recent < s.converged_loss or (first > 0 and recent < s.converged_ratio * first)
            annealed = lr is not None and lr < s.annealed_lr_fraction * self._peak_lr
            never_learned = first - recent < s.min_learned * abs(first)  # `not_learning`'s case
            if converged or annealed or never_learned or improvement + noise > min_delta:
                return []
        return [
            Finding(
                f"loss has not improved in {2 * block:.0f} steps (median {recent:.4g} over the "
                f"{block:.0f} steps to {obs.step}, {earlier:.4g} over {block:.0f} steps "
                f"{2 * block:.0f} before)",
                "info",
                value=recent,
            )
        ]

    def resolution(self, finding: Finding, obs: Observation) -> str:
        return f"loss improving again at step {obs.step}: block median {self._last_recent:.4g}, down from {finding.value:.4g}"

    def _remember(self, step: int, loss: float) -> None:
        if len(self._first_block) < self.settings.patience:
            self._first_block.append(loss)
        self._seen += 1
        if self._seen % self._stride:
            return
        self._steps.append(step)
        self._losses.append(loss)
        if len(self._steps) > 2 * _BLOCK_SAMPLES:
            self._steps = deque(list(self._steps)[::2])
            self._losses = deque(list(self._losses)[::2])
            self._stride *= 2

    def _lr_moved(self, lr: float | None) -> bool:
        """True while the LR rises (warm-up) and on a sharp drop: comparison restarts then."""
        previous, self._lr = self._lr, lr
        if lr is None or previous is None:
            return False
        return lr > previous * (1 + 1e-9) or lr < previous * _LR_DROP

