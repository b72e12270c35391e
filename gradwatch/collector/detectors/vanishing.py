"""`vanishing_gradients`: the gradient signal dies out before it reaches the input-side layers."""

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


class VanishingGradientsSettings(DetectorSettings):
    warmup: int = Field(100, ge=0, description="Optimizer steps before the first judgement.")
    edge_layers: int = Field(
        2, ge=1, description="How many layers at each end form the input side and the output side."
    )
    max_ratio: float = Field(
        1e-3, gt=0, description="Vanishing when input-side / output-side gradient norm is below this..."
    )
    max_input_norm: float = Field(
        1e-4, gt=0, description="...and the input-side gradient norm is below this."
    )
    patience: int = Field(
        3, ge=1, description="Consecutive detail observations the condition must hold to fire "
        "(and be gone to resolve)."
    )


class VanishingGradientsDetector(Detector):
    """AUTOTRAINER's rule on the per-layer detail: the largest gradient norm among the first
    `edge_layers` layers (in the model's parameter order) is below `max_ratio` times the
    largest among the last ones, and below `max_input_norm` in absolute terms. Frozen layers
    are left out: with a frozen backbone, the input side is the first layers that train.

    A tiny *global* norm alone (SageMaker's mean |g| < 1e-7) is deliberately not a finding:
    a converged model with a loss near zero has one legitimately; an all-zero network is
    `dead_layer`'s finding."""

    kind = "vanishing_gradients"
    Settings = VanishingGradientsSettings
    settings: VanishingGradientsSettings

    def __init__(self, settings: VanishingGradientsSettings | None = None) -> None:
        super().__init__(settings)
        self._latch = Latch(self.settings.patience, self.settings.patience)
        self._ratio = math.nan  # input side / output side at the latest judged detail step

    def check(self, obs: Observation) -> list[Finding] | None:
        if obs.layer_grad_norm is None:
            return None
        grads = obs.layer_grad_norm
        if obs.layer_frozen:
            grads = tuple(g for i, g in enumerate(grads) if i not in obs.layer_frozen)
        norms = grads if all_finite(grads) else [g for g in grads if g is not None and math.isfinite(g)]
        if len(norms) < 2:
            return None
        if obs.step < self.settings.warmup:
            return []
        edge = max(1, min(self.settings.edge_layers, len(norms) // 2))
        input_side, output_side = max(norms[:edge]), max(norms[-edge:])
        ratio = input_side / output_side if output_side > 0 else 1.0  # all zero: dead, not vanishing
        self._ratio = ratio
        vanishing = ratio < self.settings.max_ratio and input_side < self.settings.max_input_norm
        if not self._latch.update(vanishing):
            return []
        return [
            Finding(
                f"input-side gradient norm {input_side:.3g} is {ratio:.2g} of the output side's "
                f"{output_side:.3g}",
                value=ratio,
            )
        ]

    def resolution(self, finding: Finding, obs: Observation) -> str:
        return (f"input-side gradient norm back to {self._ratio:.2g} of the output side's at step {obs.step}, "
                f"for {self.settings.patience} detail observations")
