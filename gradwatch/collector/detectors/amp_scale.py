"""`amp_scale_collapse`: dynamic loss scaling that keeps overflowing instead of settling."""

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
from gradwatch.collector.detectors.stats import Latch


class AmpScaleCollapseSettings(DetectorSettings):
    min_scale: float = Field(
        1.0, ge=0, description="Collapse when the loss scale falls below this (at any step)."
    )
    warmup: int = Field(
        100, ge=0, description="Steps during which skips are not counted: GradScaler halves its way "
        "down from 65536 to a workable scale at the start."
    )
    max_consecutive_skips: int = Field(8, ge=1, description="Collapse at this many skipped steps in a row.")
    window: int = Field(500, ge=1, description="Steps over which skips are counted...")
    max_window_skips: int = Field(
        8, ge=1, description="...collapse at this many skips in the window (healthy: one per ~2000 steps)."
    )
    resolve_after: int = Field(
        50, ge=1, description="Consecutive steps with none of the conditions that resolve it."
    )


class AmpScaleCollapseDetector(Detector):
    """GradScaler halves the scale and skips the step on overflow and doubles it after 2000
    clean steps, so an occasional skip is healthy. Collapse is any of: the scale below
    `min_scale`, `max_consecutive_skips` skips in a row, or `max_window_skips` skips within
    `window` steps (after warm-up). Only steps that report a loss scale are judged."""

    kind = "amp_scale_collapse"
    Settings = AmpScaleCollapseSettings
    settings: AmpScaleCollapseSettings

    def __init__(self, settings: AmpScaleCollapseSettings | None = None) -> None:
        super().__init__(settings)
        self._latch = Latch(on_after=1, off_after=self.settings.resolve_after)
        self._consecutive_skips = 0
        self._skip_steps: deque[int] = deque()

    def check(self, obs: Observation) -> list[Finding] | None:
        if not finite(obs.loss_scale):
            return None
        s = self.settings
        counting = obs.step >= s.warmup
        self._consecutive_skips = self._consecutive_skips + 1 if obs.skipped else 0
        if obs.skipped and counting:
            self._skip_steps.append(obs.step)
        while self._skip_steps and self._skip_steps[0] <= obs.step - s.window:
            self._skip_steps.popleft()
        reasons = []
        if obs.loss_scale < s.min_scale:
            reasons.append(f"loss scale {obs.loss_scale:g} is below {s.min_scale:g}")
        if counting and self._consecutive_skips >= s.max_consecutive_skips:
            reasons.append(f"{self._consecutive_skips} consecutive skipped steps")
        if len(self._skip_steps) >= s.max_window_skips:
            reasons.append(f"{len(self._skip_steps)} skipped steps in the last {s.window}")
        if not self._latch.update(bool(reasons)):
            return []
        return [Finding(f"loss scaling collapsed at step {obs.step}: {'; '.join(reasons)}")]

    def resolution(self, finding: Finding, obs: Observation) -> str:
        return (f"loss scale {obs.loss_scale:g} at step {obs.step}, no overflow streak for "
                f"{self.settings.resolve_after} steps")
