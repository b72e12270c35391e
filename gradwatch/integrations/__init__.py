"""Framework integrations: one callback each, for the loops most people train in.

- Hugging Face: ``Trainer(..., callbacks=[gradwatch.integrations.transformers.GradwatchCallback()])``
- Lightning: ``L.Trainer(callbacks=[gradwatch.integrations.lightning.GradwatchCallback()])``
  (``gradwatch.integrations.pytorch_lightning`` for the ``pytorch_lightning`` package)
- Accelerate needs none: ``gradwatch.attach(model, optimizer)`` takes the prepared optimizer.

Each module imports its framework; this package imports none, so the core never depends on them.
"""
