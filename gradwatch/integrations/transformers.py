"""Hugging Face Trainer: ``Trainer(..., callbacks=[GradwatchCallback()])``.

    from gradwatch.integrations.transformers import GradwatchCallback
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[GradwatchCallback(name="bert-ft")])

Keywords are `gradwatch.attach`'s. The probe attaches in `on_train_begin`, when the Trainer
has built and prepared its optimizer, to the optimizer inside Accelerate's wrapper and with
its GradScaler (fp16). What it records matches what the Trainer logs:

- one record per optimizer step, numbered like ``state.global_step`` (a step GradScaler
  skipped is a record marked skipped);
- the loss of a step is the sum of the losses backpropagated in it, the Trainer's own
  ``tr_loss`` (with gradient accumulation each micro-batch's loss is normalised by the
  whole batch's tokens, so the model's output alone is a part of it); the Trainer's logged
  ``loss`` is its mean over the logging window;
- the pre-clip gradient norm is the Trainer's ``grad_norm``;
- ``on_evaluate`` metrics (``eval_loss`` as ``val_loss``, and the rest) belong to the step
  they follow, the last evaluation included; the run ends in ``on_train_end``.

Actions (``actions=True``): ``stop`` sets ``control.should_training_stop`` and ``checkpoint``
``control.should_save`` at the end of the step; ``reduce_lr`` scales the LR around each
optimizer step, under the Trainer's scheduler; ``skip_step`` skips the optimizer step.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from gradwatch.integrations.framework import FrameworkRun

__all__ = ["GradwatchCallback"]


class GradwatchCallback(TrainerCallback):
    def __init__(self, **attach_options: Any) -> None:
        self.probe = FrameworkRun("the Hugging Face Trainer", attach_options)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # transformers 4.x defaults run_name to output_dir, shared by every run of a script
        named = args.run_name if args.run_name and args.run_name != args.output_dir else None
        self.probe.attach(kwargs.get("model"), kwargs.get("optimizer"), name=named)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.probe.should_stop:
            control.should_training_stop = True
        if self.probe.take_checkpoint_request():
            control.should_save = True

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        metrics: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        self.probe.log_evaluation(metrics or {})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.probe.detach()
