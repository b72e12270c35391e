"""The probe: lives inside the training process, measures, and never gets in the way.

    import gradwatch
    run = gradwatch.attach(model, optimizer)   # or: from gradwatch import probe; probe.attach(...)

Importing this package does not import torch (`attach` does): the probe's torch-free parts,
such as the outbox that `gradwatch ingest` reuses, load without it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from gradwatch.probe.landscape import LandscapeResult
    from gradwatch.probe.run import Run

__all__ = ["Run", "attach"]

log = logging.getLogger("gradwatch.probe")


def attach(model: Any, optimizer: Any = None, **options: Any) -> Run | DisabledRun:
    """Attach a probe to `model` (and `optimizer`, if there is one) and return its `Run`.

    Options (all keywords): ``scaler`` (a GradScaler, for loss scale and skipped steps),
    ``name`` (run name; default $GRADWATCH_RUN or script-time-pid), ``url`` (default
    $GRADWATCH_URL or ws://127.0.0.1:8765; ``file:PATH`` writes a JSONL spool),
    ``every`` (per-layer detail every N optimizer steps, default 10), ``layers``
    ('param', 'module', a prefix depth, or a compiled regex), ``loss_fn`` (a loss module
    whose output is the loss), ``loss_from`` ('auto', or 'backward': the step's loss is the
    sum of the losses backpropagated in it, for models that return a part of it),
    ``actions`` (accept actions from the collector, default False), ``on_checkpoint``
    (callback for the checkpoint action), ``stop`` ('raise' or 'flag'), ``tags``,
    ``token`` (default $GRADWATCH_TOKEN), ``update_ratio`` (measure ||Δw||/||w|| on
    detail steps, default True), ``buffer`` (steps kept while the collector is
    unreachable, default 10000).

    With GRADWATCH_DISABLE=1 nothing is hooked and the returned run does nothing.

    `attach` never raises into training: an optimizer wrapper is unwrapped (`.optimizer`),
    attaching twice to one optimizer returns the run already attached, and anything else it
    cannot handle logs one warning saying what to do and returns a run that does nothing.
    """
    if os.environ.get("GRADWATCH_DISABLE", "").lower() in ("1", "true", "yes"):
        return DisabledRun(model)
    try:
        from gradwatch.probe.run import Run

        existing = _attached(model, optimizer)
        if existing is not None:
            log.warning("gradwatch: run %r is already attached to this model/optimizer; returning it "
                        "(detach it first to start another run)", existing.name)
            return existing
        return Run(model, optimizer, **options)
    except Exception as error:  # training comes first: a probe that cannot attach stays out
        log.warning("gradwatch: could not attach, training continues without the probe: %s", error,
                    exc_info=not isinstance(error, (TypeError, ValueError)))
        return DisabledRun(model)


def _attached(model: Any, optimizer: Any) -> Run | None:
    """The live run already attached to this model or optimizer, if any."""
    from gradwatch.probe.environment import unwrap_optimizer
    from gradwatch.probe.run import Run

    for run in list(Run.live):
        if run.model is model or (optimizer is not None and run.optimizer is unwrap_optimizer(optimizer)[0]):
            return run
    return None


class DisabledRun:
    """What `attach` returns under GRADWATCH_DISABLE=1: the Run API, doing nothing."""

    should_stop = False
    dropped = 0
    step = 0

    def __init__(self, model: Any = None) -> None:
        self.model = model

    def landscape(self, batches: Any, *args: Any, **options: Any) -> LandscapeResult:
        """The slice still runs (a diagnostic the caller reads, not the probe); nothing is logged."""
        from gradwatch.probe.landscape import landscape

        return landscape(self.model, batches, *args, **options)

    def log(self, **values: Any) -> None:
        pass

    def detach(self, status: str = "finished", reason: str = "") -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def __getattr__(name: str) -> Any:
    if name == "Run":  # imported on first use: it needs torch
        from gradwatch.probe.run import Run

        return Run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
