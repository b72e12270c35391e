"""How a batch becomes a loss, for the diagnostics that run the model themselves
(`lr_find`, `landscape`).

The contract, one of two:

- with a ``loss_fn``: every batch is an ``(inputs, targets)`` pair and the loss is
  ``loss_fn(model(inputs), targets)``;
- without: the model computes its loss. A tuple or list batch is passed as positional
  arguments (``model(*batch)``, e.g. ``(idx, targets)`` for a nanoGPT), a dict as keyword
  arguments (``model(**batch)``, a Hugging Face batch), anything else as the one argument;
  the model returns the loss as a scalar tensor, a tuple holding one, or a dict /
  ``ModelOutput`` with ``loss`` (what the probe finds by itself, `loss.loss_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from gradwatch.probe.loss import loss_of

LossFn = Callable[[Any, Any], torch.Tensor]


def batch_loss(model: torch.nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    """The scalar loss of one batch, following the contract above."""
    if loss_fn is not None:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"with loss_fn, every batch is an (inputs, targets) pair; got {type(batch).__name__}")
        inputs, targets = batch
        loss = loss_fn(model(inputs), targets)
    elif isinstance(batch, (tuple, list)):
        loss = loss_of(model(*batch))
    elif isinstance(batch, Mapping):
        loss = loss_of(model(**batch))
    else:
        loss = loss_of(model(batch))
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        raise TypeError(
            "no scalar loss: pass loss_fn= (batches are then (inputs, targets) pairs), or let the model return "
            "its loss (a 0-dim tensor, a tuple holding one, or a dict / ModelOutput with `loss`)"
        )
    return loss


def cycled(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches, again from the start whenever they run out (a list or a DataLoader
    cycles; a one-shot iterator simply ends)."""
    passes = 0
    while True:
        seen = False
        for batch in batches:
            seen = True
            yield batch
        if not seen:
            if passes == 0:
                raise ValueError("batches is empty: give at least one batch")
            return
        passes += 1
