"""The probe on CUDA: no host-device sync from any training-thread hook, and the values of a
float64 CPU reference. Runs wherever CUDA exists (skipped elsewhere), under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any synchronising call.

    python -m pytest -q tests/test_cuda.py      # on a machine with a GPU
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from tests.probe_helpers import read_spool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def sync_is_an_error() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _strict(method: Any) -> Any:
    @functools.wraps(method)
    def strict(*args: Any, **kwargs: Any) -> Any:
        with sync_is_an_error():
            return method(*args, **kwargs)

    return strict


@pytest.fixture(autouse=True)
def probe_hooks_may_not_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the probe's training-thread code runs in sync-debug "error" mode: GradScaler's
    own `.item()` in `scaler.step` is the user's choice, not the probe's."""
    from gradwatch.probe.record import Recorder
    from gradwatch.probe.run import Run

    for cls, names in ((Run, ("_on_forward", "_before_step", "_after_step", "_before_scaler_update",
                              "before_backward", "after_backward", "on_clip", "_step_boundary", "log")),
                       (Recorder, ("seal", "flush"))):
        for name in names:
            monkeypatch.setattr(cls, name, _strict(getattr(cls, name)))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 32)
        self.expert = torch.nn.Linear(32, 32)  # used on odd steps only: changing gradient patterns
        self.out = torch.nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, routed: bool) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        if routed:
            h = torch.relu(self.expert(h))
        return self.out(h)


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "plain":
        return torch.optim.AdamW(params, lr=1e-3)
    if kind == "fused":
        return torch.optim.AdamW(params, lr=torch.tensor(1e-3, device="cuda"), fused=True)
    return torch.optim.AdamW(params, lr=torch.tensor(1e-3, device="cuda"), capturable=True)


POISONED_STEP = 7  # its batch holds a NaN when the skip guard is armed


def _train(device: str, kind: str, spool: Path, *, scaler: bool, accumulation: int, armed: bool) -> list[float]:
    """Trains 12 steps under sync-debug mode; returns the reference squared gradient norm
    of each step, read after the run (outside the mode). Armed, the skip guard must skip
    the poisoned step without a sync, and the weights stay finite."""
    torch.manual_seed(0)
    model = Net().to(device)
    opt = _optimizer(kind, model.parameters())
    grad_scaler = torch.amp.GradScaler("cuda") if scaler else None
    run = gradwatch.attach(model, opt, scaler=grad_scaler, url=f"file:{spool}", every=1, name=f"cuda-{kind}",
                           actions=armed)
    if armed:
        from gradwatch import protocol

        run._actions.receive(protocol.Action(id="arm", kind="skip_step", step=1, params={"on": "nonfinite"}))
        # a tensor LR stays a tensor on its device under the factor: no read
        run._actions.receive(protocol.Action(id="lr", kind="reduce_lr", step=3, params={"factor": 0.5}))
    reference: list[torch.Tensor] = []
    data = [(torch.randn(8, 16, device=device), torch.randn(8, 1, device=device)) for _ in range(12 * accumulation)]
    for step in range(12):  # the probe's hooks run in sync-debug "error" mode (probe_hooks_may_not_sync)
        for micro in range(accumulation):
            x, y = data[step * accumulation + micro]
            if armed and step + 1 == POISONED_STEP:
                x = x.clone()
                x[0, 0] = math.nan
            loss = torch.nn.functional.mse_loss(model(x, routed=step % 2 == 1), y) / accumulation
            (grad_scaler.scale(loss) if grad_scaler else loss).backward()
        if grad_scaler:
            grad_scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        reference.append(torch.stack([p.grad.detach().cpu().double().square().sum() for p in model.parameters()
                                      if p.grad is not None]).sum())  # float64, on the CPU
        if grad_scaler:
            grad_scaler.step(opt)
            grad_scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    run.detach()
    assert not run._broken, "a probe hook failed (a sync raises in sync-debug mode): see the log"
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    return [float(r) for r in reference]


@pytest.mark.parametrize("kind", ["plain", "fused", "capturable"])
@pytest.mark.parametrize("scaler", [False, True], ids=["fp32", "grad-scaler"])
def test_hooks_never_sync_and_match_a_float64_reference(tmp_path: Path, kind: str, scaler: bool) -> None:
    spool = tmp_path / "spool.jsonl"
    reference = _train("cuda", kind, spool, scaler=scaler, accumulation=2, armed=False)
    _, records, _ = read_spool(spool)
    assert len(records) == 12
    for record, want in zip(records, reference):
        if record.skipped:
            continue
        # post-clip gradients, as the optimizer saw them
        assert math.isclose(record.grad_norm_sq, want, rel_tol=1e-4), (record.step, record.grad_norm_sq, want)
        assert record.lr == [pytest.approx(1e-3)]


@pytest.mark.parametrize("kind", ["plain", "fused", "capturable"])
def test_the_armed_skip_guard_skips_without_a_sync(tmp_path: Path, kind: str) -> None:
    """Plain AdamW keeps its step counter on the CPU: the guard takes it back once the flag
    has reached the host, polled, never waited for."""
    spool = tmp_path / "spool.jsonl"
    _train("cuda", kind, spool, scaler=False, accumulation=1, armed=True)
    _, records, _ = read_spool(spool)
    assert [r.step for r in records if r.skipped] == [POISONED_STEP]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_device(tmp_path: Path) -> None:
    """The handoff's copy is waited for on the vector's device, not the current one."""
    spool = tmp_path / "spool.jsonl"
    reference = _train("cuda:1", "plain", spool, scaler=False, accumulation=1, armed=False)
    _, records, _ = read_spool(spool)
    assert [r.grad_norm_sq for r in records] == pytest.approx(reference, rel=1e-4)
