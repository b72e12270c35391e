"""The probe's hot path: pure tensor code, no I/O, no host-device synchronisation.

Each optimizer step fills one packed float vector on the model's device:

    [ grad_sq[L] | weight_sq[L] | update_sq[L] | loss, loss_scale, preclip_norm, found_inf, skipped ]

Squared norms per layer come from one ``torch._foreach_norm`` per (device, dtype) group
followed by an ``index_add_`` into the layer slots; nothing leaves the device here. The
background thread later reads the whole vector at once (see ``handoff``). Only trainable
tensors are measured: the slots of frozen layers stay zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradwatch.probe.environment import local
from gradwatch.probe.layers import LayerMap

EXTRAS = ("loss", "loss_scale", "preclip_norm", "found_inf", "skipped")  # skipped: the skip guard's device flag


@dataclass(frozen=True)
class Layout:
    """Offsets into the packed vector."""

    layers: int

    @property
    def length(self) -> int:
        return 3 * self.layers + len(EXTRAS)

    def grad(self) -> slice:
        return slice(0, self.layers)

    def weight(self) -> slice:
        return slice(self.layers, 2 * self.layers)

    def update(self) -> slice:
        return slice(2 * self.layers, 3 * self.layers)

    def extra(self, name: str) -> int:
        return 3 * self.layers + EXTRAS.index(name)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reduced-precision tensors accumulate in fp32; fp64 keeps its own precision.
    return dtype if dtype == torch.float64 else torch.float32


def _vector_dtype(device: torch.device) -> torch.dtype:
    # fp64 so that squared norms of exploding gradients (norm > 1.8e19) do not overflow
    # into a false "non-finite"; MPS has no fp64.
    return torch.float32 if device.type == "mps" else torch.float64


def _index_on(values: list[int], device: torch.device) -> torch.Tensor:
    """`values` as an index tensor on `device`. On CUDA it travels from pinned memory with
    a non-blocking copy: built on the training thread, it must not make it wait."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Measurer:
    """Computes per-layer squared norms of gradients, weights and updates into a packed vector."""

    def __init__(self, layer_map: LayerMap, home: torch.device) -> None:
        self.layer_map = layer_map
        self.layout = Layout(len(layer_map))
        self.home = home
        self.dtype = _vector_dtype(home)
        self._snapshot: list[list[torch.Tensor]] | None = None
        self._indices: list[torch.Tensor] = []
        self._zeros: list[torch.Tensor] = []
        self._regroup()

    def refresh(self) -> bool:
        """Re-reads which parameters train (host-side) and, when that changed, measures the
        new set from now on. Call it before `snapshot`, never between it and the update."""
        if not self.layer_map.refresh():
            return False
        self._regroup()
        return True

    def _regroup(self) -> None:
        groups = self.layer_map.groups
        # Built once per set of trainable tensors, so no step copies an index to the device:
        # per group the layer of each tensor, and a zero that stands in for a missing gradient.
        self._indices = [_index_on(g.layer_ids, self.home) for g in groups]
        self._zeros = [torch.zeros((), dtype=_norm_dtype(g.dtype), device=g.device) for g in groups]
        self._snapshot = None  # reallocated for the new groups on the next detail step

    def new_vector(self) -> torch.Tensor:
        return torch.zeros(self.layout.length, dtype=self.dtype, device=self.home)

    def _add_norms(
        self, out: torch.Tensor, group_index: int, tensors: Sequence[torch.Tensor | None], missing: int = 0
    ) -> None:
        """Adds the squared norms of `tensors` (aligned with the group's params; `missing`
        of them are None and add nothing) into their layers' slots of `out`."""
        present = [t for t in tensors if t is not None] if missing else tensors
        if not present:
            return
        zero = self._zeros[group_index]  # of the group's norm dtype
        norms = torch._foreach_norm(present, 2, dtype=zero.dtype)
        if missing:
            computed = iter(norms)
            norms = [zero if t is None else next(computed) for t in tensors]
        squares = torch.stack(norms).to(self.dtype).square()
        out.index_add_(0, self._indices[group_index], squares.to(self.home, non_blocking=True))

    @torch.no_grad()
    def grads(self, vec: torch.Tensor, grads: list[torch.Tensor | None] | None = None) -> set[int]:
        """Adds the per-layer squared gradient norms into `vec`; returns the ids of layers
        that have at least one gradient (a trainable layer absent from it got none).

        `grads` (aligned with ``layer_map.params``) overrides ``p.grad``; the gradient
        hooks of a model without an optimizer pass the gradients of one backward."""
        out = vec[self.layout.grad()]
        present: set[int] = set()
        offset = 0
        for gi, group in enumerate(self.layer_map.groups):
            n = len(group.params)
            chosen = grads[offset : offset + n] if grads is not None else [p.grad for p in group.params]
            offset += n
            tensors: list[torch.Tensor | None] = []
            missing = 0
            for g, layer in zip(chosen, group.layer_ids):
                if g is None:
                    tensors.append(None)
                    missing += 1
                else:
                    tensors.append(local(g))
                    present.add(layer)
            self._add_norms(out, gi, tensors, missing)
        return present

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copies the weights before the update so that ||Δw|| can be measured after it.
        The buffers are allocated on the first step that reports per-layer detail after
        the set of trainable tensors changed (frozen tensors get none)."""
        if self._snapshot is None:
            self._snapshot = [[torch.empty_like(local(p)) for p in g.params] for g in self.layer_map.groups]
        for buffers, group in zip(self._snapshot, self.layer_map.groups):
            torch._foreach_copy_(buffers, [local(p) for p in group.params])

    @torch.no_grad()
    def weights_and_updates(self, vec: torch.Tensor, with_updates: bool) -> None:
        """Adds per-layer squared weight norms and, after `snapshot`, squared update norms."""
        weight_out = vec[self.layout.weight()]
        update_out = vec[self.layout.update()]
        for gi, group in enumerate(self.layer_map.groups):
            params = [local(p) for p in group.params]
            self._add_norms(weight_out, gi, params)
            if with_updates and self._snapshot is not None:
                # In place: the snapshot becomes w_before - w_after, whose norm is ||Δw||.
                torch._foreach_sub_(self._snapshot[gi], params)
                self._add_norms(update_out, gi, self._snapshot[gi])

    def set_extra(self, vec: torch.Tensor, name: str, value: torch.Tensor | float) -> None:
        i = self.layout.extra(name)
        if isinstance(value, torch.Tensor):
            vec[i : i + 1].copy_(value.detach().reshape(1), non_blocking=True)
        else:
            vec[i] = value

    @torch.no_grad()
    def unscale_grads(self, vec: torch.Tensor, scale: torch.Tensor) -> None:
        """Fused optimizers under GradScaler see gradients still multiplied by the scale."""
        vec[self.layout.grad()].div_(scale.detach().to(self.home, self.dtype, non_blocking=True).square())
