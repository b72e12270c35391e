"""A BatchNorm CNN on 16x16 synthetic shape images: SGD with momentum and a step schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR, OneCycleLR

import gradwatch
from corpus import case
from corpus.common import ShapeCNN, shapes

STEPS = 400
BATCH = 64
Batch = tuple[torch.Tensor, torch.Tensor]


def step_drop(opt: torch.optim.Optimizer) -> LRScheduler:
    """The classic: LR / 10 after 150 and again after 300 steps."""
    return MultiStepLR(opt, milestones=[150, 300], gamma=0.1)


def _train(
    opts: dict[str, Any],
    *,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    schedule: Callable[[torch.optim.Optimizer], LRScheduler] = step_drop,
    model: Callable[[], ShapeCNN] = ShapeCNN,
    label_smoothing: float = 0.0,
    corrupt: Callable[[int, torch.Tensor, torch.Tensor], Batch] | None = None,
    steps: int = STEPS,
    val_every: int = 50,
    seed: int = 0,
) -> None:
    """Train `model()` with SGD(momentum 0.9) and `schedule`; `corrupt(step, x, y)` stands
    for the data pipeline of a case (1-based optimizer steps); val loss every `val_every`."""
    torch.manual_seed(seed)
    x_train, y_train = shapes(4096, seed)
    x_val, y_val = shapes(512, seed + 1)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = schedule(opt)
    g = torch.Generator().manual_seed(seed)
    with gradwatch.attach(net, opt, **opts) as run:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x_train), (BATCH,), generator=g)
            x, y = x_train[idx], y_train[idx]
            if corrupt is not None:
                x, y = corrupt(step, x, y)
            loss = F.cross_entropy(net(x), y, label_smoothing=label_smoothing)
            run.log(loss=loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            if step % val_every == 0:
                net.eval()
                with torch.no_grad():
                    logits = net(x_val)
                net.train()
                run.log(val_loss=F.cross_entropy(logits, y_val), val_acc=(logits.argmax(1) == y_val).float().mean())


# ---- healthy -------------------------------------------------------------------------------


@case("cnn-healthy-step-lr", description="BN CNN, SGD 0.05 momentum 0.9, LR / 10 at steps 150 and 300, val every 50")
def cnn_healthy_step_lr(opts: dict[str, Any]) -> None:
    """The reference run; each LR drop makes the loss step down, then flatten: healthy."""
    _train(opts)


@case("cnn-onecycle", description="BN CNN with OneCycleLR (peak 0.2, ends near 0)")
def cnn_onecycle(opts: dict[str, Any]) -> None:
    """OneCycle's annealing takes the LR to ~1e-6 by the last step: updates vanish by design."""
    _train(opts, schedule=lambda opt: OneCycleLR(opt, max_lr=0.2, total_steps=STEPS))


@case("cnn-label-smoothing-dropout-every5",
      description="BN CNN with label smoothing 0.1 and dropout 0.3 before the classifier, every=5")
def cnn_label_smoothing_dropout(opts: dict[str, Any]) -> None:
    """Label smoothing puts a floor under the train loss (~0.8 here, with dropout) and dropout
    adds noise: both are regularisers, the run is healthy."""
    _train({**opts, "every": 5}, label_smoothing=0.1, model=lambda: ShapeCNN(dropout=0.3))


# ---- pathologies -----------------------------------------------------------------------------


@case("cnn-lr-too-high", ("update_ratio", "not_learning"), onset=1,
      description="BN CNN, SGD momentum with lr 5.0 (100x too high)")
def cnn_lr_too_high(opts: dict[str, Any]) -> None:
    """LR 100x too high from step 1: every update is as large as the weights, and the loss
    bounces around chance (ln 6) until the schedule's second drop (lr 0.05 at step 300)."""
    _train(opts, lr=5.0)


@case("cnn-lr-gamma-typo", ("update_ratio", "divergence"), onset=150,
      description="MultiStepLR(gamma=10) typo for 0.1: LR x10 at step 150 and again at 300")
def cnn_lr_gamma_typo(opts: dict[str, Any]) -> None:
    """`gamma=10` where 0.1 was meant: at step 150 the LR goes up 10x instead of down, so the
    updates are 100x what the schedule intended; at step 300 the second jump (lr 5.0) sends
    the loss from 0.3 to above chance, where it stays."""
    _train(opts, schedule=lambda opt: MultiStepLR(opt, milestones=[150, 300], gamma=10.0))


def _nan_pixels_at_step_180(step: int, x: torch.Tensor, y: torch.Tensor) -> Batch:
    """A corrupt image (NaN pixels) reaches the model at step 180."""
    if step == 180:
        x = x.clone()
        x[5, 0, 2:6, 2:6] = float("nan")
    return x, y


@case("cnn-nan-pixels", ("nonfinite",), onset=180, description="one image with NaN pixels in the batch of step 180")
def cnn_nan_pixels(opts: dict[str, Any]) -> None:
    """A NaN input poisons the loss, every gradient and (after the step) every weight."""
    _train(opts, corrupt=_nan_pixels_at_step_180)


@case("cnn-weight-decay-huge", ("not_learning", "update_ratio", "vanishing_gradients", "dead_layer"), onset=1,
      description="SGD weight_decay=0.5 (1000x the usual 5e-4)")
def cnn_weight_decay_huge(opts: dict[str, Any]) -> None:
    """Decay shrinks every weight by 2.5% a step, far more than the gradient can restore:
    the weights collapse, the loss stays at chance (ln 6), and the gradient reaching the
    lower layers fades to exactly zero (so vanishing / dead layers are true findings too)."""
    _train(opts, weight_decay=0.5)


class DetachedSkipCNN(ShapeCNN):
    """The bug: the projection shortcut's output is detached, so `proj` never gets a gradient."""

    def skip(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).detach()


@case("cnn-skip-detached", ("dead_layer",), onset=1, description="shortcut branch .detach()ed: proj gets no gradient")
def cnn_skip_detached(opts: dict[str, Any]) -> None:
    """The main path learns, so the loss looks fine; the shortcut's 1x1 conv is never trained."""
    _train(opts, model=DetachedSkipCNN)


def _mislabelled_batch_at_step_250(step: int, x: torch.Tensor, y: torch.Tensor) -> Batch:
    """A batch whose labels are all shifted by one class (a bad shard) at step 250."""
    return (x, (y + 1) % 6) if step == 250 else (x, y)


@case("cnn-mislabelled-batch", ("loss_spike",), onset=250, description="every label of the step-250 batch is wrong")
def cnn_mislabelled_batch(opts: dict[str, Any]) -> None:
    """One wrongly labelled batch on a confident model: a loss spike, then it recovers."""
    _train(opts, corrupt=_mislabelled_batch_at_step_250)
