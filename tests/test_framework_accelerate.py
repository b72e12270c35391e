"""Accelerate loops with `gradwatch.attach` on the prepared optimizer: one record per
optimizer step under `accelerator.accumulate`, the loss of the step, and steps Accelerate's
GradScaler skips recorded as skipped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gradwatch
from tests.probe_helpers import TinyNet, batches, read_spool

accelerate = pytest.importorskip("accelerate")


def _loop(accelerator: object, model: torch.nn.Module, opt: object, data: list, poison: int | None = None) -> list[float]:
    """The loop Accelerate documents; returns the loss of each micro-batch, as computed."""
    losses = []
    for i, (x, y) in enumerate(data):
        if i == poison:
            x = x.clone()
            x[0, 0] = math.inf
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            losses.append(loss.item())
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
    return losses


def test_accumulate_gives_one_record_per_optimizer_step_with_its_loss(spool: Path) -> None:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = TinyNet()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="accumulate")
    losses = _loop(accelerator, model, opt, batches(12))
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.step for r in records] == [1, 2, 3]
    for record, micro in zip(records, [losses[i : i + 4] for i in (0, 4, 8)]):
        assert record.loss == pytest.approx(sum(micro) / 4, rel=1e-5)  # Accelerate divides each by 4


def test_steps_skipped_by_accelerates_grad_scaler_are_recorded_as_skipped(spool: Path) -> None:
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # fp16 on a GPU sets it; the CPU has none
    model = TinyNet()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="scaler")  # the scaler comes with `opt`
    skipped = []
    for i, (x, y) in enumerate(batches(5)):
        if i == 2:
            x = x.clone()
            x[0, 0] = math.inf
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        skipped.append(opt.step_was_skipped)
    run.detach()
    _, records, _ = read_spool(spool)
    assert skipped == [False, False, True, False, False]
    assert [r.skipped for r in records] == skipped
    assert [r.loss_scale for r in records] == [1024.0, 1024.0, 1024.0, 512.0, 512.0]
    finite = [r.loss for r in records if not r.skipped]
    assert all(0 < loss < 10 for loss in finite)  # unscaled: the loss, not the loss times 1024
