"""The armed skip guard decides on the device and undoes a flagged step there: the weights
and the optimizer state end bit for bit as if the poisoned batch never came, for each
optimizer, with a spike as with a non-finite gradient; the record says it was skipped.
(On CUDA, tests/test_cuda.py runs it under sync-debug "error" mode.)"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch import protocol
from gradwatch.probe.skip_guard import MIN_HISTORY, SPIKE_FACTOR, SkipGuard
from tests.probe_helpers import TinyNet, batches, read_spool

# ---- the decision, as a table --------------------------------------------------------------

NAN, INF = math.nan, math.inf
STEADY = [1.0] * MIN_HISTORY


@pytest.mark.parametrize(
    ("norms", "on_nonfinite", "on_spike", "flags"),
    [
        ([1.0, NAN, 1.0], True, False, [False, True, False]),
        ([1.0, INF], True, True, [False, True]),
        ([1.0, NAN], False, True, [False, False]),  # armed for spikes only
        # a spike needs MIN_HISTORY finite norms before it
        ([*STEADY[:-1], 50.0], True, True, [False] * MIN_HISTORY),
        ([*STEADY, 50.0, 1.0], True, True, [False] * MIN_HISTORY + [True, False]),
        ([*STEADY, 50.0], True, False, [False] * (MIN_HISTORY + 1)),  # armed for non-finite only
        ([*STEADY, SPIKE_FACTOR * 0.99], False, True, [False] * (MIN_HISTORY + 1)),
        # neither a spike nor a non-finite norm joins the history: the median stays 1
        ([*STEADY, 50.0, NAN, 50.0], True, True, [False] * MIN_HISTORY + [True, True, True]),
        # the history moves with a trend: a seventeenfold rise over 30 steps is no spike
        ([1.1**i for i in range(30)], True, True, [False] * 30),
    ],
)
def test_judging_norms(norms: list[float], on_nonfinite: bool, on_spike: bool, flags: list[bool]) -> None:
    guard = SkipGuard(torch.device("cpu"), torch.float64)
    got = [bool(guard.judge(torch.tensor(n * n), on_nonfinite=on_nonfinite, on_spike=on_spike)) for n in norms]
    assert got == flags


# ---- undoing a step ------------------------------------------------------------------------


class CountingSGD(torch.optim.SGD):
    """Keeps a Python number in its state, as some optimizers do (undone once the flag is on
    the host: at once on the CPU). Its super().step() fires the step hooks a second time,
    inside the first, once an SGD was made before it."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["calls"] = self.state[p].get("calls", 0) + 1
        return super().step(closure)


class ReassigningMomentum(torch.optim.Optimizer):
    """Puts a new momentum tensor in its state each step instead of updating it in place."""

    def __init__(self, params: Any, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["buf"] = 0.9 * state.get("buf", torch.zeros_like(p)) + p.grad
                    p.add_(state["buf"], alpha=-group["lr"])


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "adamw-tensor-lr": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2)),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "counting-sgd": lambda ps: CountingSGD(ps, lr=0.05),
    "reassigning-momentum": lambda ps: ReassigningMomentum(ps),
}


def _poisoned(x: torch.Tensor, y: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A batch with a NaN input, or one whose loss (so gradients) is 10^4 times larger."""
    if how == "nonfinite":
        x = x.clone()
        x[0, 0] = math.nan
        return x, y, 1.0
    return x, y, 1e4


def _train(make_opt: Callable[[Any], torch.optim.Optimizer], data: list[Any], *, poison: int = -1,
           how: str = "nonfinite", arm: str | None = None, clip: bool = False,
           spool: Path | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = make_opt(model.parameters())
    run = None
    if arm is not None:
        run = gradwatch.attach(model, opt, url=f"file:{spool}", name="guarded", actions=True, every=1)
        run._actions.receive(protocol.Action(id="arm", kind="skip_step", step=1, params={"on": arm}))
    for step, (x, y) in enumerate(data, start=1):
        scale = 1.0
        if step == poison:
            x, y, scale = _poisoned(x, y, how)
        opt.zero_grad()
        (scale * torch.nn.functional.mse_loss(model(x), y)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
    if run is not None:
        run.detach()
        assert not run._broken
    return model, opt


def _state_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    if sa.keys() != sb.keys():
        return False
    for key in sa:
        if sa[key].keys() != sb[key].keys():
            return False
        for name, va in sa[key].items():
            vb = sb[key][name]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
            if not same:
                return False
    return True


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("how", "arm"), [("nonfinite", "nonfinite"), ("spike", "exploding_gradients")])
def test_a_skipped_step_leaves_weights_and_state_as_if_the_batch_never_came(
    tmp_path: Path, optimizer: str, how: str, arm: str
) -> None:
    make_opt = OPTIMIZERS[optimizer]
    data = batches(24)
    poison = 16
    clean_model, clean_opt = _train(make_opt, data[: poison - 1] + data[poison:])
    spool = tmp_path / "spool.jsonl"
    model, opt = _train(make_opt, data, poison=poison, how=how, arm=arm, spool=spool)
    for a, b in zip(clean_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert _state_equal(clean_opt, opt)
    _, records, _ = read_spool(spool)
    assert len(records) == len(data)  # one per step, also when the step hooks fire twice (CountingSGD)
    assert [r.step for r in records if r.skipped] == [poison]
    assert records[poison - 1].layer_update_sq == [0.0] * len(records[poison - 1].layer_update_sq)


def test_a_skip_on_the_first_step_zeroes_the_state_it_created(tmp_path: Path) -> None:
    data = batches(6)
    clean_model, clean_opt = _train(OPTIMIZERS["adam"], data[1:])
    model, opt = _train(OPTIMIZERS["adam"], data, poison=1, arm="nonfinite", spool=tmp_path / "s.jsonl")
    assert all(torch.equal(a, b) for a, b in zip(clean_model.parameters(), model.parameters()))
    assert _state_equal(clean_opt, opt)


def test_the_pre_clip_norm_is_judged_when_the_run_clips(tmp_path: Path) -> None:
    """clip_grad_norm_'s total norm is the one every rank of a sharded run has."""
    data = batches(24)
    clean_model, _ = _train(OPTIMIZERS["adam"], data[:15] + data[16:], clip=True)
    spool = tmp_path / "spool.jsonl"
    model, _ = _train(OPTIMIZERS["adam"], data, poison=16, how="spike", arm="loss_spike", clip=True, spool=spool)
    assert all(torch.equal(a, b) for a, b in zip(clean_model.parameters(), model.parameters()))
    _, records, _ = read_spool(spool)
    assert [r.step for r in records if r.skipped] == [16]


def test_unarmed_nothing_is_saved_or_judged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    before = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = gradwatch.attach(model, opt, url=f"file:{tmp_path / 's.jsonl'}", name="unarmed", actions=True)
    for x, y in batches(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    run.detach()
    assert run._skip_guard is not None and run._skip_guard._copies == []  # nothing was saved
    assert not any(torch.equal(a, b) for a, b in zip(before.parameters(), model.parameters()))


def test_a_sharded_run_that_does_not_clip_is_not_judged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its ranks would judge their own shards and could disagree: it needs clip_grad_norm_'s
    global norm, and says so once."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = gradwatch.attach(model, opt, url=f"file:{tmp_path / 's.jsonl'}", name="sharded", actions=True, every=1)
    run._skip_guard.sharded = True  # as for FSDP2 parameters
    run._actions.receive(protocol.Action(id="arm", kind="skip_step", step=1, params={"on": "nonfinite"}))
    for step, (x, y) in enumerate(batches(4), start=1):
        if step == 3:
            x = x.clone()
            x[0, 0] = math.nan
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    run.detach()
    assert not all(bool(p.isfinite().all()) for p in model.parameters())  # nothing was skipped
    assert [r.getMessage() for r in caplog.records].count(
        next(r.getMessage() for r in caplog.records if "clip_grad_norm_" in r.getMessage())) == 1
