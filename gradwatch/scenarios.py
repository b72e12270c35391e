"""Short, real CPU trainings: one healthy, the others each with one injected pathology.

`gradwatch demo`, the end-to-end tests and the detection-quality checks all run these.
Every scenario is an honest training loop (nanoGPT-style: data, model, optimizer, steps)
with the probe attached by the one line a user would write; the pathology is injected at
`onset` the way it happens in real runs (a corrupt batch, a bad LR, a dead unit, ...).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradwatch

IN_FEATURES = 32


@dataclass
class Outcome:
    """What a scenario's training did (the collector says what it detected)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    stopped: bool = False

    def mean_loss(self, last: int = 25) -> float:
        tail = [x for x in self.losses[-last:] if math.isfinite(x)]
        return sum(tail) / len(tail) if tail else math.nan


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str | None  # the alert kind it must raise; None: it must stay silent
    onset: int  # the optimizer step at which the pathology starts
    steps: int
    description: str
    train: Callable[[dict[str, Any], int, int, float], Outcome]

    def run(self, pace: float = 0.0, **run_options: Any) -> Outcome:
        """Train with the probe attached with `run_options` (url, name, actions, ...).
        `pace` (seconds) stretches each step towards a real model's step time, so that a
        collector's answer (an action) can arrive while the run still trains."""
        return self.train(run_options, self.steps, self.onset, pace)


class Teacher:
    """A fixed random network to learn from: endless fresh batches, or a fixed small set."""

    def __init__(self, seed: int, noise: float = 0.05) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=self.gen))
        self.noise = noise

    @torch.no_grad()
    def batch(self, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, IN_FEATURES, generator=self.gen)
        y = self.net(x) + self.noise * torch.randn(size, 1, generator=self.gen)
        return x, y


def mlp(width: int = 64, depth: int = 3, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = IN_FEATURES
    for _ in range(depth - 1):
        layers += [nn.Linear(fan_in, width), act()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1))
    return nn.Sequential(*layers)


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    run_options: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    teacher: Teacher,
    *,
    before_step: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    loss_scale_fault: Callable[[int], float] | None = None,
    train_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    val_every: int = 25,
    batch: int = 64,
    pace: float = 0.0,
) -> Outcome:
    """The training loop every scenario shares; `before_step` may corrupt the batch or the model."""
    val_x, val_y = teacher.batch(512)
    outcome = Outcome(steps=0)
    with gradwatch.attach(model, opt, scaler=scaler, loss_fn=None, **run_options) as run:
        for step in range(1, steps + 1):
            if train_set is not None:
                idx = torch.randint(0, len(train_set[0]), (batch,), generator=teacher.gen)
                x, y = train_set[0][idx], train_set[1][idx]
            else:
                x, y = teacher.batch(batch)
            if before_step is not None:
                x, y = before_step(step, x, y)
            model.train()
            loss = nn.functional.mse_loss(model(x), y)
            run.log(loss=loss)
            opt.zero_grad(set_to_none=True)
            try:
                if scaler is not None:
                    factor = loss_scale_fault(step) if loss_scale_fault else 1.0
                    scaler.scale(loss * factor).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
            except gradwatch.StopTraining:
                outcome.stopped = True
                break
            if scheduler is not None:
                scheduler.step()
            outcome.losses.append(float(loss.detach()))
            outcome.steps = step
            if step % val_every == 0:
                model.eval()
                with torch.no_grad():
                    run.log(val_loss=nn.functional.mse_loss(model(val_x), val_y))
            if pace:
                time.sleep(pace)
            if run.should_stop:
                outcome.stopped = True
                break
    return outcome


# ---- the scenarios ----------------------------------------------------------------------


def healthy(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    return fit(run_options, model, opt, steps, Teacher(1), scheduler=warmup_cosine(opt, 50, steps), pace=pace)


def nonfinite(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def corrupt(step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if step == onset:  # one batch with a NaN feature poisons the weights for good
            x = x.clone()
            x[0, 0] = math.nan
        return x, y

    return fit(run_options, model, opt, steps, Teacher(2), before_step=corrupt, pace=pace)


def loss_spike(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def corrupt(step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x, y * 40.0) if step == onset else (x, y)  # one mislabelled batch

    return fit(run_options, model, opt, steps, Teacher(3), before_step=corrupt, pace=pace)


def exploding_gradients(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def corrupt(step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x * 100.0, y) if step >= onset else (x, y)  # unnormalised inputs from a new shard

    return fit(run_options, model, opt, steps, Teacher(4), before_step=corrupt, pace=pace)


def vanishing_gradients(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp(width=32, depth=14, act=nn.Sigmoid)  # deep sigmoid stack: the classic
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return fit(run_options, model, opt, steps, Teacher(5), pace=pace)


def dead_layer(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp(depth=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def corrupt(step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if step == onset:  # every ReLU unit of the second layer dies
            with torch.no_grad():
                model[2].bias.fill_(-1e4)
        return x, y

    return fit(run_options, model, opt, steps, Teacher(6), before_step=corrupt, pace=pace)


def plateau(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    # Linear regression with label noise and an LR too high for the gradient noise of
    # batch 4: the loss settles on a floor set by the LR, not by the data (about 2x the
    # noise floor). Halving the LR halves the excess: the remedy an action can apply.
    torch.manual_seed(7)
    model = nn.Linear(IN_FEATURES, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.07)
    teacher = Teacher(7, noise=1.0)
    teacher.net = nn.Linear(IN_FEATURES, 1)
    with torch.no_grad():
        teacher.net.weight.copy_(torch.randn(1, IN_FEATURES, generator=teacher.gen))
    return fit(run_options, model, opt, steps, teacher, batch=4, pace=pace)


def overfitting(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp(width=256, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    teacher = Teacher(8, noise=0.5)
    train_set = teacher.batch(32)  # a tiny noisy training set memorised after ~100 steps
    return fit(run_options, model, opt, steps, teacher, train_set=train_set, val_every=10, batch=32, pace=pace)


def amp_scale_collapse(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    # From onset on, every backward overflows (as when an fp16 activation saturates):
    # the scaler skips each step and halves the scale until it collapses.
    return fit(run_options, model, opt, steps, Teacher(9), scaler=scaler,
               loss_scale_fault=lambda step: math.inf if step >= onset else 1.0, pace=pace)


def update_ratio(run_options: dict[str, Any], steps: int, onset: int, pace: float) -> Outcome:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def corrupt(step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if step == onset:  # a config typo: lr 1e-3 -> 5e-2
            for group in opt.param_groups:
                group["lr"] = 5e-2
        return x, y

    return fit(run_options, model, opt, steps, Teacher(10), before_step=corrupt, pace=pace)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("healthy", None, 0, 400, "AdamW, warm-up + cosine, noisy but improving", healthy),
        Scenario("nonfinite", "nonfinite", 150, 300, "one batch with a NaN feature", nonfinite),
        Scenario("loss_spike", "loss_spike", 200, 300, "one mislabelled batch (targets x40)", loss_spike),
        Scenario("exploding_gradients", "exploding_gradients", 150, 300, "inputs x100 from a bad shard", exploding_gradients),
        Scenario("vanishing_gradients", "vanishing_gradients", 1, 300, "14-layer sigmoid MLP", vanishing_gradients),
        Scenario("dead_layer", "dead_layer", 150, 300, "all ReLUs of one layer die", dead_layer),
        Scenario("plateau", "plateau", 100, 800, "LR too high for the gradient noise: loss stuck on a floor", plateau),
        Scenario("overfitting", "overfitting", 100, 500, "32 noisy samples memorised", overfitting),
        Scenario("amp_scale_collapse", "amp_scale_collapse", 150, 300, "every step overflows under GradScaler", amp_scale_collapse),
        Scenario("update_ratio", "update_ratio", 150, 300, "LR typo 1e-3 -> 5e-2: every update moves weights by a third", update_ratio),
    ]
}
