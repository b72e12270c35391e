"""Char-level RNN language models updated by hand, without an optimizer: `attach(model)`,
`p -= lr * p.grad` under no_grad, gradients zeroed by hand (the probe records every
backward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import gradwatch
from corpus import case
from corpus.common import CharCorpus, CharRNN, eval_loss

STEPS = 300
BATCH, BLOCK = 16, 32
LR = 3.0
TEXT = CharCorpus.make(60_000, seed=1)


def _train(
    opts: dict[str, Any],
    *,
    lr_at: Callable[[int], float],
    cell: str = "lstm",
    zero_grads: bool = True,
    steps: int = STEPS,
    val_every: int = 50,
    seed: int = 0,
) -> None:
    """Plain SGD by hand with LR `lr_at(step)` (1-based); `zero_grads=False` is the bug of
    never clearing `.grad`."""
    torch.manual_seed(seed)
    net = CharRNN(TEXT.vocab, cell)
    g = torch.Generator().manual_seed(seed)
    val = [TEXT.batch("val", BATCH, BLOCK, torch.Generator().manual_seed(i)) for i in range(4)]
    with gradwatch.attach(net, **opts) as run:
        for step in range(1, steps + 1):
            x, y = TEXT.batch("train", BATCH, BLOCK, g)
            _, loss = net(x, y)  # the probe captures the returned loss
            loss.backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= lr_at(step) * p.grad
                    if zero_grads:
                        p.grad.zero_()
            if step % val_every == 0:
                run.log(val_loss=eval_loss(net, val))


# ---- healthy -------------------------------------------------------------------------------


@case("manual-lstm-lm-sgd", description="LSTM LM updated by hand, lr 3.0, no optimizer, val every 50")
def manual_lstm_lm(opts: dict[str, Any]) -> None:
    """The reference hand-updated run; the probe sees no optimizer, no LR, only gradients."""
    _train(opts, lr_at=lambda step: LR)


@case("manual-gru-lm-linear-decay", description="GRU LM updated by hand, lr 3.0 decayed linearly to 0")
def manual_gru_lm_decay(opts: dict[str, Any]) -> None:
    """A hand-written linear decay to 0: the loss flattens at the end because the LR does."""
    _train(opts, lr_at=lambda step: LR * (1 - step / STEPS), cell="gru")


# ---- pathologies -----------------------------------------------------------------------------


@case("manual-lstm-lm-lr-10x", ("divergence", "exploding_gradients"), onset=1,
      description="LSTM LM updated by hand with lr 30 (10x the reference), no clipping")
def manual_lstm_lm_lr_10x(opts: dict[str, Any]) -> None:
    """Ten times the LR of the reference run: within a few steps the loss jumps from ln(vocab)
    to 20-50 and stays between 7 and 20."""
    _train(opts, lr_at=lambda step: 10 * LR)


@case("manual-lstm-lm-grads-never-zeroed", ("accumulating_gradients", "divergence"), onset=1,
      description="LSTM LM updated by hand, lr 3.0, p.grad never zeroed")
def manual_lstm_lm_grads_never_zeroed(opts: dict[str, Any]) -> None:
    """`p.grad.zero_()` forgotten: each step subtracts the sum of all gradients so far, a
    step that keeps growing; the loss learns for ~80 steps, then climbs past its initial
    level."""
    _train(opts, lr_at=lambda step: LR, zero_grads=False)
