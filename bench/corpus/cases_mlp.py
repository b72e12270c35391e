"""MLP regressions and classifiers on synthetic data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import gradwatch
from corpus import case


def _blobs(n: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def _classifier(opts: dict[str, Any], lr: float, steps: int = 400, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, y = _blobs(4096, 10, 32, seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    with gradwatch.attach(model, opt, **opts) as run:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            run.log(loss=loss)
            opt.zero_grad()
            loss.backward()
            opt.step()


@case("mlp-blobs-healthy", description="10-class blobs, Adam 1e-3")
def mlp_blobs_healthy(opts: dict[str, Any]) -> None:
    _classifier(opts, lr=1e-3)


@case("mlp-blobs-lr-too-high", ("divergence",), onset=1, description="10-class blobs, Adam lr 1.0 from step 1")
def mlp_blobs_lr_too_high(opts: dict[str, Any]) -> None:
    _classifier(opts, lr=1.0)
