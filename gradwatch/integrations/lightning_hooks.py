"""The Lightning callback's hooks, for both packages Lightning ships as (`lightning` and
`pytorch_lightning`): each module subclasses its own package's `Callback` with these, since
Lightning accepts only callbacks of its own class. Nothing here imports either package.

The probe attaches in `on_train_start`, when the strategy has set up the module and its
optimizers, to the first optimizer (inside Lightning's wrapper) with the precision
plugin's GradScaler (`precision="16-mixed"`). What it records matches what Lightning does:

- one record per optimizer step, numbered like ``trainer.global_step``;
- the loss of a step is the sum of the losses backpropagated in it: with
  ``accumulate_grad_batches=N`` Lightning divides the loss `training_step` returns by N
  before `backward`, so the sum is the mean of the returned losses over the step;
- the pre-clip gradient norm comes from Lightning's own ``clip_grad_norm_`` call
  (``gradient_clip_val``);
- the metrics logged in validation (``val_loss`` and ``val/loss`` as the overfitting
  detector's ``val_loss``, the rest as they are named) belong to the step they follow; the
  sanity check is not an evaluation of the run. The run ends in ``on_train_end``, or as
  crashed in ``on_exception``.

Under ``strategy="ddp"`` each process attaches its own probe, one rank of the same run.
Actions (``actions=True``): ``stop`` sets ``trainer.should_stop``; ``checkpoint`` calls
``trainer.save_checkpoint`` (every rank, as Lightning requires) into the checkpoint
callback's directory; ``reduce_lr`` and ``skip_step`` act on the optimizer step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gradwatch.integrations.framework import FrameworkRun, is_evaluation_metric

log = logging.getLogger("gradwatch.probe")


class LightningHooks:
    """Mixed into `Callback` of `lightning.pytorch` or of `pytorch_lightning`."""

    def __init__(self, **attach_options: Any) -> None:
        super().__init__()
        self.probe = FrameworkRun("Lightning", attach_options)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            log.warning("gradwatch: this module has %d optimizers; the probe measures the first "
                        "(attach a run per model in `training_step` to measure the others)", len(optimizers))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.probe.attach(pl_module, optimizers[0] if optimizers else None, scaler=scaler)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.probe.should_stop:
            trainer.should_stop = True
        if self.probe.take_checkpoint_request():
            checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None) \
                or os.path.join(trainer.default_root_dir, "checkpoints")
            trainer.save_checkpoint(os.path.join(checkpoints, f"gradwatch-step={trainer.global_step}.ckpt"))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self.probe.log_evaluation(
            {key: value for key, value in trainer.callback_metrics.items() if is_evaluation_metric(key)}
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.probe.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.probe.detach(status="crashed", reason=f"{type(exception).__name__}: {exception}"[:500])
