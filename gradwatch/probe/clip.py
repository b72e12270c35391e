"""Pre-clip gradient norm: ``clip_grad_norm_`` already computes it and returns it (as a
device tensor, so keeping it costs nothing). While any run is attached,
``torch.nn.utils.clip_grad_norm_`` is wrapped to hand that value to the run that owns
the parameters; the math is untouched. Code that imported the function before
``attach`` keeps the original and reports post-clip norms only.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad


class ClipListener(Protocol):
    def on_clip(self, params: list[torch.Tensor], total_norm: torch.Tensor) -> None: ...


_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
_original: Callable[..., torch.Tensor] | None = None


def _wrapped(parameters: torch.Tensor | Iterable[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    assert _original is not None
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    total_norm = _original(params, *args, **kwargs)
    for listener in list(_listeners):
        listener.on_clip(params, total_norm)
    return total_norm


def subscribe(listener: ClipListener) -> None:
    global _original
    if _original is None:
        _original = torch.nn.utils.clip_grad_norm_
        wrapper = functools.wraps(_original)(_wrapped)
        torch.nn.utils.clip_grad_norm_ = wrapper
        torch.nn.utils.clip_grad.clip_grad_norm_ = wrapper
    _listeners.add(listener)


def unsubscribe(listener: ClipListener) -> None:
    global _original
    _listeners.discard(listener)
    if not _listeners and _original is not None:
        torch.nn.utils.clip_grad_norm_ = _original
        torch.nn.utils.clip_grad.clip_grad_norm_ = _original
        _original = None
