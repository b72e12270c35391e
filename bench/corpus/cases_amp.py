"""Mixed precision on the CPU: fp16 autocast with `torch.amp.GradScaler("cpu")`, passed to
`attach(scaler=...)` so the probe reports the loss scale and the skipped steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

import gradwatch
from corpus import case
from corpus.common import blobs, mlp

STEPS = 400
BATCH = 64
Batch = tuple[torch.Tensor, torch.Tensor]
DATA = blobs(4096, classes=10, dim=32, seed=11, spread=0.4)


def _train(
    opts: dict[str, Any],
    *,
    corrupt: Callable[[int, torch.Tensor, torch.Tensor], Batch] | None = None,
    init_scale: float = 2.0**20,
    growth_interval: int = 25,
    steps: int = STEPS,
    seed: int = 0,
) -> None:
    """An MLP classifier under fp16 autocast, Adam 1e-3, GradScaler with `init_scale` and
    `growth_interval`; `corrupt(step, x, y)` stands for the data pipeline (1-based steps)."""
    torch.manual_seed(seed)
    net = mlp([32, 256, 256, 10])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = DATA
    with gradwatch.attach(net, opt, scaler=scaler, **opts) as run:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x_all), (BATCH,), generator=g)
            x, y = x_all[idx], y_all[idx]
            if corrupt is not None:
                x, y = corrupt(step, x, y)
            with torch.autocast("cpu", dtype=torch.float16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            run.log(loss=loss)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


@case("amp-fp16-scale-dynamics", description="fp16 MLP, GradScaler init 2**20 growing every 25 steps")
def amp_fp16_scale_dynamics(opts: dict[str, Any]) -> None:
    """The scale doubles every 25 clean steps until the scaled gradients overflow fp16, then
    halves (one skipped step) and grows again: the normal saw-tooth, not a collapse."""
    _train(opts)


def _raw_feature_from_step_250(step: int, x: torch.Tensor, y: torch.Tensor) -> Batch:
    """From step 250 one feature arrives in raw units (~1e5): a new data shard unnormalised."""
    if step >= 250:
        x = x.clone()
        x[:, 0] = x[:, 0] * 1e5
    return x, y


@case("amp-fp16-scale-collapse", ("amp_scale_collapse", "nonfinite"), onset=250,
      description="fp16 MLP; from step 250 a raw feature (~1e5) overflows fp16 activations")
def amp_fp16_scale_collapse(opts: dict[str, Any]) -> None:
    """From step 250 the first layer's fp16 outputs overflow to inf on every batch: every
    step is skipped and GradScaler halves the scale each time, down to ~0."""
    _train(opts, corrupt=_raw_feature_from_step_250)
