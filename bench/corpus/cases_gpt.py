"""Small GPTs on character-level synthetic English: nanoGPT's loop (AdamW, decay only on
matrices, linear warm-up + cosine decay set by hand each step, grad clip 1.0)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import gradwatch
from corpus import case
from corpus.common import GPT, CharCorpus, GPTConfig, eval_loss, warmup_cosine

STEPS = 400
BATCH, BLOCK = 16, 64
LR = 3e-3
cosine = partial(warmup_cosine, max_lr=LR, warmup=40, total=STEPS, min_lr=LR / 10)


def _train(
    opts: dict[str, Any],
    *,
    lr_at: Callable[[int], float] = cosine,
    weight_decay: float = 0.1,
    n_train: int = 60_000,
    val_every: int = 50,
    steps: int = STEPS,
    seed: int = 0,
    **model: Any,
) -> None:
    """Train a GPT (`model` overrides GPTConfig) for `steps` steps with LR `lr_at(step)`,
    logging val_loss every `val_every` steps."""
    torch.manual_seed(seed)
    data = CharCorpus.make(n_train, seed=seed)
    net = GPT(GPTConfig(data.vocab, block=BLOCK, **model))
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr_at(0), betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    val = [data.batch("val", BATCH, BLOCK, torch.Generator().manual_seed(i)) for i in range(4)]
    with gradwatch.attach(net, opt, **opts) as run:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x, y = data.batch("train", BATCH, BLOCK, g)
            _, loss = net(x, y)  # the probe captures the returned loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if (step + 1) % val_every == 0:
                run.log(val_loss=eval_loss(net, val))


# ---- healthy -------------------------------------------------------------------------------


@case("gpt-healthy", description="2-layer GPT, AdamW 3e-3, warm-up 40 then cosine to 3e-4, val every 50")
def gpt_healthy(opts: dict[str, Any]) -> None:
    """The reference run: loss falls from ln(vocab) to the grammar's floor and flattens there."""
    _train(opts)


@case("gpt-cosine-to-zero-every1", description="GPT whose cosine ends at lr 0, per-layer detail every step")
def gpt_cosine_to_zero(opts: dict[str, Any]) -> None:
    """The LR reaching 0 at the last step is a schedule, not a stall: updates shrink by design."""
    _train({**opts, "every": 1}, lr_at=partial(warmup_cosine, max_lr=LR, warmup=40, total=STEPS, min_lr=0.0))


@case("gpt-dropout-module-layers", description="3-layer GPT with dropout 0.1, layers='module'")
def gpt_dropout_module_layers(opts: dict[str, Any]) -> None:
    """Dropout makes the train loss noisier and higher than val: still a healthy run."""
    _train({**opts, "layers": "module"}, n_layer=3, dropout=0.1, steps=300,
           lr_at=partial(warmup_cosine, max_lr=LR, warmup=30, total=300, min_lr=LR / 10))


# ---- pathologies -----------------------------------------------------------------------------


@case("gpt-lr-1", ("divergence", "update_ratio", "exploding_gradients"), onset=1,
      description="GPT with AdamW max lr 1.0 (300x too high)")
def gpt_lr_1(opts: dict[str, Any]) -> None:
    """Peak LR 1.0: as the warm-up ramps, the loss climbs from 3.3 to 10-25 and stays above
    its initial level until the cosine decay has brought the LR down (~step 220); it ends at
    2.8 (unigram statistics) where the healthy run reaches 0.4. Updates are 10-30% of the
    weights and the pre-clip gradient norm grows ~10x."""
    _train(opts, lr_at=partial(warmup_cosine, max_lr=1.0, warmup=40, total=STEPS, min_lr=0.1))


@case("gpt-warmup-never-ends", ("not_learning", "update_ratio"), onset=1,
      description="warm-up of 2000 steps counted in tokens: lr climbs from 1.5e-9 to 6e-7 over the run")
def gpt_warmup_never_ends(opts: dict[str, Any]) -> None:
    """The warm-up length, meant in steps, was multiplied by the tokens per step: it would
    last 5000x longer than the run, so the LR never leaves 1e-9..6e-7 and the loss stays
    at ln(vocab)."""
    warmup = 2000 * BATCH * BLOCK
    _train(opts, lr_at=partial(warmup_cosine, max_lr=LR, warmup=warmup, total=STEPS, min_lr=LR / 10))


def _resumed_with_wrong_lr(step: int) -> float:
    """The schedule of a run resumed twice with a hand-edited LR: x30 at step 150, x300 at 250."""
    return cosine(step) * (300.0 if step >= 249 else 30.0 if step >= 149 else 1.0)


@case("gpt-lr-raised-in-stages", ("divergence", "update_ratio"), onset=150,
      description="GPT learning well, then LR x30 at step 150 and x300 at step 250: loss climbs to new levels")
def gpt_lr_raised_in_stages(opts: dict[str, Any]) -> None:
    """After a healthy start (loss 1.45) the LR is raised twice; each time the loss climbs
    back towards its initial level and stays far above its best: divergence in stages."""
    _train(opts, lr_at=_resumed_with_wrong_lr)


@case("gpt-overfits-tiny-text", ("overfitting",), onset=80,
      description="GPT n_embd 96 on a 600-character text, constant lr, no weight decay, val every 20 steps")
def gpt_overfits_tiny_text(opts: dict[str, Any]) -> None:
    """600 characters of training text for a 230k-parameter model: it memorises them (train
    loss to 0.15) while the val loss, flat from step ~60, turns up and keeps rising."""
    _train(opts, n_train=600, n_embd=96, val_every=20, weight_decay=0.0, steps=300, lr_at=lambda step: LR)
