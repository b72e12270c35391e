"""The training loss of scripts whose model does not return it.

Most training scripts compute the loss outside the model (`loss = F.cross_entropy(model(x),
y)`), so a forward hook never sees it; every script, though, calls `loss.backward()`. While
any run is attached, ``torch.autograd.backward`` (which ``Tensor.backward`` calls) is
wrapped to hand each scalar it is called on to the attached runs, before and after the
original runs; the math is untouched and nothing is read from the device. A run keeps the
tensor only if that backward reached its parameters (see ``Run``), so the losses of another
model in the same process (a GAN's discriminator) are not mistaken for its own.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.autograd

log = logging.getLogger("gradwatch.probe")


class BackwardListener(Protocol):
    def before_backward(self, loss: torch.Tensor) -> Any: ...

    def after_backward(self, loss: torch.Tensor, token: Any) -> None: ...


_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
_original: Callable[..., None] | None = None


def _is_loss(tensors: Any, grad_tensors: Any) -> bool:
    """`backward()` on one floating scalar with the implicit gradient of 1: a loss.
    (Gradient checkpointing and other internals pass explicit gradients for activations.)"""
    return (
        grad_tensors is None
        and isinstance(tensors, torch.Tensor)
        and tensors.ndim == 0
        and tensors.is_floating_point()
        and tensors.requires_grad
    )


def _wrapped(tensors: Any, grad_tensors: Any = None, *args: Any, **kwargs: Any) -> None:
    assert _original is not None
    if not _listeners or not _is_loss(tensors, grad_tensors):
        return _original(tensors, grad_tensors, *args, **kwargs)
    tokens = []
    for listener in list(_listeners):
        try:
            tokens.append((listener, listener.before_backward(tensors)))
        except Exception:  # the probe's failure must never fail the backward
            log.exception("gradwatch: reading the loss before backward failed; training continues")
    _original(tensors, grad_tensors, *args, **kwargs)
    for listener, token in tokens:
        try:
            listener.after_backward(tensors, token)
        except Exception:
            log.exception("gradwatch: reading the loss after backward failed; training continues")
    return None


def subscribe(listener: BackwardListener) -> None:
    global _original
    if _original is None:
        _original = torch.autograd.backward
        torch.autograd.backward = functools.wraps(_original)(_wrapped)
    _listeners.add(listener)


def unsubscribe(listener: BackwardListener) -> None:
    global _original
    _listeners.discard(listener)
    if not _listeners and _original is not None:
        torch.autograd.backward = _original
        _original = None
