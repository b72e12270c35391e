"""Everything a few trial training steps change, saved and put back bit for bit.

`TrainingState(model, optimizer, scaler)` copies, to host memory (device memory is what a
large model lacks), the parameters and every buffer (persistent or not: BatchNorm's
running statistics and its batch counter), the gradients, the optimizer's state dict
(per-parameter state such as Adam's moments and step, and every param group's settings),
the GradScaler's whole state, each module's train/eval flag and the torch RNG states (CPU,
and CUDA where it was initialised). `restore()` writes the values back into the same
tensor objects (the optimizer and the user's references keep pointing at them); copies
never round, so the result is bit-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch


class _HostCopy:
    """A tensor kept in host memory, and the device and dtype it goes back to."""

    __slots__ = ("device", "value")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.device = tensor.device
        self.value = tensor.detach().to("cpu", copy=True)

    def back(self) -> torch.Tensor:
        return self.value.to(self.device, copy=self.device.type == "cpu")


def _to_host(tree: Any) -> Any:
    """A copy of a state-dict tree whose tensors live on the host."""
    if isinstance(tree, torch.Tensor):
        return _HostCopy(tree)
    if isinstance(tree, Mapping):
        return {key: _to_host(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_host(value) for value in tree)
    return copy.deepcopy(tree)


def _from_host(tree: Any) -> Any:
    if isinstance(tree, _HostCopy):
        return tree.back()
    if isinstance(tree, Mapping):
        return {key: _from_host(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_from_host(value) for value in tree)
    return copy.deepcopy(tree)


class TrainingState:
    """A saved copy of a model, its optimizer, its GradScaler and the RNGs; see the module."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, scaler: Any = None) -> None:
        self._model = model
        self._optimizer = optimizer
        self._scaler = scaler
        self._params = [(p, _HostCopy(p)) for p in model.parameters()]
        self._grads = [None if p.grad is None else _HostCopy(p.grad) for p, _ in self._params]
        # Buffers by owner and attribute: a module may assign a new tensor to a buffer.
        self._buffers = [
            (module, name, buffer, _HostCopy(buffer))
            for module in model.modules()
            for name, buffer in module.named_buffers(recurse=False)
        ]
        self._modes = [(module, module.training) for module in model.modules()]
        self._optimizer_state = _to_host(optimizer.state_dict())
        # Its whole instance dict: the lazily made scale tensors, the per-optimizer stage
        # (unscaled or not), and whatever a probe patched onto the instance.
        self._scaler_vars = copy.deepcopy(vars(scaler)) if scaler is not None else None
        self._cpu_rng = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._cuda_rng = torch.cuda.get_rng_state_all() if cuda else None

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in self._params:
                p.copy_(saved.value)
            for (p, _), grad in zip(self._params, self._grads):
                p.grad = None if grad is None else grad.back()
            for module, name, buffer, saved in self._buffers:
                if getattr(module, name) is not buffer:
                    setattr(module, name, buffer)
                buffer.copy_(saved.value)
        for module, training in self._modes:
            module.training = training
        self._optimizer.load_state_dict(_from_host(self._optimizer_state))
        if self._scaler_vars is not None:
            vars(self._scaler).clear()
            vars(self._scaler).update(copy.deepcopy(self._scaler_vars))
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)
