"""Device -> host handoff of packed vectors without making the training thread wait.

On CUDA the vector is copied with ``non_blocking=True`` into a slot of a pinned host ring
and the slot's CUDA event is recorded behind the copy, on the current stream of the
vector's device (not of the current device: a model on cuda:1 is copied on cuda:1's
stream); the background thread waits on that event (a host wait on *its* thread) and then
reads the slot. A slot's event is reused only once the slot was read. The training thread never calls
``.item()``/``.tolist()``. On the CPU the vector already lives on the host; on MPS and XPU
it is copied without blocking and the background thread synchronizes the device first.
When every slot is still waiting to be read, the step's vector is dropped and counted:
training never waits for the probe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Pending:
    """A packed vector in flight to the host."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None
    slot: int = -1
    synchronize: Callable[[], None] | None = None  # MPS, XPU: wait for the device, on the reader's thread


class Handoff:
    def __init__(self, length: int, dtype: torch.dtype, device: torch.device, slots: int = 64) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._ring: torch.Tensor | None = None
        self._events: list[torch.cuda.Event] = []
        if device.type == "cuda":
            self._ring = torch.empty((slots, length), dtype=dtype, pin_memory=True)
            self._events = [torch.cuda.Event() for _ in range(slots)]  # bound to a device at first record
            self._free = list(range(slots))

    def put(self, vec: torch.Tensor) -> Pending | None:
        """Training thread: start moving `vec` to the host; None when the ring is full."""
        if self._ring is None:
            if vec.device.type == "cpu":
                return Pending(vec)
            # Other accelerators (MPS, XPU): a non-blocking copy, completed by the background
            # thread's device synchronize; a device without one gets the blocking copy.
            synchronize = getattr(getattr(torch, vec.device.type, None), "synchronize", None)
            return Pending(vec.to("cpu", non_blocking=synchronize is not None), synchronize=synchronize)
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        host = self._ring[slot]
        host.copy_(vec, non_blocking=True)
        event = self._events[slot]
        event.record(torch.cuda.current_stream(vec.device))
        return Pending(host, event, slot)

    def read(self, pending: Pending) -> list[float]:
        """Background thread: wait for the copy, read the values, release the slot."""
        if pending.event is not None:
            pending.event.synchronize()
        elif pending.synchronize is not None:
            pending.synchronize()
        values = pending.tensor.tolist()
        if pending.slot >= 0:
            with self._lock:
                self._free.append(pending.slot)
        return values
