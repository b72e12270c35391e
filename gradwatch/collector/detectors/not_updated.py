"""`not_updated`: a layer that has a gradient but that the optimizer never moves."""

from __future__ import annotations

from pydantic import Field

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
    finite,
)
from gradwatch.collector.detectors.stats import Latch


class NotUpdatedSettings(DetectorSettings):
    patience: int = Field(
        2, ge=1, description="Consecutive detail observations with a gradient and no update to fire "
        "(and with an update to resolve)."
    )
    min_grad_to_weight: float = Field(
        1e-4, ge=0, description="A layer counts as having a gradient when ||g|| / ||w|| is at least "
        "this (a smaller gradient can leave float32 weights bit-identical after a real update)."
    )


class NotUpdatedDetector(Detector):
    """Per layer that is not frozen, on detail steps that were not skipped and where every
    param group has a non-zero LR (or none is reported): the layer has a real gradient and its update ||Δw|| is exactly zero, for
    `patience` detail observations: its parameters are in no param group of the optimizer
    (or the probe watches an optimizer that does not own them). Needs the probe's update
    ratios (on by default); with `layers="module"`, a layer with some of its parameters
    in the optimizer still moves and is not flagged."""

    kind = "not_updated"
    Settings = NotUpdatedSettings
    settings: NotUpdatedSettings

    def __init__(self, settings: NotUpdatedSettings | None = None) -> None:
        super().__init__(settings)
        self._latches: dict[str, Latch] = {}

    def check(self, obs: Observation) -> list[Finding] | None:
        ratios, grads, weights = obs.layer_update_ratio, obs.layer_grad_norm, obs.layer_weight_norm
        if ratios is None or grads is None or weights is None or obs.skipped:
            return None  # no detail, or a skipped step: nothing moved by design
        if obs.lr and (min(obs.lr) <= 0 or not all(map(finite, obs.lr))):
            return None  # a zero LR (a schedule's first or last step) moves nothing either
        if not self._latches and 0.0 not in ratios:
            return []  # every layer moved and none was suspect: the common case
        s = self.settings
        findings = []
        frozen = obs.layer_frozen
        for i, (name, ratio, grad, weight) in enumerate(zip(obs.layers, ratios, grads, weights)):
            stuck = (ratio == 0.0 and finite(grad) and finite(weight) and grad > s.min_grad_to_weight * weight
                     and i not in frozen)  # a frozen layer's stale gradient is no finding
            latch = self._latches.get(name)
            if latch is None:
                if not stuck:
                    continue
                latch = self._latches[name] = Latch(s.patience, s.patience)
            if latch.update(stuck):
                # the latch only turns on at a stuck observation, whose gradient is finite
                findings.append(self.active.get(name) or Finding(
                    f"layer {name} has a gradient (norm {grad:.3g}) but the optimizer did not move it "
                    f"at step {obs.step}",
                    layer=name,
                    value=grad,
                ))
            elif latch.idle:
                del self._latches[name]
        return findings

    def resolution(self, finding: Finding, obs: Observation) -> str:
        return f"layer {finding.layer} moving again at step {obs.step}"
