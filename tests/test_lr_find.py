"""The LR range test: exact restore (also after a NaN and when the loop raises), a sensible
suggestion against a hand sweep, GradScaler, accumulation, what it streams, the batch contract."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import protocol
from gradwatch.probe.lr_find import LRFindResult, lr_find, suggest
from tests.diagnostic_models import (
    TinyGPT,
    assert_identical,
    cnn_bn,
    image_batches,
    mlp,
    state_of,
    teacher_batches,
    token_batches,
)
from tests.probe_helpers import read_spool

RESULT_TEMPLATE = LRFindResult(
    suggested_lr=1e-3, reason="why", steepest_lr=1e-3, min_loss_lr=1e-2, alternative_lr=1e-3, lrs=[], losses=[],
    smoothed=[], steps_taken=0, steps_planned=0, stop_reason="end", stop_detail="end", group_ratios=(1.0,),
    run_name=None,
)


@pytest.fixture(autouse=True)
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every run of these tests writes a spool in its own directory."""
    path = tmp_path / "s.jsonl"
    monkeypatch.setenv("GRADWATCH_URL", f"file:{path}")
    monkeypatch.setenv("GRADWATCH_RUN", "probe-test")
    return path


def trained_adam(model: nn.Module, batches: list[Any], loss_fn: Any, groups: bool = False) -> torch.optim.Optimizer:
    """An AdamW a few steps into training, so that its moments and step counts exist."""
    params: Any = model.parameters()
    if groups:
        params = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0, "lr": 1e-4}]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for batch in batches[:3]:
        optimizer.zero_grad()
        (loss_fn(model(batch[0]), batch[1]) if loss_fn else model(*batch)).backward()
        optimizer.step()
    return optimizer


CASES = {
    "mlp-sgd-momentum": lambda: (m := mlp(), torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                                 teacher_batches(8), F.mse_loss),
    "mlp-adamw": lambda: (m := mlp(dropout=0.1), trained_adam(m, teacher_batches(3), F.mse_loss),
                          teacher_batches(8), F.mse_loss),
    "cnn-batchnorm-adamw": lambda: (m := cnn_bn(), trained_adam(m, image_batches(3), F.cross_entropy),
                                    image_batches(8), F.cross_entropy),
    "gpt-two-groups": lambda: (m := TinyGPT(), trained_adam(m, token_batches(3), None, groups=True),
                               token_batches(8), None),
}


@pytest.mark.parametrize("case", CASES)
def test_restores_model_optimizer_rng_and_modes_exactly(case: str) -> None:
    model, optimizer, batches, loss_fn = CASES[case]()
    model.eval()
    model[1].train() if isinstance(model, nn.Sequential) else model.ln_1.train()  # a mixed mode survives too
    model.zero_grad()
    next(iter(model.parameters())).grad = torch.full_like(next(iter(model.parameters())), 0.5)
    before = state_of(model, optimizer)

    result = lr_find(model, optimizer, batches, loss_fn, steps=60)

    assert result.stop_reason in ("diverged", "nonfinite", "end")
    assert result.steps_taken > 20
    assert_identical(before, state_of(model, optimizer))


def test_batchnorm_statistics_move_during_the_test_and_come_back() -> None:
    model, optimizer, batches, loss_fn = CASES["cnn-batchnorm-adamw"]()
    running = model[1].running_mean.clone()
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(module.running_mean.clone()))
    lr_find(model, optimizer, batches, loss_fn, steps=10)
    assert not torch.equal(seen[-1], running)  # the test trained in train mode
    assert torch.equal(model[1].running_mean, running) and int(model[1].num_batches_tracked) == 3


def test_restores_after_the_loss_becomes_nan() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = state_of(model, optimizer)
    # No divergence stop: the LR runs until the weights blow up and the loss is NaN/inf.
    result = lr_find(model, optimizer, teacher_batches(8), F.mse_loss, start=1e-4, end=1e12, diverge=1e30)
    assert result.stop_reason == "nonfinite"
    assert not math.isfinite(result.losses[-1]) and result.steps_taken == len(result.lrs) - 1
    assert_identical(before, state_of(model, optimizer))
    assert result.suggested_lr is not None and result.suggested_lr < result.lrs[-1]


class FailsAt(nn.Module):
    """Wraps a model; its `fail_at`-th forward raises, or returns NaN."""

    def __init__(self, inner: nn.Module, fail_at: int, nan: bool = False) -> None:
        super().__init__()
        self.inner, self.fail_at, self.nan, self.calls = inner, fail_at, nan, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        if self.calls == self.fail_at:
            if not self.nan:
                raise RuntimeError("injected failure")
            return out * math.nan
        return out


def test_restores_when_the_loop_raises(spool: Path) -> None:
    model = FailsAt(mlp(), fail_at=30)
    optimizer = trained_adam(model, teacher_batches(3), F.mse_loss)
    user_run = gradwatch.attach(model, optimizer, name="user-run", url=f"file:{spool}.user")
    before = state_of(model, optimizer)
    with pytest.raises(RuntimeError, match="injected failure"):
        lr_find(model, optimizer, teacher_batches(8), F.mse_loss)
    assert_identical(before, state_of(model, optimizer))
    _, _, others = read_spool(spool)
    assert [(bye.status, bye.reason) for bye in others] == [("crashed", "RuntimeError: injected failure")]
    assert user_run.enabled  # the user's run was paused for the test, and is back
    user_run.detach()


def test_a_nan_from_the_model_mid_test_stops_it_and_restores() -> None:
    model = FailsAt(mlp(), fail_at=25, nan=True)
    optimizer = trained_adam(model, teacher_batches(3), F.mse_loss)
    before = state_of(model, optimizer)
    result = lr_find(model, optimizer, teacher_batches(8), F.mse_loss)
    assert result.stop_reason == "nonfinite" and len(result.lrs) == 22 and result.steps_taken == 21
    assert_identical(before, state_of(model, optimizer))


# ---- the suggestion -----------------------------------------------------------------------------


SWEEP_CASES = {
    "mlp-sgd-momentum": (mlp, teacher_batches, F.mse_loss, lambda params, lr: torch.optim.SGD(params, lr, momentum=0.9)),
    "mlp-adam": (mlp, teacher_batches, F.mse_loss, lambda params, lr: torch.optim.Adam(params, lr)),
    "cnn-batchnorm-sgd": (cnn_bn, image_batches, F.cross_entropy,
                          lambda params, lr: torch.optim.SGD(params, lr, momentum=0.9)),
    "gpt-adamw": (TinyGPT, token_batches, None, lambda params, lr: torch.optim.AdamW(params, lr)),
}


def final_loss(case: str, lr: float, steps: int = 100) -> float:
    """Train a fresh model for `steps` at one LR; its mean loss on held-out batches."""
    make_model, make_batches, loss_fn, make_optimizer = SWEEP_CASES[case]
    model = make_model()
    optimizer = make_optimizer(model.parameters(), lr)
    for batch in make_batches(steps, seed=1):
        optimizer.zero_grad()
        (loss_fn(model(batch[0]), batch[1]) if loss_fn else model(*batch)).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        held_out = make_batches(4, seed=9)
        return sum(float(loss_fn(model(b[0]), b[1]) if loss_fn else model(*b)) for b in held_out) / 4


@pytest.mark.parametrize("case", SWEEP_CASES)
def test_the_suggestion_agrees_with_a_hand_sweep(case: str) -> None:
    make_model, make_batches, loss_fn, make_optimizer = SWEEP_CASES[case]
    model = make_model()
    result = lr_find(model, make_optimizer(model.parameters(), 1e-3), make_batches(100, seed=1), loss_fn)
    sweep = {lr: final_loss(case, lr) for lr in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)}
    best = min(sweep, key=sweep.__getitem__)
    too_high = min((lr for lr in sweep if lr > best and sweep[lr] > 2 * sweep[best]), default=math.inf)
    assert result.suggested_lr is not None and result.steepest_lr is not None, result
    assert best / 10 <= result.suggested_lr < too_high, (str(result), sweep)
    assert final_loss(case, result.suggested_lr) < 1.5 * sweep[best], (str(result), sweep)
    assert result.suggested_lr == min(result.steepest_lr, result.alternative_lr)
    assert result.alternative_lr == result.min_loss_lr / 10 and "suggested lr" in str(result)


def decades(n: int) -> list[float]:
    return [10 ** (-6 + 6 * i / (n - 1)) for i in range(n)]


LOGISTIC = [1 / (1 + math.exp(8 * (math.log10(lr) + 3))) + 0.1 for lr in decades(101)]
NOISE = [0.05 * math.sin(1.7 * i) for i in range(101)]  # batch-to-batch spread, std 0.035


@pytest.mark.parametrize(
    ("losses", "smoothed", "suggested", "steepest"),
    [
        # a logistic fall centred at 1e-3 (index 50 of 101), then flat: the steepest point is its centre
        (LOGISTIC, LOGISTIC, 1e-3, 1e-3),
        # flat: nothing learned, no suggestion
        ([1.0 + 0.001 * math.sin(i) for i in range(101)], [1.0] * 101, None, None),
        # lowest at the very start: too early for a slope, the LR at the minimum / 10
        ([1.0] * 101, [1.0 - 0.1 * (i == 3) + 0.01 * i for i in range(101)], decades(101)[3] / 10, None),
        # a fall of 0.02 (lowest at index 80) among batches whose losses differ by 0.035: the minimum / 10
        ([1.0 + n for n in NOISE], [1.0 - 0.02 * min(i, 80) / 80 for i in range(101)], decades(101)[80] / 10, None),
        # the same noise around a real fall is no obstacle
        ([a + n for a, n in zip(LOGISTIC, NOISE)], LOGISTIC, 1e-3, 1e-3),
    ],
    ids=["logistic", "flat", "minimum-too-early", "fall-within-the-noise", "fall-beyond-the-noise"],
)
def test_suggest_reads_the_curve(
    losses: list[float], smoothed: list[float], suggested: float | None, steepest: float | None
) -> None:
    got_suggested, got_steepest, _, reason = suggest(decades(101), losses, smoothed)
    assert got_suggested == pytest.approx(suggested, rel=0.01) if suggested else got_suggested is None, reason
    assert got_steepest == pytest.approx(steepest, rel=0.01) if steepest else got_steepest is None, reason


# ---- GradScaler, accumulation, param groups ---------------------------------------------------


def test_grad_scaler_state_is_restored_and_the_curve_is_the_unscaled_one() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    user_run = gradwatch.attach(model, optimizer, scaler=scaler, name="user-run")
    patched_update = vars(scaler)["update"]  # the user's run watches scaler.update
    before = state_of(model, optimizer, scaler)

    scaled = lr_find(model, optimizer, teacher_batches(8), F.mse_loss, scaler=scaler, steps=40, end=0.1)

    assert_identical(before, state_of(model, optimizer, scaler))
    assert vars(scaler)["update"] is patched_update
    user_run.detach()
    plain = lr_find(model, optimizer, teacher_batches(8), F.mse_loss, steps=40, end=0.1)
    # Scaling by a power of two and back is exact: the same losses, step for step.
    assert scaled.losses == plain.losses and scaled.steps_taken == plain.steps_taken == 40


def test_accumulation_averages_micro_batches_into_one_step(spool: Path) -> None:
    whole = teacher_batches(8, size=64)
    halves = [(x[i:i + 32], y[i:i + 32]) for x, y in whole for i in (0, 32)]
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    one = lr_find(model, optimizer, whole, F.mse_loss, steps=50)
    spool.unlink()
    two = lr_find(model, optimizer, halves, F.mse_loss, steps=50, accumulation=2)
    assert two.steps_taken == one.steps_taken and two.stop_reason == one.stop_reason
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    _, records, _ = read_spool(spool)
    assert len(records) == two.steps_taken  # one record per optimizer step, not per micro-batch


def test_param_groups_keep_their_ratio(spool: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD([{"params": list(model.parameters())[:2], "lr": 1e-2},
                                 {"params": list(model.parameters())[2:], "lr": 1e-3}])
    result = lr_find(model, optimizer, teacher_batches(4), F.mse_loss, steps=20, end=1e-3)
    assert result.group_ratios == (1.0, 0.1)
    assert result.lr_for_groups(1e-2) == [1e-2, pytest.approx(1e-3)]
    _, records, _ = read_spool(spool)
    for record, lr in zip(records, result.lrs):
        assert record.lr == [pytest.approx(lr), pytest.approx(lr / 10)]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]


# ---- what the probe streams ---------------------------------------------------------------------


def test_every_step_streams_as_a_run_of_its_own(spool: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    result = lr_find(model, optimizer, teacher_batches(8), F.mse_loss, name="exp7", every=1)
    hello, records, others = read_spool(spool)
    assert hello.run == result.run_name == "exp7-lr-find" and hello.tags == {"kind": "lr-find"}
    assert [r.step for r in records] == list(range(1, result.steps_taken + 1))
    assert [r.lr[0] for r in records] == pytest.approx(result.lrs[: result.steps_taken])
    assert [r.loss for r in records] == pytest.approx(result.losses[: result.steps_taken], rel=1e-6)
    assert [r.scalars["smoothed_loss"] for r in records] == pytest.approx(result.smoothed[: result.steps_taken])
    assert all(r.layer_grad_sq is not None for r in records)  # attach options reach the run
    assert others[-1].status == "finished" and "suggested lr" in others[-1].reason
    verdict = others[-2]  # the verdict goes before the bye
    assert isinstance(verdict, protocol.LRFind)
    assert verdict.lrs == result.lrs and verdict.smoothed == pytest.approx(result.smoothed, nan_ok=True)
    assert (verdict.suggested_lr, verdict.alternative_lr, verdict.reason) == (
        result.suggested_lr, result.alternative_lr, result.reason)


def test_a_long_test_sends_every_kth_point_and_the_last() -> None:
    n = protocol.MAX_LR_FIND_POINTS * 2 + 1
    lrs = [10 ** (-7 + 8 * i / (n - 1)) for i in range(n)]
    losses = [1.0] * (n - 1) + [math.nan]  # the last point stopped it
    result = dataclasses.replace(RESULT_TEMPLATE, lrs=lrs, losses=losses, smoothed=losses)
    message = result.message()
    assert len(message.lrs) <= protocol.MAX_LR_FIND_POINTS
    assert message.lrs[0] == lrs[0] and message.lrs[-1] == lrs[-1] and math.isnan(message.losses[-1])


def test_the_default_name_comes_from_the_environment(spool: Path) -> None:
    model = mlp()
    result = lr_find(model, torch.optim.SGD(model.parameters(), lr=0.01), teacher_batches(4), F.mse_loss, steps=5)
    assert result.run_name == "probe-test-lr-find"


def test_a_live_user_run_gets_none_of_the_test_steps(spool: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    user_spool = spool.with_name("user.jsonl")
    run = gradwatch.attach(model, optimizer, name="user-run", url=f"file:{user_spool}")
    lr_find(model, optimizer, teacher_batches(4), F.mse_loss, steps=20)
    for x, y in teacher_batches(3):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    run.detach()
    _, records, _ = read_spool(user_spool)
    assert [r.step for r in records] == [1, 2, 3] and all(r.lr == [0.01] for r in records)


def test_gradwatch_disable_runs_the_test_without_a_probe(monkeypatch: pytest.MonkeyPatch, spool: Path) -> None:
    monkeypatch.setenv("GRADWATCH_DISABLE", "1")
    model = mlp()
    result = lr_find(model, torch.optim.SGD(model.parameters(), lr=0.01), teacher_batches(4), F.mse_loss, steps=10)
    assert result.run_name is None and result.steps_taken == 10 and not spool.exists()


# ---- the batch contract -------------------------------------------------------------------------


class ReturnsLoss(nn.Module):
    """A model that computes its own loss and returns it in one of the shapes the probe reads."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.net, self.shape = mlp(), shape

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        prediction = self.net(x)
        loss = F.mse_loss(prediction, y)
        return {"tuple": (loss, prediction), "dict": {"loss": loss, "logits": prediction}, "scalar": loss}[self.shape]


@pytest.mark.parametrize("shape", ["scalar", "tuple", "dict"])
def test_a_model_that_returns_its_loss(shape: str) -> None:
    model = ReturnsLoss(shape)
    result = lr_find(model, torch.optim.SGD(model.parameters(), lr=0.01), teacher_batches(4), steps=10, end=1e-2)
    reference = lr_find(model.net, torch.optim.SGD(model.net.parameters(), lr=0.01), teacher_batches(4), F.mse_loss,
                        steps=10, end=1e-2)
    assert result.losses == pytest.approx(reference.losses)


def test_dict_batches_are_keyword_arguments() -> None:
    model = ReturnsLoss("dict")
    batches = [{"x": x, "y": y} for x, y in teacher_batches(4)]
    assert lr_find(model, torch.optim.SGD(model.parameters(), lr=0.01), batches, steps=10).steps_taken == 10


def test_short_iterables_cycle_and_one_shot_iterators_end() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cycled = lr_find(model, optimizer, teacher_batches(3), F.mse_loss, steps=20, end=1e-3)
    assert cycled.stop_reason == "end" and cycled.steps_taken == 20
    once = lr_find(model, optimizer, iter(teacher_batches(7)), F.mse_loss, steps=20, end=1e-3)
    assert once.stop_reason == "data" and once.steps_taken == 7 and "ran out" in once.stop_detail


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 1.0, "end": 0.1}, "0 < start < end"),
        ({"steps": 1}, "at least 2 steps"),
        ({"accumulation": 0}, "accumulation"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"diverge": 1.0}, "diverge"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs: dict[str, Any], message: str) -> None:
    model = mlp()
    with pytest.raises(ValueError, match=message):
        lr_find(model, torch.optim.SGD(model.parameters(), lr=0.01), teacher_batches(2), F.mse_loss, **kwargs)


def test_no_loss_found_is_a_clear_error_and_restores() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs_only = [x for x, _ in teacher_batches(1)]
    before = state_of(model, optimizer)
    with pytest.raises(TypeError, match="no scalar loss"):
        lr_find(model, optimizer, inputs_only, steps=5)
    with pytest.raises(ValueError, match="empty"):
        lr_find(model, optimizer, [], F.mse_loss, steps=5)
    assert_identical(before, state_of(model, optimizer))


def test_plot_marks_the_suggestion(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    model = mlp()
    result = lr_find(model, torch.optim.SGD(model.parameters(), lr=0.01), teacher_batches(8), F.mse_loss)
    ax = result.plot()
    assert ax.get_xscale() == "log" and len(ax.lines) == 3
    ax.figure.savefig(tmp_path / "lr_find.png")
