"""`exploding_gradients`: the global gradient norm far above its recent robust baseline."""

from __future__ import annotations

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
from gradwatch.collector.detectors.stats import Excursion, RollingWindow, first_finite

# The tail reference leaves out the latest accepted norms: a growth of less than `max_factor`
# per step would otherwise raise the reference as fast as the norm and never be caught.
_TAIL_LAG = 20


class ExplodingGradientsSettings(DetectorSettings):
    window: int = Field(
        100, ge=8, description="Recent non-exploding steps whose median is the baseline."
    )
    warmup: int = Field(
        100, ge=2, description="Finite gradient norms seen before the first judgement."
    )
    factor: float = Field(
        10.0, gt=1, description="Exploding when the norm exceeds factor * median..."
    )
    max_factor: float = Field(
        2.0, ge=0, description="...and this multiple of the largest norm of the window (but the "
        "latest 20): small batches have heavy-tailed norms (a batch of hard examples) that "
        "explosions outgrow..."
    )
    min_norm: float = Field(
        0.01, ge=0, description="...and this absolute norm (tiny norms growing is not an explosion)."
    )
    confirm_steps: int = Field(
        2, ge=1, description="Consecutive steps above the threshold needed to fire "
        "(one odd batch is not an explosion)."
    )
    resolve_after: int = Field(
        20, ge=1, description="Consecutive steps below half the threshold that resolve it."
    )
    loss_rise: float = Field(
        0.1, ge=0, description="Under clipping, an explosion while the median of the latest 5 losses "
        "is within this fraction above the median loss of the non-exploding window is an `info` "
        "note: clipping keeps the updates bounded and the run is fine."
    )


class ExplodingGradientsDetector(Detector):
    """The global gradient norm (pre-clip when the user clips, since clipping hides an
    explosion) exceeds `factor` times the median of its recent non-exploding window, twice
    its largest value and an absolute floor, on `confirm_steps` consecutive steps. A warning;
    under clipping while the loss is not rising, an `info` note (a growing pre-clip norm is
    common as a clipped recurrent net starts to learn)."""

    kind = "exploding_gradients"
    Settings = ExplodingGradientsSettings
    settings: ExplodingGradientsSettings

    def __init__(self, settings: ExplodingGradientsSettings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        self._excursion = Excursion(s.window, s.warmup, s.confirm_steps, s.resolve_after)
        self._latest: deque[float] = deque(maxlen=_TAIL_LAG)
        self._lagged = RollingWindow(s.window)
        self._losses = RollingWindow(s.window)  # losses of non-exploding steps
        self._latest_losses: deque[float] = deque(maxlen=5)

    def check(self, obs: Observation) -> list[Finding] | None:
        norm = first_finite(obs.grad_norm_preclip, obs.grad_norm)
        if norm is None or obs.skipped:
            return None  # AMP overflow steps are `nonfinite` / `amp_scale_collapse` matters
        if finite(obs.loss):
            self._latest_losses.append(obs.loss)
        if self._excursion.warming_up:
            self._excursion.warm(norm)
            self._accept(norm)
            return []
        s = self.settings
        median = self._excursion.window.median()
        tail = self._lagged.max() if len(self._lagged) else 0.0
        threshold = max(s.factor * median, s.max_factor * tail, s.min_norm)
        above = norm > (threshold / 2 if self._excursion.active else threshold)
        if not above:
            self._accept(norm)
            if finite(obs.loss):
                self._losses.add(obs.loss)
        if not self._excursion.update(norm, above):
            return []
        message = (f"gradient norm {norm:.4g} at step {obs.step} is past its threshold "
                   f"{threshold:.4g} (recent median {median:.4g})")
        if obs.grad_norm_preclip is not None and not self._loss_rising():
            # Clipping bounds the update, and the loss is fine: a note, not an alarm.
            return [Finding(message + " before clipping, while the loss is not rising", "info", value=norm,
                            hint="Clipping is containing it; if the loss starts rising, lower the LR.")]
        return [Finding(message, value=norm)]

    def _loss_rising(self) -> bool:
        """The latest losses' median above the non-exploding steps' median by the
        `loss_rise` fraction (or no losses to tell: assume the worst)."""
        if len(self._losses) < 5 or not self._latest_losses:
            return True
        baseline = self._losses.median()
        return statistics.median(self._latest_losses) > baseline + self.settings.loss_rise * abs(baseline)

    def resolution(self, finding: Finding, obs: Observation) -> str:
        norm = first_finite(obs.grad_norm_preclip, obs.grad_norm)
        return (f"gradient norm back to {norm:.4g} at step {obs.step}, under half the threshold for "
                f"{self.settings.resolve_after} steps")

    def _accept(self, norm: float) -> None:
        """Feed a non-exploding norm to the tail reference, `_TAIL_LAG` steps late."""
        if len(self._latest) == _TAIL_LAG:
            self._lagged.add(self._latest[0])
        self._latest.append(norm)
