"""Which loss is a step's. Kept as device tensors until the step's record is sent, in this
order of precedence: losses logged with ``run.log(loss=...)`` (their mean over the step),
else the losses the model returned (the mean over the step's training forwards), else the
sum of the losses ``backward()`` was called on in the step and that reached the run's
parameters (see probe/backward.py), each unscaled when taken.

``from_backward`` skips the model's output: where a framework normalises each micro-batch's
loss by the items of the whole accumulated batch (Hugging Face), the model returns a part of
the step's loss, and what was backpropagated sums to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

MAX_PER_STEP = 1024  # losses kept per step: bounded memory whatever the loop does


def grad_state(p: torch.Tensor) -> tuple[int, int]:
    """Changes whenever a backward writes p's gradient: a new `.grad` tensor, or an in-place
    accumulation into the old one (which bumps its version counter)."""
    grad = p.grad
    return (0, 0) if grad is None else (id(grad), grad._version)


def loss_of(output: Any) -> torch.Tensor | None:
    """The training loss inside a forward's output: a 0-dim tensor, a tuple holding one,
    or a dict / ModelOutput with a `loss`."""
    if isinstance(output, torch.Tensor):
        return output if output.ndim == 0 and output.is_floating_point() else None
    if isinstance(output, Mapping):
        return loss_of(output.get("loss"))
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss_of(loss)
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor) and item.ndim == 0 and item.is_floating_point():
                return item
    return None


class StepLoss:
    def __init__(self, *, from_backward: bool, scaler: Any) -> None:
        self._from_backward = from_backward
        self._scaler = scaler
        self._logged: list[torch.Tensor | float] = []
        self._returned: list[torch.Tensor] = []
        self._backpropagated: list[torch.Tensor] = []
        self._user_logs = False  # once the user logs the loss, backward() is not read again

    def returned(self, output: Any) -> None:
        """A training forward's output, which may hold the loss."""
        loss = None if self._from_backward else loss_of(output)
        if loss is not None and len(self._returned) < MAX_PER_STEP:
            self._returned.append(loss.detach())

    def logged(self, value: torch.Tensor | float) -> None:
        self._user_logs = True
        if len(self._logged) < MAX_PER_STEP:
            self._logged.append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    @property
    def reads_backward(self) -> bool:
        """Whether backpropagated losses can still be the step's."""
        return not (self._user_logs or self._returned)

    def backpropagated(self, loss: torch.Tensor) -> None:
        if len(self._backpropagated) < MAX_PER_STEP:
            self._backpropagated.append(self._unscaled(loss))

    def backpropagated_alone(self, loss: torch.Tensor) -> None:
        """Without an optimizer each backward is a record: its loss is the only one."""
        self._backpropagated = [self._unscaled(loss)]

    def _unscaled(self, loss: torch.Tensor) -> torch.Tensor:
        """Without GradScaler's factor, divided now: `scaler.update()` changes the scale in
        place before the record is sent."""
        scale = getattr(self._scaler, "_scale", None)
        loss = loss.detach()
        return loss / scale.to(loss.device, non_blocking=True) if isinstance(scale, torch.Tensor) else loss

    def take(self, device: torch.device) -> torch.Tensor | None:
        """The step's loss on `device` (no sync), or None; what was kept for it is cleared."""
        chosen = self._logged or self._returned
        total = None
        if chosen:
            tensors = [torch.as_tensor(x, dtype=torch.float32).to(device, non_blocking=True) for x in chosen]
            total = torch.stack([t.reshape(()) for t in tensors]).mean()
        elif self._backpropagated and not self._user_logs:
            total = torch.stack([t.to(device, torch.float32, non_blocking=True) for t in self._backpropagated]).sum()
        self._logged, self._returned, self._backpropagated = [], [], []
        return total
