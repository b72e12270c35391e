"""`dead_layer`: a trainable layer that gets no gradient, or an all-zero one, for a while.
A frozen layer gets none by design: it is never judged."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pydantic import Field, field_validator

from gradwatch.collector.detectors.base import (
    Detector,
    DetectorSettings,
    Finding,
    Observation,
    finite,
    layer_value,
)
from gradwatch.collector.detectors.stats import all_finite, compiled


class DeadLayerSettings(DetectorSettings):
    patience: int = Field(
        5, ge=1, description="Consecutive per-layer detail observations with no gradient."
    )
    min_steps: int = Field(
        40, ge=0, description="...spanning at least this many optimizer steps (matters when every=1)."
    )
    zero_norm: float = Field(
        1e-10, ge=0, description="A layer gradient norm at or below this counts as no gradient."
    )
    ignore_layers: str = Field(
        r"(^|\.)(key|k_proj|k_lin|to_k)\.bias$", description="Regex of layer names not judged: the "
        "bias of an attention key projection gets an exactly zero gradient by design (softmax "
        "ignores a shift shared by all keys), as in BERT, RoBERTa, ViT, BART and OPT."
    )

    @field_validator("ignore_layers")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        return compiled(pattern).pattern


@dataclass
class _Silence:
    since_step: int
    observations: int = 0


class DeadLayerDetector(Detector):
    """Per layer not frozen: its gradient is None (no trainable parameter of it got one) or
    <= zero_norm on `patience` consecutive detail observations spanning `min_steps` steps.
    One alert per layer; resolves on the first detail observation with a gradient, or in
    which the layer is frozen (a frozen layer's silence does not count: it starts afresh)."""

    kind = "dead_layer"
    Settings = DeadLayerSettings
    settings: DeadLayerSettings

    def __init__(self, settings: DeadLayerSettings | None = None) -> None:
        super().__init__(settings)
        self._silent: dict[str, _Silence] = {}
        self._ignored = re.compile(self.settings.ignore_layers)

    def check(self, obs: Observation) -> list[Finding] | None:
        if obs.layer_grad_norm is None:
            return None
        s = self.settings
        grads = obs.layer_grad_norm
        if not self._silent and all_finite(grads) and min(grads, default=math.inf) > s.zero_norm:
            return []  # every layer alive and none was silent: the common case, screened in C
        silent: dict[str, _Silence] = {}
        findings = []
        frozen = obs.layer_frozen
        for i, (name, grad) in enumerate(zip(obs.layers, obs.layer_grad_norm)):
            if grad is not None and s.zero_norm < grad < math.inf:
                continue  # alive: the common case, kept cheap (this runs for every layer)
            if i in frozen or self._ignored.search(name):
                continue
            silence = self._silent.get(name)
            if grad is None or (finite(grad) and grad <= s.zero_norm):
                silence = silence or _Silence(obs.step)
                silence.observations += 1
            # a NaN says nothing about being dead: the count stands, neither grows nor resets
            if silence is None:
                continue
            silent[name] = silence
            if silence.observations >= s.patience and obs.step - silence.since_step >= s.min_steps:
                findings.append(
                    Finding(
                        f"layer {name} got no gradient (None or zero) since step {silence.since_step}",
                        layer=name,
                    )
                )
        self._silent = silent  # layers that got a gradient, froze or left the model start afresh
        return findings

    def resolution(self, finding: Finding, obs: Observation) -> str:
        grad = layer_value(obs, obs.layer_grad_norm, finding.layer)
        if finite(grad) and grad > self.settings.zero_norm:
            return f"layer {finding.layer} gets a gradient again at step {obs.step} (norm {grad:.3g})"
        return f"layer {finding.layer} frozen, or no longer reported, at step {obs.step}"
