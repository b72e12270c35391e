"""MLP classifiers and regressions on synthetic data, across optimizers (SGD, SGD with
Nesterov momentum, Adam, AdamW, RMSprop, Adagrad)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    StepLR,
)

import gradwatch
from corpus import case
from corpus.common import blobs, mlp, smooth_regression

Data = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split(data: Data, n: int) -> tuple[Data, Data]:
    """The first `n` samples and the rest (train and val drawn from one distribution)."""
    x, y = data
    return (x[:n], y[:n]), (x[n:], y[n:])


BLOBS, BLOBS_VAL = split(blobs(5120, classes=10, dim=32, seed=0), 4096)
REGRESSION, REGRESSION_VAL = split(smooth_regression(5120, dim=16, seed=0, noise=0.1), 4096)


def classifier() -> nn.Sequential:
    return mlp([32, 128, 128, 10])


def regressor() -> nn.Sequential:
    return mlp([16, 128, 128, 1])


def _train(
    opts: dict[str, Any],
    model: Callable[[], nn.Module],
    train: Data,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    loss_fn: LossFn = F.cross_entropy,
    schedule: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
    corrupt: Callable[[int, torch.Tensor, torch.Tensor], Data] | None = None,
    penalty: Callable[[int, nn.Module], torch.Tensor] | None = None,
    val: Data | None = None,
    val_every: int = 25,
    zero_grad: bool = True,
    steps: int = 400,
    batch: int = 64,
    seed: int = 0,
) -> None:
    """Minibatch training of `model()` on `train`; `corrupt(step, x, y)` stands for the data
    pipeline of a case and `penalty(step, net)` for a regulariser added to the loss (1-based
    optimizer steps); val loss every `val_every` steps if `val`. `zero_grad=False` is the
    missing `opt.zero_grad()` bug."""
    torch.manual_seed(seed)
    net = model()
    opt = make_optimizer(net)
    scheduler = schedule(opt) if schedule is not None else None
    g = torch.Generator().manual_seed(seed)
    with gradwatch.attach(net, opt, **opts) as run:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(train[0]), (batch,), generator=g)
            x, y = train[0][idx], train[1][idx]
            if corrupt is not None:
                x, y = corrupt(step, x, y)
            loss = loss_fn(net(x), y)
            if penalty is not None:
                loss = loss + penalty(step, net)
            run.log(loss=loss)
            if zero_grad:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            if val is not None and step % val_every == 0:
                net.eval()
                with torch.no_grad():
                    run.log(val_loss=loss_fn(net(val[0]), val[1]))
                net.train()


def adam(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda net: torch.optim.Adam(net.parameters(), lr=lr)


def sgd(lr: float, momentum: float = 0.0, nesterov: bool = False) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda net: torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, nesterov=nesterov)


# ---- healthy -------------------------------------------------------------------------------


@case("mlp-blobs-healthy", description="10-class blobs, Adam 1e-3")
def mlp_blobs_healthy(opts: dict[str, Any]) -> None:
    """The reference classifier: loss from ln 10 to near 0 within 100 steps, then flat."""
    _train(opts, classifier, BLOBS, adam(1e-3))


def _linear_teacher(n: int, dim: int, seed: int) -> Data:
    """A noise-free linear target: an MLP can fit it (almost) exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x, x @ (torch.randn(dim, 1, generator=g) / dim**0.5)


@case("mlp-regression-fits-perfectly", description="noise-free linear target, Adam 3e-3 cosine to 0, 600 steps")
def mlp_regression_fits_perfectly(opts: dict[str, Any]) -> None:
    """The MSE falls from ~1 to 7e-4 and keeps creeping towards 0: relative changes of a
    loss near 0 are large and its gradients tiny, yet the run is healthy."""
    _train(opts, regressor, _linear_teacher(4096, dim=16, seed=1), adam(3e-3), loss_fn=F.mse_loss, steps=600,
           schedule=lambda opt: CosineAnnealingLR(opt, T_max=600))


def _noisy_labels(n: int, flip: float, seed: int) -> Data:
    """Blobs where a fraction `flip` of the labels is replaced by a random class."""
    x, y = blobs(n, classes=10, dim=32, seed=seed, spread=1.0)
    g = torch.Generator().manual_seed(seed + 1)
    flipped = torch.rand(n, generator=g) < flip
    return x, torch.where(flipped, torch.randint(0, 10, (n,), generator=g), y)


@case("mlp-tiny-noisy-batches", description="overlapping blobs, 20% random labels, batch 4, SGD 0.02")
def mlp_tiny_noisy_batches(opts: dict[str, Any]) -> None:
    """Batches of 4 with label noise: the per-step loss jumps between 0.1 and 4 all run long;
    its average falls to ~0.9, the floor that 20% random labels impose. Noise, not spikes,
    and a converged run, not a plateau."""
    _train(opts, classifier, _noisy_labels(4096, 0.2, seed=3), sgd(0.02), batch=4, steps=800)


@case("mlp-nesterov-step-drop", description="regression, SGD 0.02 Nesterov momentum 0.9, LR / 10 at step 200")
def mlp_nesterov_step_drop(opts: dict[str, Any]) -> None:
    """The step drop halves the loss's noise and moves it down a notch: healthy."""
    _train(opts, regressor, REGRESSION, sgd(0.02, momentum=0.9, nesterov=True), loss_fn=F.mse_loss,
           schedule=lambda opt: StepLR(opt, step_size=200, gamma=0.1), val=REGRESSION_VAL, val_every=50)


@case("mlp-rmsprop-regression", description="regression, RMSprop 1e-3, val every 25")
def mlp_rmsprop_regression(opts: dict[str, Any]) -> None:
    """RMSprop on the noisy regression: a steady descent (val 1.7 to 0.19) with no drama."""
    _train(opts, regressor, REGRESSION, lambda net: torch.optim.RMSprop(net.parameters(), lr=1e-3),
           loss_fn=F.mse_loss, val=REGRESSION_VAL)


@case("mlp-adagrad-blobs", description="10-class blobs, Adagrad 0.05")
def mlp_adagrad_blobs(opts: dict[str, Any]) -> None:
    """Adagrad's effective step shrinks as squared gradients pile up: slowing is by design."""
    _train(opts, classifier, BLOBS, lambda net: torch.optim.Adagrad(net.parameters(), lr=0.05), val=BLOBS_VAL)


@case("mlp-adamw-linear-to-zero", description="regression, AdamW 2e-3 with LinearLR down to exactly 0")
def mlp_adamw_linear_to_zero(opts: dict[str, Any]) -> None:
    """The LR reaches 0 at the last step: the final updates vanish because they should."""
    _train(opts, regressor, REGRESSION, lambda net: torch.optim.AdamW(net.parameters(), lr=2e-3),
           loss_fn=F.mse_loss, schedule=lambda opt: LinearLR(opt, 1.0, 0.0, total_iters=400))


# ---- pathologies -----------------------------------------------------------------------------


@case("mlp-blobs-lr-too-high", ("divergence", "exploding_gradients"), onset=1,
      description="10-class blobs, Adam lr 1.0 from step 1")
def mlp_blobs_lr_too_high(opts: dict[str, Any]) -> None:
    """Adam with lr 1.0 (1000x the usual): the loss swings between 0 and 1e4-1e5 (far above
    ln 10) all run long and gradient norms reach 1e3-1e4."""
    _train(opts, classifier, BLOBS, adam(1.0))


@case("mlp-sgd-lr-1e-7", ("not_learning", "update_ratio"), onset=1, description="10-class blobs, SGD lr 1e-7")
def mlp_sgd_lr_1e_7(opts: dict[str, Any]) -> None:
    """An LR of 1e-7 (a typo for 1e-1): updates of 1e-8 of the weights, loss flat at ln 10."""
    _train(opts, classifier, BLOBS, sgd(1e-7))


def _handwritten_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy written out by hand: log(0) once a sigmoid saturates to 1.0."""
    p = torch.sigmoid(logits.squeeze(1))
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


@case("mlp-bce-log-zero", ("nonfinite",), onset=267,
      description="hand-written BCE, Adam 1e-3: a sigmoid saturates to 1.0 at step 267, log(1 - p) = -inf")
def mlp_bce_log_zero(opts: dict[str, Any]) -> None:
    """As the classifier grows confident a sigmoid rounds to exactly 1.0 in float32; the
    hand-written log(1 - p) gives -inf and 0 * -inf gives NaN: from that step on the loss,
    the gradients and then every weight are NaN."""
    x, y = blobs(4096, classes=2, dim=32, seed=5, spread=1.0)
    _train(opts, lambda: mlp([32, 128, 128, 1]), (x, y.float()), adam(1e-3), loss_fn=_handwritten_bce)


@case("mlp-missing-zero-grad", ("accumulating_gradients", "divergence"), onset=1,
      description="10-class blobs, SGD momentum 0.9, opt.zero_grad() forgotten")
def mlp_missing_zero_grad(opts: dict[str, Any]) -> None:
    """Without zero_grad every step applies the sum of all past gradients: the step grows
    without bound and the loss leaves its minimum."""
    _train(opts, classifier, BLOBS, sgd(0.01, momentum=0.9), zero_grad=False)


@case("mlp-layer-left-out", ("not_updated", "accumulating_gradients"), onset=1,
      description="optimizer built from a list of layers that misses the middle Linear")
def mlp_layer_left_out(opts: dict[str, Any]) -> None:
    """`Adam([*net[0].parameters(), *net[4].parameters()])`: the middle layer gets gradients
    but is never updated; the loss still falls, so nothing looks wrong. `opt.zero_grad()`
    does not clear it either, so its gradient also sums across steps (a true finding)."""
    _train(opts, classifier, BLOBS, lambda net: torch.optim.Adam([*net[0].parameters(), *net[4].parameters()], lr=1e-3))


@case("mlp-deep-sigmoid", ("vanishing_gradients", "not_learning", "update_ratio"), onset=1,
      description="12 sigmoid layers of 64, default init, SGD 0.1")
def mlp_deep_sigmoid(opts: dict[str, Any]) -> None:
    """Each sigmoid scales the gradient by at most 1/4: after 12 of them the first layer's
    gradient is ~1e-11, its updates ~0 relative to its weights, and the loss stays at ln 10."""
    _train(opts, lambda: mlp([32] + [64] * 12 + [10], act=nn.Sigmoid), BLOBS, sgd(0.1))


def deep_tanh_tiny_init() -> nn.Sequential:
    """8 tanh layers of 64 initialised N(0, 0.02): each layer shrinks the signal ~6x."""
    net = mlp([32] + [64] * 8 + [10], act=nn.Tanh)
    for module in net:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return net


@case("mlp-deep-tanh-tiny-init", ("vanishing_gradients", "not_learning", "update_ratio"), onset=1,
      description="8 tanh layers of 64 with weights N(0, 0.02), SGD 0.1 momentum 0.9")
def mlp_deep_tanh_tiny_init(opts: dict[str, Any]) -> None:
    """An init far below Xavier's: activations and gradients shrink layer by layer, the first
    layer's gradient is ~1e-8 and the loss stays at ln 10."""
    _train(opts, deep_tanh_tiny_init, BLOBS, sgd(0.1, momentum=0.9))


@case("mlp-targets-unnormalised", ("exploding_gradients", "divergence", "nonfinite", "update_ratio"), onset=1,
      description="regression on targets in raw units (x100), SGD 0.01 momentum 0.9")
def mlp_targets_unnormalised(opts: dict[str, Any]) -> None:
    """Targets 100x larger than the model's outputs: the MSE gradients are 1e2-1e4x too large,
    the gradient norm grows by 1e9 in five steps and the loss reaches inf at step 7."""
    x, y = REGRESSION
    _train(opts, regressor, (x, y * 100), sgd(0.01, momentum=0.9), loss_fn=F.mse_loss)


def _unscaled_inputs_from_step_250(step: int, x: torch.Tensor, y: torch.Tensor) -> Data:
    """From step 250 the features arrive unstandardised (x100): a preprocessing step dropped."""
    return (x * 100, y) if step >= 250 else (x, y)


@case("mlp-inputs-x100-midrun", ("exploding_gradients", "divergence", "nonfinite"), onset=250,
      description="regression, SGD momentum, inputs x100 from step 250, no clipping")
def mlp_inputs_x100(opts: dict[str, Any]) -> None:
    """100x larger inputs make the first layer's gradient 100x larger and the outputs huge:
    the gradients explode and the loss with them."""
    _train(opts, regressor, REGRESSION, sgd(0.01, momentum=0.9), loss_fn=F.mse_loss,
           corrupt=_unscaled_inputs_from_step_250)


def _outlier_targets_at_step_200(step: int, x: torch.Tensor, y: torch.Tensor) -> Data:
    """One batch whose targets are in the wrong unit (x30) at step 200."""
    return (x, y * 30) if step == 200 else (x, y)


@case("mlp-regression-outlier-batch", ("loss_spike",), onset=200,
      description="regression, Adam 1e-3, one batch of x30 targets at step 200")
def mlp_regression_outlier_batch(opts: dict[str, Any]) -> None:
    """One bad batch: the loss jumps four orders of magnitude at that step, stays raised for
    a few dozen steps while Adam's moments settle, then the run is back where it was."""
    _train(opts, regressor, REGRESSION, adam(1e-3), loss_fn=F.mse_loss, corrupt=_outlier_targets_at_step_200)


@case("mlp-overfits-small-train-set", ("overfitting",), onset=30,
      description="256 samples with 50% noisy labels, 256-wide MLP, Adam 1e-3, val every 10")
def mlp_overfits(opts: dict[str, Any]) -> None:
    """Too few, noisily labelled samples for 75k parameters: the model memorises the wrong
    labels while the val loss, after its minimum at step 30, climbs from 1.9 to 4.1."""
    train, val = split(_noisy_labels(256 + 2048, flip=0.5, seed=7), 256)
    _train(opts, lambda: mlp([32, 256, 256, 10]), train, adam(1e-3), batch=32, val=val, val_every=10)


@case("mlp-plateau-lr-noise-floor", ("plateau", "update_ratio"), onset=100,
      description="regression, SGD 0.1 constant with batch 8: stuck on a floor set by gradient noise")
def mlp_plateau_lr_noise_floor(opts: dict[str, Any]) -> None:
    """The loss falls fast, then from step ~100 stalls on a floor (~0.5) three times above
    what the same model reaches with a smaller or decayed LR (~0.15): the LR is too high for
    the gradient noise, and the updates are 1-100% of the weights."""
    _train(opts, regressor, REGRESSION, sgd(0.1), loss_fn=F.mse_loss, batch=8, val=REGRESSION_VAL, val_every=50)


class BottleneckRegressor(nn.Module):
    """16 -> 128 -> 16 -> 1 with ReLUs; keeps the 16-unit bottleneck's activations in `code`."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = mlp([16, 128, 16])
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.code = torch.relu(self.encoder(x))
        return self.head(self.code)


def _activity_penalty_from_step_200(step: int, net: nn.Module) -> torch.Tensor:
    """An L1 activity penalty on the bottleneck, switched on at step 200 with coefficient 30
    (meant: 0.03)."""
    return 30.0 * net.code.mean() if step >= 200 else torch.zeros(())


@case("mlp-relus-die-midrun", ("dead_layer", "vanishing_gradients", "divergence"), onset=200,
      description="regression, SGD momentum, an L1 activity penalty 1000x too strong from step 200")
def mlp_relus_die_midrun(opts: dict[str, Any]) -> None:
    """The penalty pushes every bottleneck unit's pre-activation down at once: within ~20
    steps all 16 ReLUs output 0 for every input and stay dead, the layers below get exactly
    zero gradient, and the model falls back to a constant (loss from 0.2 to ~3, its
    initial level)."""
    _train(opts, BottleneckRegressor, REGRESSION, sgd(0.01, momentum=0.9), loss_fn=F.mse_loss,
           penalty=_activity_penalty_from_step_200)


def _lr_x100_from_step_250(step: int) -> float:
    """LambdaLR factor: x100 from step 250, as when a resumed run is given lr=1.0 for 0.01."""
    return 100.0 if step >= 249 else 1.0


@case("mlp-lr-raised-to-nan", ("divergence", "nonfinite", "exploding_gradients", "update_ratio"), onset=250,
      description="regression, SGD momentum 0.01, LR x100 from step 250: loss explodes to NaN")
def mlp_lr_raised_to_nan(opts: dict[str, Any]) -> None:
    """A mid-run LR change to 1.0: within a few steps the loss explodes through inf to NaN."""
    _train(opts, regressor, REGRESSION, sgd(0.01, momentum=0.9), loss_fn=F.mse_loss,
           schedule=partial(LambdaLR, lr_lambda=_lr_x100_from_step_250))
