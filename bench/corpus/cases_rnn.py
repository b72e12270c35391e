"""LSTM and GRU models (a char-level LM on synthetic English, a motif classifier) trained
with `clip_grad_norm_`: the probe reports the pre-clip norm."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch
from corpus import case
from corpus.common import CharCorpus, CharRNN, eval_loss

STEPS = 400
BATCH, BLOCK = 16, 64
Batch = tuple[torch.Tensor, torch.Tensor]
MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

# ---- a sequence classification task: which of four motifs is hidden in the noise ----------

MOTIFS = torch.tensor([[1, 2, 3], [3, 2, 1], [4, 4, 5], [6, 0, 6]])
SEQ_VOCAB, SEQ_LEN = 8, 24


def motif_batch(batch: int, g: torch.Generator) -> Batch:
    """Random token sequences, each with its class's 3-token motif at a random place."""
    y = torch.randint(0, len(MOTIFS), (batch,), generator=g)
    x = torch.randint(0, SEQ_VOCAB, (batch, SEQ_LEN), generator=g)
    starts = torch.randint(0, SEQ_LEN - 3, (batch,), generator=g)
    for i, s in enumerate(starts.tolist()):
        x[i, s:s + 3] = MOTIFS[y[i]]
    return x, y


class MotifGRU(nn.Module):
    """Embedding, GRU, linear head on the last hidden state; forward returns (logits, loss)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(SEQ_VOCAB, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, len(MOTIFS))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, h = self.gru(self.embed(x))
        logits = self.head(h[-1])
        return logits, F.cross_entropy(logits, y)


# ---- the loop ------------------------------------------------------------------------------


def _train(
    opts: dict[str, Any],
    model: Callable[[], nn.Module],
    batches: Callable[[torch.Generator], Batch],
    make_optimizer: MakeOptimizer,
    *,
    clip: float = 1.0,
    steps: int = STEPS,
    val_every: int = 50,
    seed: int = 0,
) -> None:
    """Train `model()` (forward(x, y) -> (output, loss)) on `batches(g)`, clipping the
    gradient norm to `clip`; val loss on fixed batches every `val_every` steps."""
    torch.manual_seed(seed)
    net = model()
    opt = make_optimizer(net.parameters())
    g = torch.Generator().manual_seed(seed)
    val = [batches(torch.Generator().manual_seed(10_000 + i)) for i in range(4)]
    with gradwatch.attach(net, opt, **opts) as run:
        for step in range(1, steps + 1):
            x, y = batches(g)
            _, loss = net(x, y)  # the probe captures the returned loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            if step % val_every == 0:
                run.log(val_loss=eval_loss(net, val))


TEXT = CharCorpus.make(60_000)


def text_batches(g: torch.Generator) -> Batch:
    return TEXT.batch("train", BATCH, BLOCK, g)


def motif_batches(g: torch.Generator) -> Batch:
    return motif_batch(32, g)


def lstm_lm() -> CharRNN:
    return CharRNN(TEXT.vocab, "lstm")


def gru_lm() -> CharRNN:
    return CharRNN(TEXT.vocab, "gru")


def adam(lr: float) -> MakeOptimizer:
    return lambda params: torch.optim.Adam(params, lr=lr)


def sgd(lr: float) -> MakeOptimizer:
    return lambda params: torch.optim.SGD(params, lr=lr)


# ---- healthy -------------------------------------------------------------------------------


@case("rnn-lstm-lm-clip", description="LSTM LM, Adam 2e-3, clip 1.0, val every 50")
def rnn_lstm_lm(opts: dict[str, Any]) -> None:
    """The reference LSTM run: loss from ln(vocab) to ~0.3, the clip never active."""
    _train(opts, lstm_lm, text_batches, adam(2e-3))


@case("rnn-gru-lm-sgd-clip", description="GRU LM, plain SGD lr 1.0, clip 0.5")
def rnn_gru_lm_sgd(opts: dict[str, Any]) -> None:
    """The classic RNN recipe (large SGD step, tight clip): the clip engages on the larger steps."""
    _train(opts, gru_lm, text_batches, sgd(1.0), clip=0.5)


@case("rnn-gru-motifs-clip-norm-grows", description="GRU motif classifier, Adam 3e-3, clip 1.0, layers='module'")
def rnn_gru_motifs(opts: dict[str, Any]) -> None:
    """As the GRU starts finding the motifs (steps 30-60) its pre-clip gradient norm grows
    3-4x, with single steps up to 15x, and stays above its start: normal for RNNs (that is
    what the clip is for), not an explosion."""
    _train({**opts, "layers": "module"}, MotifGRU, motif_batches, adam(3e-3))


# ---- pathologies -----------------------------------------------------------------------------


@case("rnn-lstm-clip-1e-4", ("not_learning", "update_ratio"), onset=1,
      description="LSTM LM, SGD lr 1.0 with clip_grad_norm_(max_norm=1e-4)")
def rnn_lstm_clip_tiny(opts: dict[str, Any]) -> None:
    """max_norm=1e-4 (meant: 1.0): every step moves the weights by at most 1e-4 in total,
    so the loss stays at ln(vocab)."""
    _train(opts, lstm_lm, text_batches, sgd(1.0), clip=1e-4)


def _shuffled_labels(g: torch.Generator) -> Batch:
    """The bug: labels permuted within the batch, independently of the inputs."""
    x, y = motif_batch(32, g)
    return x, y[torch.randperm(len(y), generator=g)]


@case("rnn-gru-labels-shuffled", ("not_learning",), onset=1,
      description="GRU motif classifier whose labels are shuffled within each batch")
def rnn_gru_labels_shuffled(opts: dict[str, Any]) -> None:
    """Labels carry no information about the inputs: the loss cannot go below ln 4."""
    _train(opts, MotifGRU, _shuffled_labels, adam(3e-3))


@case("rnn-gru-lm-lr-too-high", ("divergence", "exploding_gradients"), onset=1,
      description="GRU LM, Adam lr 0.3 (100x too high), clip 1.0")
def rnn_gru_lm_lr_too_high(opts: dict[str, Any]) -> None:
    """Adam ignores the clip's scale: with lr 0.3 the loss shoots from 3.2 to ~25 and the
    pre-clip norm to 1e9 within 25 steps; the loss needs 150 steps to get back under its
    initial level and ends far above a healthy run (1.4 against 0.3)."""
    _train(opts, gru_lm, text_batches, adam(0.3))
