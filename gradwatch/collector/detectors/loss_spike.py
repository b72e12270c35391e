"""`loss_spike`: one or a few steps whose loss is far above the recent robust baseline."""

from __future__ import annotations

import math

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
    finite,
)
from gradwatch.collector.detectors.stats import Excursion


class LossSpikeSettings(DetectorSettings):
    window: int = Field(128, ge=8, description="Recent finite, non-spike losses forming the baseline.")
    warmup: int = Field(64, ge=2, description="Finite losses seen before the first judgement.")
    z_threshold: float = Field(
        6.0, gt=0, description="Spike when loss > median + z_threshold * std of the window."
    )
    min_relative_jump: float = Field(
        0.5, ge=0, description="...and loss > median * (1 + min_relative_jump)."
    )
    min_absolute_jump: float = Field(
        0.01, ge=0, description="...and loss > median + min_absolute_jump (tiny losses are not spikes)."
    )
    tail_factor: float = Field(
        3.0, ge=0, description="...and loss > median + tail_factor * (largest loss in the window - median): "
        "heavy-tailed minibatch losses have excursions that the std understates."
    )
    resolve_after: int = Field(
        20, ge=1, description="Consecutive steps back below median + half the margin that resolve it "
        "(spikes closer together than this are one episode of instability)."
    )


class LossSpikeDetector(Detector):
    """The loss exceeds the median of its recent spike-free window by the largest of four
    margins (z * std, relative, absolute, tail). Fires at the first spiking step."""

    kind = "loss_spike"
    Settings = LossSpikeSettings
    settings: LossSpikeSettings

    def __init__(self, settings: LossSpikeSettings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        self._excursion = Excursion(s.window, s.warmup, on_after=1, off_after=s.resolve_after)

    def check(self, obs: Observation) -> list[Finding] | None:
        loss = obs.loss
        if not finite(loss):
            return None  # a NaN is `nonfinite`'s finding and never enters the window
        if self._excursion.warming_up:
            self._excursion.warm(loss)
            return []
        s = self.settings
        window = self._excursion.window
        median = window.median()
        margin = max(
            s.z_threshold * window.std(),
            s.min_relative_jump * abs(median),
            s.min_absolute_jump,
            s.tail_factor * (window.max() - median),
        )
        threshold = median + (margin / 2 if self._excursion.active else margin)
        if not self._excursion.update(loss, above=loss > threshold):
            return []
        return [
            Finding(
                f"loss spiked to {loss:.4g} at step {obs.step} "
                f"(median of recent steps {median:.4g}, threshold {median + margin:.4g})",
                value=loss,
            )
        ]

    def resolution(self, finding: Finding, obs: Observation) -> str:
        median = self._excursion.window.median() if len(self._excursion.window) else math.nan
        return (f"loss back to {obs.loss:.4g} at step {obs.step} (recent median {median:.4g}), calm for "
                f"{self.settings.resolve_after} steps")
