"""Lightning under its older package name: ``pl.Trainer(callbacks=[GradwatchCallback()])``.

Same callback as `gradwatch.integrations.lightning`, subclassing `pytorch_lightning.Callback`
(Lightning accepts only callbacks of its own package).
"""

from __future__ import annotations

from pytorch_lightning import Callback

from gradwatch.integrations.lightning_hooks import LightningHooks

__all__ = ["GradwatchCallback"]


class GradwatchCallback(LightningHooks, Callback):
    pass
