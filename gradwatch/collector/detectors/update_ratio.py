"""`update_ratio`: a layer's step ||Δw|| / ||w|| persistently far outside the healthy band."""

from __future__ import annotations

import math
import re
from itertools import compress

from pydantic import Field, field_validator

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
    finite,
    layer_value,
)
from gradwatch.collector.detectors.stats import Latch, all_finite, compiled, max_lr


class UpdateRatioSettings(DetectorSettings):
    warmup: int = Field(
        100, ge=0, description="Optimizer steps before the first judgement (fresh zero-initialised "
        "weights move by a large fraction of themselves at first)."
    )
    max_ratio: float = Field(
        0.05, gt=0, description="Too large: the layer rewrites 5% of itself per step (healthy: ~1e-3)."
    )
    min_ratio: float = Field(
        1e-7, ge=0, description="Too small: the layer barely moves although it has a gradient (not at "
        "all, a ratio of exactly 0, is `not_updated`'s finding)."
    )
    min_grad_to_weight: float = Field(
        1e-4, ge=0, description="The too-small rule only judges layers with ||g|| / ||w|| at least "
        "this: a converged layer with a negligible gradient is meant to stand still."
    )
    annealed_lr_fraction: float = Field(
        0.01, ge=0, description="The too-small rule is off while the LR is below this fraction of "
        "its peak so far: the end of a decay schedule stands still by design."
    )
    patience: int = Field(
        3, ge=1, description="Consecutive detail observations outside the band to fire (inside to resolve)."
    )
    ignore_layers: str = Field(
        r"(^|\.)bias$", description="Regex of layer names not judged: biases start at zero and often "
        "stay near it, so their ratio is large and meaningless."
    )
    min_weight_norm: float = Field(
        1e-8, ge=0, description="Layers with a smaller weight norm are skipped."
    )

    @field_validator("ignore_layers")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        return compiled(pattern).pattern


class UpdateRatioDetector(Detector):
    """Per layer, on detail steps that were not skipped: the update-to-weight ratio is above
    `max_ratio`, or below `min_ratio` while the layer has a real gradient (the optimizer
    does not update it, or its LR is far too small), for `patience` detail observations.
    The too-small rule rests while the LR has annealed to a small fraction of its peak.
    Frozen layers are not trained, so never judged: an episode ends when its layer freezes."""

    kind = "update_ratio"
    Settings = UpdateRatioSettings
    settings: UpdateRatioSettings

    def __init__(self, settings: UpdateRatioSettings | None = None) -> None:
        super().__init__(settings)
        self._latches: dict[str, Latch] = {}
        self._ignored = re.compile(self.settings.ignore_layers)
        self._judged_for: tuple[tuple[str, ...], frozenset[int]] | None = None
        self._judged_mask: tuple[bool, ...] = ()
        self._frozen_names: frozenset[str] = frozenset()
        self._peak_lr = 0.0

    def check(self, obs: Observation) -> list[Finding] | None:
        lr = max_lr(obs.lr)
        self._peak_lr = max(self._peak_lr, lr or 0.0)
        if obs.layer_update_ratio is None or obs.layer_weight_norm is None or obs.skipped:
            return None  # a skipped step updated nothing: its zero ratios mean nothing
        s = self.settings
        if obs.step < s.warmup:
            return []
        judged = self._judged(obs.layers, obs.layer_frozen)
        for name in self._frozen_names.intersection(self._latches):
            del self._latches[name]  # frozen: no longer trained, its alert resolves
        if not self._latches:  # screen the usual all-in-band vector in C before the per-layer loop
            ratios = tuple(compress(obs.layer_update_ratio, judged))
            if all_finite(ratios) and s.min_ratio <= min(ratios, default=s.min_ratio) \
                    and max(ratios, default=s.max_ratio) <= s.max_ratio:
                return []
        grads = obs.layer_grad_norm or (None,) * len(obs.layers)
        annealed = lr is not None and lr <= s.annealed_lr_fraction * self._peak_lr
        findings = []
        per_layer = zip(obs.layers, judged, obs.layer_update_ratio, obs.layer_weight_norm, grads)
        for name, judged, ratio, weight, grad in per_layer:
            latch = self._latches.get(name)
            if judged and ratio is not None and weight is not None and s.min_weight_norm < weight < math.inf \
                    and math.isfinite(ratio):
                out_of_band = ratio > s.max_ratio or (
                    not annealed
                    and 0 < ratio < s.min_ratio  # exactly 0 with a gradient is `not_updated`'s
                    and finite(grad)
                    and grad / weight >= s.min_grad_to_weight
                )
                if latch is None:
                    if not out_of_band:
                        continue  # in band with no history: the common case keeps no state
                    latch = self._latches[name] = Latch(s.patience, s.patience)
                latch.update(out_of_band)
                if latch.idle:
                    del self._latches[name]
                    continue
            # else: this layer cannot be judged at this step, its state stands
            if latch is not None and latch.active:
                findings.append(self.active.get(name) or self._finding(name, ratio))
        return findings

    def _judged(self, layers: tuple[str, ...], frozen: frozenset[int]) -> tuple[bool, ...]:
        """Which layers are judged: not frozen and not ignored by `ignore_layers`; computed
        once per layout and frozen set (a regex search per layer per detail step dominated
        ingest time)."""
        cached = self._judged_for
        if cached is None or cached[0] is not layers or cached[1] != frozen:
            self._judged_for = (layers, frozen)
            self._judged_mask = tuple(
                i not in frozen and not self._ignored.search(name) for i, name in enumerate(layers)
            )
            self._frozen_names = frozenset(layers[i] for i in frozen if i < len(layers))
        return self._judged_mask

    def resolution(self, finding: Finding, obs: Observation) -> str:
        if finding.layer is not None and finding.layer in obs.layers and obs.layers.index(finding.layer) in obs.layer_frozen:
            return f"layer {finding.layer} frozen at step {obs.step}"
        ratio = layer_value(obs, obs.layer_update_ratio, finding.layer)
        now = f" at {ratio:.3g}" if finite(ratio) else ""
        return f"layer {finding.layer} update/weight ratio back in band{now} at step {obs.step}"

    def _finding(self, name: str, ratio: float) -> Finding:
        """The finding at onset: the latch only turns on at a step that judged `ratio`."""
        s = self.settings
        where = f"above {s.max_ratio:g}" if ratio > s.max_ratio else f"below {s.min_ratio:g}"
        return Finding(
            f"layer {name} update/weight ratio {ratio:.3g} is {where}", layer=name, value=ratio
        )
