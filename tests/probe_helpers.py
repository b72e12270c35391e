"""Shared pieces for probe tests: tiny models, spool reading, reference norms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gradwatch import protocol


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def batches(n: int, seed: int = 0, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 8, generator=g)
        out.append((x, x.sum(dim=1, keepdim=True).sin()))
    return out


def train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    run: Any = None,
    *,
    clip: float | None = None,
    pace: float = 0.0,
    on_step: Any = None,
) -> list[torch.Tensor]:
    """A plain loop; returns the final weights (to compare runs with and without the probe)."""
    import time

    for step, (x, y) in enumerate(data, start=1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if run is not None:
            run.log(loss=loss)
        if on_step is not None:
            on_step(step)
        if pace:
            time.sleep(pace)
    return [p.detach().clone() for p in model.parameters()]


def read_spool(path: Path) -> tuple[protocol.Hello, list[protocol.StepRecord], list[Any]]:
    """Every frame of a `file:` spool, validated by the protocol models."""
    hello = None
    records: list[protocol.StepRecord] = []
    others: list[Any] = []
    for line in path.read_text().splitlines():
        message = protocol.decode_probe_message(line)
        if isinstance(message, protocol.Hello):
            hello = message
        elif isinstance(message, protocol.Steps):
            records.extend(message.records)
        else:
            others.append(message)
    assert hello is not None, "the spool has no hello"
    return hello, records, others


def ref_layer_sq(tensors: dict[str, torch.Tensor | None]) -> dict[str, float | None]:
    return {
        name: None if t is None else float(torch.linalg.vector_norm(t.detach().double())) ** 2
        for name, t in tensors.items()
    }


def assert_close(got: float | None, want: float | None, rel: float = 1e-4) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None
    if math.isnan(want):
        assert math.isnan(got)
        return
    assert math.isclose(got, want, rel_tol=rel, abs_tol=1e-10), (got, want)
