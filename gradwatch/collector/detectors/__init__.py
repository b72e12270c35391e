"""The detectors: small pure state machines, one per alert kind, observation in, alerts out.

The collector builds one set per run from its config and feeds every merged step:

    detectors = build_detectors(DetectorsConfig.model_validate(toml["detectors"]))
    events = [e for d in detectors for e in d.observe(obs)]

Each kind's rule, defaults, latency and blind spots are in docs/detectors.md.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gradwatch.collector.detectors.accumulating import (
    AccumulatingGradientsDetector,
    AccumulatingGradientsSettings,
)
from gradwatch.collector.detectors.amp_scale import (
    AmpScaleCollapseDetector,
    AmpScaleCollapseSettings,
)
from gradwatch.collector.detectors.base import (
    AlertEvent,
    Detector,
    DetectorSettings,
    Finding,
    Observation,
)
from gradwatch.collector.detectors.dead_layer import (
    DeadLayerDetector,
    DeadLayerSettings,
)
from gradwatch.collector.detectors.divergence import (
    DivergenceDetector,
    DivergenceSettings,
)
from gradwatch.collector.detectors.exploding import (
    ExplodingGradientsDetector,
    ExplodingGradientsSettings,
)
from gradwatch.collector.detectors.loss_spike import (
    LossSpikeDetector,
    LossSpikeSettings,
)
from gradwatch.collector.detectors.nonfinite import NonfiniteDetector, NonfiniteSettings
from gradwatch.collector.detectors.not_learning import (
    NotLearningDetector,
    NotLearningSettings,
)
from gradwatch.collector.detectors.not_updated import (
    NotUpdatedDetector,
    NotUpdatedSettings,
)
from gradwatch.collector.detectors.overfitting import (
    OverfittingDetector,
    OverfittingSettings,
)
from gradwatch.collector.detectors.plateau import PlateauDetector, PlateauSettings
from gradwatch.collector.detectors.update_ratio import (
    UpdateRatioDetector,
    UpdateRatioSettings,
)
from gradwatch.collector.detectors.vanishing import (
    VanishingGradientsDetector,
    VanishingGradientsSettings,
)

DETECTORS: dict[str, type[Detector]] = {
    detector.kind: detector
    for detector in (
        NonfiniteDetector,
        ExplodingGradientsDetector,
        VanishingGradientsDetector,
        DeadLayerDetector,
        LossSpikeDetector,
        PlateauDetector,
        OverfittingDetector,
        AmpScaleCollapseDetector,
        UpdateRatioDetector,
        DivergenceDetector,
        NotLearningDetector,
        NotUpdatedDetector,
        AccumulatingGradientsDetector,
    )
}


class DetectorsConfig(BaseModel):
    """The `[detectors.<kind>]` tables of the collector's TOML config; every field defaults."""

    model_config = ConfigDict(extra="forbid")

    nonfinite: NonfiniteSettings = Field(default_factory=NonfiniteSettings)
    exploding_gradients: ExplodingGradientsSettings = Field(default_factory=ExplodingGradientsSettings)
    vanishing_gradients: VanishingGradientsSettings = Field(default_factory=VanishingGradientsSettings)
    dead_layer: DeadLayerSettings = Field(default_factory=DeadLayerSettings)
    loss_spike: LossSpikeSettings = Field(default_factory=LossSpikeSettings)
    plateau: PlateauSettings = Field(default_factory=PlateauSettings)
    overfitting: OverfittingSettings = Field(default_factory=OverfittingSettings)
    amp_scale_collapse: AmpScaleCollapseSettings = Field(default_factory=AmpScaleCollapseSettings)
    update_ratio: UpdateRatioSettings = Field(default_factory=UpdateRatioSettings)
    divergence: DivergenceSettings = Field(default_factory=DivergenceSettings)
    not_learning: NotLearningSettings = Field(default_factory=NotLearningSettings)
    not_updated: NotUpdatedSettings = Field(default_factory=NotUpdatedSettings)
    accumulating_gradients: AccumulatingGradientsSettings = Field(default_factory=AccumulatingGradientsSettings)


def build_detectors(config: DetectorsConfig | None = None) -> list[Detector]:
    """Fresh detector instances (their state belongs to one run) for every enabled kind."""
    config = config if config is not None else DetectorsConfig()
    detectors = []
    for kind, detector in DETECTORS.items():
        settings: DetectorSettings = getattr(config, kind)
        if settings.enabled:
            detectors.append(detector(settings))
    return detectors


__all__ = [
    "DETECTORS",
    "AlertEvent",
    "Detector",
    "DetectorSettings",
    "DetectorsConfig",
    "Finding",
    "Observation",
    "build_detectors",
]
