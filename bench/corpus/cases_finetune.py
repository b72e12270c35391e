"""Fine-tuning a "pretrained" CNN: the backbone is first trained (without the probe) on
clean shape images, then gets a new classifier head and is fine-tuned on noisier images
with two param groups (backbone at a tenth of the head's LR). Layers are frozen and
unfrozen by toggling `requires_grad` after `attach`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch
from corpus import case
from corpus.common import ShapeCNN, shapes

STEPS = 300
BATCH = 64
HEAD_LR = 0.05


def pretrained(steps: int = 150, seed: int = 0) -> ShapeCNN:
    """A ShapeCNN trained for `steps` SGD steps on clean images (noise 1.0)."""
    torch.manual_seed(seed)
    net = ShapeCNN()
    x, y = shapes(2048, seed=100, noise=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


def backbone(net: ShapeCNN) -> list[nn.Parameter]:
    """Every parameter except the final Linear classifier's."""
    head = {id(p) for p in net.head[-1].parameters()}
    return [p for p in net.parameters() if id(p) not in head]


def replace_head(net: ShapeCNN) -> None:
    """A fresh classifier for the new task."""
    old = net.head[-1]
    net.head[-1] = nn.Linear(old.in_features, old.out_features)


def make_optimizer(net: ShapeCNN) -> torch.optim.Optimizer:
    """SGD with momentum; the backbone at a tenth of the head's LR."""
    head = list(net.head[-1].parameters())
    return torch.optim.SGD([{"params": backbone(net), "lr": HEAD_LR / 10}, {"params": head}], lr=HEAD_LR, momentum=0.9)


def set_trainable(params: list[nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


def _finetune(
    opts: dict[str, Any],
    *,
    trainable_at: Callable[[int], bool],
    optimizer_before_new_head: bool = False,
    steps: int = STEPS,
    val_every: int = 50,
    seed: int = 0,
) -> None:
    """Fine-tune with the backbone trainable at step s iff `trainable_at(s)` (1-based).
    `optimizer_before_new_head=True` is the bug of building the optimizer first."""
    net = pretrained(seed=seed)
    x_train, y_train = shapes(4096, seed=200)
    x_val, y_val = shapes(512, seed=201)
    if optimizer_before_new_head:
        opt = make_optimizer(net)
        replace_head(net)
    else:
        replace_head(net)
        opt = make_optimizer(net)
    g = torch.Generator().manual_seed(seed)
    with gradwatch.attach(net, opt, **opts) as run:
        for step in range(1, steps + 1):
            set_trainable(backbone(net), trainable_at(step))
            idx = torch.randint(0, len(x_train), (BATCH,), generator=g)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            run.log(loss=loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % val_every == 0:
                net.eval()
                with torch.no_grad():
                    run.log(val_loss=F.cross_entropy(net(x_val), y_val))
                net.train()


@case("finetune-freeze-then-unfreeze", description="backbone frozen for 100 steps (head only), then unfrozen at lr/10")
def finetune_freeze_then_unfreeze(opts: dict[str, Any]) -> None:
    """The standard recipe: train the new head on a frozen backbone, then unfreeze. The
    backbone has no gradient for 100 steps by design; nothing is wrong."""
    _finetune(opts, trainable_at=lambda step: step > 100)


@case("finetune-progressive-freeze", description="full fine-tune, backbone frozen from step 150 on")
def finetune_progressive_freeze(opts: dict[str, Any]) -> None:
    """Fine-tune everything, then freeze the backbone to finish the head cheaply: from step
    150 the backbone's gradients stop by design."""
    _finetune(opts, trainable_at=lambda step: step <= 150)


@case("finetune-new-head-not-in-optimizer", ("not_updated", "accumulating_gradients"), onset=1,
      description="optimizer built before the classifier was replaced: the new head is never updated")
def finetune_new_head_not_in_optimizer(opts: dict[str, Any]) -> None:
    """The optimizer holds the old head's tensors; the new head gets gradients that nothing
    applies (nor zeroes: they sum across steps). The backbone adapts to a random head, so
    the loss still falls, slowly."""
    _finetune(opts, trainable_at=lambda step: True, optimizer_before_new_head=True)
