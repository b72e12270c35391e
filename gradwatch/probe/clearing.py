"""Whether anything cleared the gradients between an update and the next backward.

Right after an update (the optimizer's step, or without one each backward) a sentinel
tensor is noted with its `.grad` (weakly: a cleared gradient must be freed), the gradient's
version and the sentinel's own; the next backward compares. Host-side only: identities and
version counters, nothing read from the device.
"""

from __future__ import annotations

import weakref

import torch


class ClearingCheck:
    def __init__(self, *, with_optimizer: bool) -> None:
        self._with_optimizer = with_optimizer
        self._noted: tuple[torch.Tensor, weakref.ref[torch.Tensor], int, int] | None = None
        self._kept = False

    def after_update(self, sentinels: tuple[torch.Tensor, ...]) -> None:
        """The run's sentinel tensors (the first is watched), right after an update."""
        sentinel = sentinels[0] if sentinels else None
        grad = sentinel.grad if sentinel is not None else None
        if sentinel is not None and grad is not None:
            self._noted = (sentinel, weakref.ref(grad), grad._version, sentinel._version)

    def before_backward(self) -> None:
        """The first backward since the update decides; later ones accumulate on purpose."""
        if self._noted is None:
            return
        param, grad, version, param_version = self._noted
        self._noted = None
        # Without an optimizer the weights must have moved since (a hand-written update), or
        # this is deliberate accumulation.
        updated = self._with_optimizer or param._version != param_version
        self._kept = updated and param.grad is not None and param.grad is grad() and param.grad._version == version

    def take(self) -> bool:
        """Whether the gradients of the step just taken were kept from the one before."""
        kept, self._kept = self._kept, False
        return kept
