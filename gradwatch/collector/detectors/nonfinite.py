"""`nonfinite`: a NaN or an infinity in the loss or the gradients."""

from __future__ import annotations

import math

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
)
from gradwatch.collector.detectors.stats import Latch, all_finite


class NonfiniteSettings(DetectorSettings):
    resolve_after: int = Field(
        10, ge=1, description="Consecutive finite steps after which the alert resolves."
    )
    tolerate_amp_skips: bool = Field(
        True,
        description="Ignore non-finite gradients on steps that GradScaler skipped: overflow "
        "followed by a skip is how dynamic loss scaling works (`amp_scale_collapse` watches "
        "for too many of them).",
    )


class NonfiniteDetector(Detector):
    """Fires on the first step whose loss, global gradient norm or any layer's gradient is
    not finite (latency 0), unless GradScaler handled it by skipping the step."""

    kind = "nonfinite"
    Settings = NonfiniteSettings
    settings: NonfiniteSettings

    def __init__(self, settings: NonfiniteSettings | None = None) -> None:
        super().__init__(settings)
        self._latch = Latch(on_after=1, off_after=self.settings.resolve_after)

    def check(self, obs: Observation) -> list[Finding]:
        culprits = _nonfinite_parts(obs)
        if obs.skipped and obs.loss_scale is not None and self.settings.tolerate_amp_skips:
            culprits = []
        if not self._latch.update(bool(culprits)):
            return []
        return [Finding(f"non-finite {', '.join(culprits)} at step {obs.step}", "critical")]

    def resolution(self, finding: Finding, obs: Observation) -> str:
        return f"loss and gradients finite for {self.settings.resolve_after} steps, to step {obs.step}"


def _nonfinite_parts(obs: Observation) -> list[str]:
    parts = []
    if obs.loss is not None and not math.isfinite(obs.loss):
        parts.append(f"loss ({obs.loss})")
    norm = next((n for n in (obs.grad_norm_preclip, obs.grad_norm) if n is not None), None)
    if norm is not None and not math.isfinite(norm):
        parts.append(f"gradient norm ({norm})")
    layer_count = obs.nonfinite_layers
    if obs.layer_grad_norm is not None and not all_finite(obs.layer_grad_norm):
        bad = sum(1 for g in obs.layer_grad_norm if g is not None and not math.isfinite(g))
        layer_count = max(layer_count, bad)
    if layer_count:
        parts.append(f"gradients in {layer_count} layer(s)")
    return parts
