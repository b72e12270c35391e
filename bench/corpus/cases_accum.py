"""Gradient accumulation: a small GPT on char-level synthetic English, four micro-batches
per AdamW step, each micro-batch loss divided by the number of micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

import gradwatch
from corpus import case
from corpus.common import GPT, CharCorpus, GPTConfig, eval_loss, warmup_cosine

STEPS = 300
ACCUMULATION = 4
MICRO_BATCH, BLOCK = 4, 64
LR = 3e-3
TEXT = CharCorpus.make(60_000, seed=2)


def all_parameters(net: GPT) -> list[nn.Parameter]:
    return list(net.parameters())


def _train(
    opts: dict[str, Any],
    *,
    params: Callable[[GPT], list[nn.Parameter]] = all_parameters,
    zero_grad_every_step: bool = True,
    steps: int = STEPS,
    val_every: int = 25,
    seed: int = 0,
) -> None:
    """Warm-up + cosine AdamW over `params(net)`, ACCUMULATION micro-batches per step;
    `zero_grad_every_step=False` clears the gradients once, before the loop, only."""
    torch.manual_seed(seed)
    net = GPT(GPTConfig(TEXT.vocab, block=BLOCK))
    opt = torch.optim.AdamW(params(net), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    lr_at = partial(warmup_cosine, max_lr=LR, warmup=30, total=steps, min_lr=LR / 10)
    g = torch.Generator().manual_seed(seed)
    val = [TEXT.batch("val", 16, BLOCK, torch.Generator().manual_seed(i)) for i in range(4)]
    opt.zero_grad(set_to_none=True)
    with gradwatch.attach(net, opt, **opts) as run:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            for _ in range(ACCUMULATION):
                x, y = TEXT.batch("train", MICRO_BATCH, BLOCK, g)
                _, loss = net(x, y)  # the probe captures it (averaged over the micro-batches)
                (loss / ACCUMULATION).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if zero_grad_every_step:
                opt.zero_grad(set_to_none=True)
            if (step + 1) % val_every == 0:
                run.log(val_loss=eval_loss(net, val))


@case("accum-gpt-healthy", description="GPT, 4 micro-batches per AdamW step, warm-up + cosine, val every 25")
def accum_gpt_healthy(opts: dict[str, Any]) -> None:
    """The reference accumulation loop: one probe record per optimizer step, on the summed
    gradients of four micro-batches."""
    _train(opts)


@case("accum-gpt-zero-grad-once", ("accumulating_gradients",), onset=2,
      description="GPT with accumulation whose opt.zero_grad() runs once, before the loop")
def accum_gpt_zero_grad_once(opts: dict[str, Any]) -> None:
    """A refactor moved `zero_grad` out of the loop: from step 2 on every step's gradient is
    the (clipped) sum over all micro-batches since the start. Clipping and Adam keep it
    from diverging: the loss falls, but ends twice as high as the healthy run's."""
    _train(opts, zero_grad_every_step=False)


def without_position_embedding(net: GPT) -> list[nn.Parameter]:
    """The bug: the parameter list was assembled by hand and `wpe` was forgotten."""
    return [p for name, p in net.named_parameters() if not name.startswith("wpe.")]


@case("accum-gpt-wpe-not-in-optimizer", ("not_updated", "accumulating_gradients"), onset=1,
      description="GPT with accumulation; the position embedding is left out of AdamW's parameters")
def accum_gpt_wpe_not_in_optimizer(opts: dict[str, Any]) -> None:
    """The position embedding gets a gradient every step but is never updated (and, left out
    of the optimizer, never zeroed by `opt.zero_grad()` either: its gradient sums across
    steps). The loss still falls."""
    _train(opts, params=without_position_embedding)
