"""Lightning (the `lightning` package): ``L.Trainer(callbacks=[GradwatchCallback()])``.

    from gradwatch.integrations.lightning import GradwatchCallback
    trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[GradwatchCallback(name="resnet")])

Keywords are `gradwatch.attach`'s. What is recorded, and how actions act: see
`gradwatch.integrations.lightning_hooks`. For the `pytorch_lightning` package use
`gradwatch.integrations.pytorch_lightning.GradwatchCallback`.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from gradwatch.integrations.lightning_hooks import LightningHooks

__all__ = ["GradwatchCallback"]


class GradwatchCallback(LightningHooks, Callback):
    pass
