"""Pre-clip gradient norm: ``clip_grad_norm_`` already computes it and returns it (as a
device tensor, so keeping it costs nothing). While any run is attached,
``torch.nn.utils.clip_grad_norm_`` is wrapped to hand that value to the run that owns
the parameters; the math is untouched. So is Accelerate's ``Accelerator.clip_grad_norm_``
when Accelerate is imported (the Hugging Face Trainer clips through it, and it computes
the norm itself). Code that imported torch's function before ``attach`` keeps the original
and reports post-clip norms only.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad


class ClipListener(Protocol):
    def on_clip(self, params: list[torch.Tensor], total_norm: torch.Tensor) -> None: ...


_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
_originals: list[tuple[Any, Callable[..., torch.Tensor]]] = []  # (module or class, its clip_grad_norm_)


def _as_list(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _report(params: list[torch.Tensor], total_norm: torch.Tensor) -> None:
    for listener in list(_listeners):
        listener.on_clip(params, total_norm)


def _wrap_function(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        params = _as_list(parameters)
        total_norm = original(params, *args, **kwargs)
        _report(params, total_norm)
        return total_norm

    return clip_grad_norm_


def _wrap_method(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def clip_grad_norm_(self: Any, parameters: Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        params = _as_list(parameters)
        total_norm = original(self, params, *args, **kwargs)
        _report(params, total_norm)
        return total_norm

    return clip_grad_norm_


def _targets() -> list[tuple[Any, Callable[..., Any]]]:
    targets: list[tuple[Any, Callable[..., Any]]] = [
        (torch.nn.utils, _wrap_function),
        (torch.nn.utils.clip_grad, _wrap_function),
    ]
    accelerate = sys.modules.get("accelerate")
    if accelerate is not None and hasattr(accelerate, "Accelerator"):
        targets.append((accelerate.Accelerator, _wrap_method))
    return targets


def subscribe(listener: ClipListener) -> None:
    if not _originals:
        for owner, wrap in _targets():
            original = owner.__dict__["clip_grad_norm_"] if isinstance(owner, type) else owner.clip_grad_norm_
            _originals.append((owner, original))
            owner.clip_grad_norm_ = wrap(original)
    _listeners.add(listener)


def unsubscribe(listener: ClipListener) -> None:
    _listeners.discard(listener)
    if not _listeners:
        for owner, original in _originals:
            owner.clip_grad_norm_ = original
        _originals.clear()
