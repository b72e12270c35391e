"""`overfitting`: validation loss rising from its best while the training loss does not."""

from __future__ import annotations

import math

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
)
from gradwatch.collector.detectors.stats import Latch, RollingWindow


class OverfittingSettings(DetectorSettings):
    train_window: int = Field(
        50, ge=1, description="Recent finite training losses whose median is compared with val_loss."
    )
    val_window: int = Field(
        3, ge=1, description="Latest val_loss observations whose median is judged: a noisy "
        "evaluation is not a trend, and a lucky low one is not the best."
    )
    min_rise_rel: float = Field(
        0.2, ge=0, description="val_loss must exceed its best by this fraction of the best..."
    )
    min_rise_abs: float = Field(
        0.01, ge=0, description="...and by this absolute amount (tiny losses are not overfitting)."
    )
    train_drop: float = Field(
        0.5, gt=0, lt=1, description="...or, with val_loss no better than its best, the training "
        "loss fell below this fraction of its value at that best (memorisation: train loss to zero, "
        "val loss stuck)."
    )
    warmup: int = Field(
        100, ge=0, description="Steps before the first judgement (evaluations before it still set the best)."
    )
    patience: int = Field(
        2, ge=1, description="Consecutive evaluations past the threshold needed to fire (and back "
        "within half of it to resolve)."
    )


class OverfittingDetector(Detector):
    """Acts only on steps that carry a `val_loss` scalar. The val loss judged is the median of
    the last `val_window` evaluations. Overfitting, on `patience` consecutive evaluations
    after warm-up: it exceeds its best so far by max(min_rise_rel * best, min_rise_abs) and
    the generalisation gap (val - median recent train loss) has widened by as much since that
    best; or it is no better than its best while the training loss fell below `train_drop`
    of its value then. Resolves after `patience` evaluations without, or at a new best."""

    kind = "overfitting"
    Settings = OverfittingSettings
    settings: OverfittingSettings

    def __init__(self, settings: OverfittingSettings | None = None) -> None:
        super().__init__(settings)
        self._train = RollingWindow(self.settings.train_window)
        self._val = RollingWindow(self.settings.val_window)
        self._latch = Latch(self.settings.patience, self.settings.patience)
        self._best: float | None = None
        self._best_step = 0
        self._train_at_best: float | None = None

    def check(self, obs: Observation) -> list[Finding] | None:
        self._train.add(obs.loss)
        if not self._val.add(obs.val_loss):
            return None  # no evaluation at this step (or a non-finite one)
        val = self._val.median()
        train = self._train.median() if len(self._train) else None
        if len(self._val) < self.settings.val_window:
            return []  # the best is a median of a full window: one early evaluation is noise
        if self._best is None or val < self._best:
            self._best, self._best_step, self._train_at_best = val, obs.step, train
            self._latch.reset()  # a new best is no overfitting, at once
            return []
        s = self.settings
        if obs.step < s.warmup:
            return []
        margin = max(s.min_rise_rel * abs(self._best), s.min_rise_abs)
        limit = margin / 2 if self._latch.active else margin
        rise = val - self._best
        train_at_best = self._train_at_best
        if train is None or train_at_best is None:
            overfitting = rise > limit
        else:
            rising = rise > limit and rise - (train - train_at_best) > limit  # the gap widened
            memorising = train < s.train_drop * train_at_best and train_at_best - train > s.min_rise_abs
            overfitting = rising or memorising
        if not self._latch.update(overfitting):
            return []
        trend = "" if train is None or train_at_best is None else (
            f" while the training loss went from {train_at_best:.4g} to {train:.4g}"
        )
        return [
            Finding(
                f"val_loss (median of the last {len(self._val)} evaluations) {val:.4g} at step "
                f"{obs.step} is no better than its best {self._best:.4g} (step {self._best_step})"
                + trend,
                value=val,
            )
        ]

    def resolution(self, finding: Finding, obs: Observation) -> str:
        val = self._val.median() if len(self._val) else math.nan
        return f"val_loss back to {val:.4g} at step {obs.step} (best {self._best:.4g}, step {self._best_step})"
