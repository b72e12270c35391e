"""What the framework callbacks share: a probe run attached once the framework has built
its optimizer, the collector's `stop` and `checkpoint` actions turned into requests the
callback hands to the framework at its own safe point, and evaluation metrics logged as
values of the step they follow.

Defaults differ from a plain `attach` in two ways, both because a framework owns the loop:
the step's loss is what was backpropagated in it (`loss_from="backward"`: the sum over
accumulated micro-batches, as the framework reports it), and `stop` sets a flag the
framework honours instead of raising from inside its optimizer step.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gradwatch.probe import DisabledRun, Run, attach

log = logging.getLogger("gradwatch.probe")

_EVALUATION_WORDS = {"val", "valid", "validation", "eval"}
# Timings and bookkeeping a framework reports with its evaluation metrics.
_NOT_MEASURES = ("_runtime", "_samples_per_second", "_steps_per_second", "epoch")


def _words(key: str) -> set[str]:
    return {w for w in re.split(r"[/_.:\-]", key.lower()) if w}


def is_evaluation_metric(key: str) -> bool:
    """`val_loss`, `val/acc`, `loss/valid`, `eval_loss`: a metric of an evaluation."""
    return bool(_words(key) & _EVALUATION_WORDS)


def evaluation_values(metrics: Mapping[str, Any]) -> dict[str, float | torch.Tensor]:
    """The scalars of an evaluation, its loss under the name the detectors read (`val_loss`)."""
    values: dict[str, float | torch.Tensor] = {}
    for key, value in metrics.items():
        if key.endswith(_NOT_MEASURES) or isinstance(value, bool):
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
        elif not isinstance(value, (int, float)):
            continue
        words = _words(key) - {"epoch"}  # Lightning's on_epoch metrics end in _epoch
        is_loss = "loss" in words and len(words) == 2 and bool(words & _EVALUATION_WORDS)
        values["val_loss" if is_loss else key] = value
    return values


class FrameworkRun:
    """One probe run, driven by a framework callback's events."""

    def __init__(self, framework: str, options: Mapping[str, Any]) -> None:
        self.framework = framework
        self._options = dict(options)
        self._options.setdefault("loss_from", "backward")
        self._user_checkpoint: Callable[[int], Any] | None = self._options.pop("on_checkpoint", None)
        if self._options.pop("stop", "flag") != "flag":
            log.warning("gradwatch: under %s the stop action stops training the framework's way; "
                        "stop='raise' is ignored", framework)
        self.run: Run | DisabledRun | None = None
        self._checkpoint_requested = False
        self._warned_late = False

    def attach(self, model: Any, optimizer: Any, *, scaler: Any = None, name: str | None = None) -> None:
        """Attach to the framework's model and optimizer, with its GradScaler and its name for
        the run unless the user gave their own (`gradwatch.attach` never raises)."""
        if self.run is not None:
            return
        options = dict(self._options)
        for key, value in (("scaler", scaler), ("name", name)):
            if value is not None:
                options.setdefault(key, value)
        self.run = attach(model, optimizer, on_checkpoint=self._request_checkpoint, stop="flag", **options)

    def _request_checkpoint(self, step: int) -> None:
        self._checkpoint_requested = True
        if self._user_checkpoint is not None:
            self._user_checkpoint(step)

    @property
    def should_stop(self) -> bool:
        return self.run is not None and self.run.should_stop

    def take_checkpoint_request(self) -> bool:
        """Whether the collector asked for a checkpoint since the last call."""
        requested, self._checkpoint_requested = self._checkpoint_requested, False
        return requested

    def log_evaluation(self, metrics: Mapping[str, Any]) -> None:
        if self.run is None:
            if not self._warned_late:
                self._warned_late = True
                log.warning("gradwatch: an evaluation outside training is not recorded (the run attaches when "
                            "training starts and ends with it); evaluate during training to see it")
            return
        values = evaluation_values(metrics)
        if values:
            self.run.log(**values)

    def detach(self, status: str = "finished", reason: str = "") -> None:
        if self.run is not None:
            self.run.detach(status=status, reason=reason)
            self.run = None
