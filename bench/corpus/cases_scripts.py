"""Well-known public training scripts, replicated in miniature, with exactly one line added:
`with gradwatch.attach(model, optimizer, **opts):` around the training loop (`attach(model,
**opts)` where the script has no optimizer). Nothing else is gradwatch-specific: no
`run.log(loss=...)`, no `loss_fn=`, no validation loss reported, so the probe must find
the loss itself, from `loss.backward()` or from a model that returns its loss. This is how
users try a monitor out: their script, one line.

Each replica keeps its script's choices (model shape, loss, optimizer, LR, schedule,
clipping, zero_grad placement, eval cadence) and is scaled down to a few hundred steps on
one CPU thread, on data made in code:

- pytorch/examples `mnist/main.py`: 2-conv Net, F.nll_loss, Adadelta lr 1.0, StepLR per epoch;
- pytorch/examples `word_language_model/main.py`: LSTM RNNModel, SGD by hand, clip 0.25,
  hidden state repackaged between batches, lr /= 4 when the val loss stops improving;
- pytorch/examples `imagenet/main.py`: a ResNet of BasicBlocks, SGD momentum, StepLR;
- karpathy/nanoGPT `train.py`: GPT returning (logits, loss), AdamW with decay groups,
  warm-up + cosine set by hand, gradient accumulation, clip 1.0, a disabled GradScaler;
- transformers' `run_glue_no_trainer.py`: a BERT-style classifier whose forward returns a
  ModelOutput with `loss`, AdamW, linear schedule with warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR, StepLR

import gradwatch
from corpus import case
from corpus.common import (
    GPT,
    CharCorpus,
    GPTConfig,
    grammar_text,
    shapes,
    warmup_cosine,
)

Batch = tuple[torch.Tensor, torch.Tensor]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, g: torch.Generator | None) -> Iterator[Batch]:
    """A DataLoader over (x, y): shuffled with `g` (None: in order), last partial batch kept."""
    order = torch.randperm(len(x), generator=g) if g is not None else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


# ==== 1. pytorch/examples mnist/main.py ======================================================

# Seven-segment strokes (x0, y0, x1, y1) in a unit box, y pointing down, and the segments
# each digit lights: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle.
_SEGMENTS = torch.tensor([
    [0, 0, 1, 0], [1, 0, 1, .5], [1, .5, 1, 1], [0, 1, 1, 1], [0, .5, 0, 1], [0, 0, 0, .5], [0, .5, 1, .5],
])
_DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")
_LIT = torch.tensor([[s in lit for s in "abcdefg"] for lit in _DIGIT_SEGMENTS])


def digit_images(n: int, seed: int, size: int = 28) -> Batch:
    """MNIST-like 28x28 images of handwritten-ish digits: seven-segment strokes with random
    size, position, slant, stroke width and per-endpoint jitter, plus a little noise; values
    in [0, 1] then normalised with MNIST's (0.1307, 0.3081) as the script's transform does."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    u = torch.rand(n, 6, generator=g)
    width, height = 8 + 5 * u[:, 0], 14 + 5 * u[:, 1]
    left, top = (size - width) / 2 + 4 * (u[:, 2] - 0.5), (size - height) / 2 + 4 * (u[:, 3] - 0.5)
    slant, thick = 0.6 * (u[:, 4] - 0.5), 0.5 + 0.8 * u[:, 5]
    seg = _SEGMENTS.expand(n, 7, 4) + 0.08 * torch.randn(n, 7, 4, generator=g)
    ys = top.view(n, 1, 1) + seg[..., 1::2] * height.view(n, 1, 1)
    xs = left.view(n, 1, 1) + seg[..., 0::2] * width.view(n, 1, 1)
    xs = xs + slant.view(n, 1, 1) * (height.view(n, 1, 1) / 2 - (ys - top.view(n, 1, 1)))  # slant about the middle
    p0, p1 = torch.stack([xs[..., 0], ys[..., 0]], -1), torch.stack([xs[..., 1], ys[..., 1]], -1)  # (n, 7, 2)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    pixels = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(1, 1, -1, 2)  # (1, 1, P, 2)
    d = (p1 - p0).unsqueeze(2)
    t = (((pixels - p0.unsqueeze(2)) * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    dist = (pixels - p0.unsqueeze(2) - t.unsqueeze(-1) * d).norm(dim=-1)  # (n, 7, P)
    ink = (thick.view(n, 1, 1) + 0.5 - dist).clamp(0, 1) * _LIT[y].unsqueeze(-1)
    images = (ink.amax(1) + 0.1 * torch.randn(n, size * size, generator=g)).clamp(0, 1)
    return ((images.view(n, 1, size, size) - 0.1307) / 0.3081), y


class MnistNet(nn.Module):
    """The script's Net, channels 32/64/128 scaled to 8/16/64 (same layers, dropout, shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(16 * 12 * 12, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def mnist_train_epoch(model: nn.Module, train_data: Batch, optimizer: torch.optim.Optimizer,
                      g: torch.Generator) -> None:
    """The script's `train()` for one epoch (batch 64, shuffled)."""
    model.train()
    for data, target in batches(*train_data, 64, g):
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def mnist_test(model: nn.Module, test_data: Batch) -> tuple[float, float]:
    """Mean test loss and accuracy (the script prints them after each epoch)."""
    model.eval()
    test_loss, correct = 0.0, 0
    for data, target in batches(*test_data, 1000, None):
        output = model(data)
        test_loss += F.nll_loss(output, target, reduction="sum").item()
        correct += int((output.argmax(dim=1) == target).sum())
    return test_loss / len(test_data[1]), correct / len(test_data[1])


def mnist_main(opts: dict[str, Any], *, lr: float = 1.0, gamma: float = 0.7, epochs: int = 4,
               train_size: int = 6400) -> None:
    """`main()` of mnist/main.py: Adadelta(lr), StepLR(step_size=1, gamma) stepped after each
    epoch, test after each epoch; `train_size` / 64 steps per epoch."""
    torch.manual_seed(1)
    train_data, test_data = digit_images(train_size, seed=0), digit_images(1000, seed=1)
    g = torch.Generator().manual_seed(1)
    model = MnistNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=gamma)
    with gradwatch.attach(model, optimizer, **opts):
        for _epoch in range(1, epochs + 1):
            mnist_train_epoch(model, train_data, optimizer, g)
            mnist_test(model, test_data)
            scheduler.step()


@case("script-mnist-healthy",
      description="pytorch/examples mnist: Net, nll_loss, Adadelta lr 1.0, StepLR(1 epoch, 0.7), 4 epochs of 100 steps")
def script_mnist_healthy(opts: dict[str, Any]) -> None:
    """pytorch/examples `mnist/main.py` as published (lr 1.0, gamma 0.7, batch 64), scaled
    down: conv widths 8/16 and fc 64 (from 32/64/128), 4 epochs of 100 steps (from 14 of
    938) on synthetic seven-segment digits. The model returns log-probabilities; the loss
    exists only outside it (`F.nll_loss`), so the probe reads it from `loss.backward()`."""
    mnist_main(opts)


@case("script-mnist-adadelta-lr100", ("dead_layer", "not_learning", "not_updated", "update_ratio", "loss_spike"),
      onset=1,
      description="pytorch/examples mnist with --lr 100 (Adadelta): one huge step kills all ReLUs, loss stuck at ln 10")
def script_mnist_adadelta_lr100(opts: dict[str, Any]) -> None:
    """mnist/main.py run with `--lr 100`. It does not diverge (nor go NaN): Adadelta's first
    step is 8x the norm of the initial weights (the lr 1.0 run's: 8%), the loss jumps to 870
    at step 2, and from then on every ReLU is dead: all tensors but fc2.bias get exactly zero
    gradient (hence exactly zero updates) and the loss sits at ln 10 = 2.30 (2.24-2.6: the
    class prior, learned by fc2.bias) for the remaining 398 steps."""
    mnist_main(opts, lr=100.0)


@case("script-mnist-steplr-gamma-7", ("divergence", "loss_spike", "dead_layer", "not_updated", "update_ratio"),
      onset=101,
      description="pytorch/examples mnist with --gamma 7 (typo for 0.7): lr x7 every epoch, the net dies in epoch 3")
def script_mnist_steplr_gamma_7(opts: dict[str, Any]) -> None:
    """mnist/main.py with `--gamma 7`: epoch 1 (lr 1) learns normally (loss 2.29 -> 0.28).
    At step 101 the LR becomes 7: the loss spikes to 9.5 (step 103), falls back to 1.2-2.3
    and re-learns to 0.35 by step 200; at step 201 (lr 49) it spikes to 208, and within 30
    steps every ReLU is dead (exact-zero gradients and updates on all tensors but fc2's): the
    loss stays at chance, 2.27-2.36, then 2.3-2.7 at lr 343 in epoch 4, at or above its
    initial 2.29, to the end."""
    mnist_main(opts, gamma=7.0)


# ==== 2. pytorch/examples word_language_model/main.py =========================================


@dataclass
class WordCorpus:
    """The script's `data.Corpus`: a word dictionary and train/valid token streams, with
    `<eos>` at each sentence end (our sentences come from `common.grammar_text`)."""

    train: torch.Tensor
    valid: torch.Tensor
    ntokens: int

    @classmethod
    def make(cls, n_train: int, n_valid: int, seed: int) -> WordCorpus:
        words = grammar_text(7 * (n_train + n_valid), seed).replace(".", " <eos>").split()
        vocab = {w: i for i, w in enumerate(sorted(set(words)))}
        ids = torch.tensor([vocab[w] for w in words[:n_train + n_valid]])
        return cls(ids[:n_train], ids[n_train:], len(vocab))


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """The script's: trim to a multiple of `bsz`, one column per stream: (len, bsz)."""
    nbatch = data.size(0) // bsz
    return data[:nbatch * bsz].view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> Batch:
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


Hidden = tuple[torch.Tensor, torch.Tensor]


def repackage_hidden(h: Hidden) -> Hidden:
    """Wraps hidden states in new Tensors, to detach them from their history."""
    return h[0].detach(), h[1].detach()


class RNNModel(nn.Module):
    """The script's RNNModel for `--model LSTM`: encoder, dropout, LSTM, dropout, decoder,
    log_softmax; `tie_weights` shares the encoder and decoder matrices."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2,
                 tie_weights: bool = False) -> None:
        super().__init__()
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError("When using the tied flag, nhid must be equal to emsize")
            self.decoder.weight = self.encoder.weight
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> Hidden:
        weight = next(self.parameters())
        return weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid)


WORDS = WordCorpus.make(n_train=20 * 35 * 100, n_valid=3500, seed=3)  # 100 batches of 20 x 35 per epoch


def word_lm_main(opts: dict[str, Any], *, lr: float = 20.0, clip: float | None = 0.25, epochs: int = 4) -> None:
    """`word_language_model/main.py --tied`: batch 20, bptt 35, SGD by hand with `lr`,
    `clip_grad_norm_(clip)` (None: the clip line deleted), lr /= 4 after an epoch whose val
    loss is not the best. No optimizer: the probe is attached to the model alone."""
    torch.manual_seed(1111)
    bptt, batch_size, eval_batch_size = 35, 20, 10
    train_data, val_data = batchify(WORDS.train, batch_size), batchify(WORDS.valid, eval_batch_size)
    ntokens = WORDS.ntokens
    model = RNNModel(ntokens, 64, 64, 2, dropout=0.2, tie_weights=True)
    criterion = nn.NLLLoss()

    def train() -> None:
        model.train()
        hidden = model.init_hidden(batch_size)
        for i in range(0, train_data.size(0) - 1, bptt):
            data, targets = get_batch(train_data, i, bptt)
            model.zero_grad()
            # Starting each batch, we detach the hidden state from how it was previously produced.
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            # `clip_grad_norm` helps prevent the exploding gradient problem in RNNs / LSTMs.
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)

    @torch.no_grad()
    def evaluate(data_source: torch.Tensor) -> float:
        model.eval()
        total_loss, hidden = 0.0, model.init_hidden(eval_batch_size)
        for i in range(0, data_source.size(0) - 1, bptt):
            data, targets = get_batch(data_source, i, bptt)
            output, hidden = model(data, hidden)
            total_loss += len(data) * criterion(output, targets).item()
        return total_loss / (len(data_source) - 1)

    best_val_loss = None
    with gradwatch.attach(model, **opts):
        for _epoch in range(1, epochs + 1):
            train()
            val_loss = evaluate(val_data)
            if best_val_loss is None or val_loss < best_val_loss:
                best_val_loss = val_loss
            else:
                # Anneal the learning rate if no improvement has been seen in the validation dataset.
                lr /= 4.0


@case("script-wordlm-lstm-tied-healthy",
      description="pytorch/examples word_language_model: 2-layer tied LSTM, SGD by hand lr 20, clip 0.25, no optimizer")
def script_wordlm_healthy(opts: dict[str, Any]) -> None:
    """pytorch/examples `word_language_model/main.py --tied` as published (lr 20, clip 0.25,
    batch 20, bptt 35, dropout 0.2, lr /= 4 on a val plateau), scaled down: emsize = nhid =
    64 (from 200), 4 epochs of 100 batches (from 40 epochs of WikiText-2) on a word-level
    synthetic grammar. No optimizer, `model.zero_grad()`, loss from `nn.NLLLoss` outside
    the model, updates `p.data.add_(p.grad, alpha=-lr)`."""
    word_lm_main(opts)


@case("script-wordlm-lr2000", ("divergence", "exploding_gradients", "update_ratio"), onset=1,
      description="pytorch/examples word_language_model with --lr 2000 (100x): loss 4 -> 260 at step 2, stays 20-1100")
def script_wordlm_lr2000(opts: dict[str, Any]) -> None:
    """word_language_model/main.py `--tied --lr 2000`: each clipped step moves the weights by
    500 in norm. The loss leaps from 4.0 to 260 at step 2 and stays between 20 and 1100
    (medians 70-530 per 50 steps) for the whole run, even as the val-plateau rule divides
    the LR by 4 each epoch; the gradient norm goes from 0.17 to 51 at step 2 and stays at
    1-4 (5-25x its initial level), single steps up to ~100."""
    word_lm_main(opts, lr=2000.0)


@case("script-wordlm-no-clip", ("exploding_gradients", "divergence", "loss_spike", "update_ratio"), onset=1,
      description="pytorch/examples word_language_model with the clip_grad_norm_ line removed (lr 20)")
def script_wordlm_no_clip(opts: dict[str, Any]) -> None:
    """word_language_model/main.py with the clip line deleted, lr 20: at steps 5-10 the
    gradient norm explodes from 0.17 to 21 (the healthy run's never passes 1.6), the second
    LSTM layer's weights grow ~40x in norm and the loss climbs from 4.0 to 36 (step 13); it
    is above its initial level on 53 of the first 64 steps, then the run recovers and ends
    at 1.45 where the clipped run reaches 1.14."""
    word_lm_main(opts, clip=None)


# ==== 3. pytorch/examples imagenet/main.py ====================================================


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv-BN, ReLU, identity or 1x1-BN downsample."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout with a 3x3 stem for 32x32 inputs (CIFAR style): three
    stages of one BasicBlock each, global average pool, fc; torchvision's initialisation."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (8, 16, 32)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.layer3 = BasicBlock(widths[1], widths[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def colour_shapes(n: int, seed: int) -> Batch:
    """RGB 32x32 images: `common.shapes` patterns, each tinted with a random colour."""
    x, y = shapes(n, seed, size=32, noise=1.0)
    tint = 0.5 + torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(seed + 1))
    return x * tint, y


def random_flip(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """transforms.RandomHorizontalFlip on a batch."""
    flip = torch.rand(len(images), generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def imagenet_main(opts: dict[str, Any], *, lr: float = 0.1, epochs: int = 6, train_size: int = 50 * 32) -> None:
    """`main_worker()` of imagenet/main.py: CrossEntropyLoss, SGD(lr, momentum 0.9, wd 1e-4),
    StepLR(step_size, gamma 0.1) stepped after each epoch, validate after each epoch; the
    90-epoch schedule with decays at 30 and 60 becomes 6 epochs with decays at 2 and 4."""
    torch.manual_seed(0)
    train_data, val_data = colour_shapes(train_size, seed=10), colour_shapes(512, seed=11)
    g = torch.Generator().manual_seed(0)
    model = ResNet(num_classes=6)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)
    scheduler = StepLR(optimizer, step_size=2, gamma=0.1)

    def train() -> None:
        model.train()
        for images, target in batches(*train_data, 32, g):
            output = model(random_flip(images, g))
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        correct = 0
        for images, target in batches(*val_data, 128, None):
            correct += int((model(images).argmax(1) == target).sum())
        return correct / len(val_data[1])

    with gradwatch.attach(model, optimizer, **opts):
        for _epoch in range(epochs):
            train()
            validate()
            scheduler.step()


@case("script-imagenet-resnet-healthy",
      description="pytorch/examples imagenet: ResNet (BasicBlock, BN), SGD 0.1 momentum 0.9 wd 1e-4, StepLR")
def script_imagenet_healthy(opts: dict[str, Any]) -> None:
    """pytorch/examples `imagenet/main.py` with its defaults (SGD lr 0.1, momentum 0.9, wd
    1e-4, StepLR gamma 0.1, batch scaled to 32), scaled down: a 3-stage ResNet of BasicBlocks
    of width 8/16/32 (from resnet18) on 32x32 synthetic RGB shapes (6 classes), 6 epochs of
    50 steps with the LR divided by 10 after epochs 2 and 4; random horizontal flips."""
    imagenet_main(opts)


@case("script-imagenet-resnet-lr10", ("divergence", "dead_layer", "not_learning", "update_ratio", "loss_spike"),
      onset=1,
      description="pytorch/examples imagenet with --lr 10 (100x): loss above its start until the LR decay, then dead")
def script_imagenet_resnet_lr10(opts: dict[str, Any]) -> None:
    """imagenet/main.py `--lr 10`: the first step changes the weights by 36% of their norm
    (the lr 0.1 run's: 0.4%), the loss jumps from 1.79 to 11 at step 2 and stays between 2.2
    and 22 (median 5.2, never below its initial level) through the first LR period. The last
    ReLUs die: from step ~80 on, on nearly every step every tensor but fc.bias gets exactly
    zero gradient, and after the decay at step 101 the loss falls to chance, ln 6 = 1.79
    (1.72-3.4 from step 121), to the end. (Weight decay and momentum keep moving the dead
    weights: their updates are not zero.)"""
    imagenet_main(opts, lr=10.0)


# ==== 4. karpathy/nanoGPT train.py ============================================================

NANOGPT_TEXT = CharCorpus.make(100_000, seed=4)


@dataclass(frozen=True)
class NanoGPTConfig:
    """train.py's global settings, scaled down (theirs in comments); a case overrides some,
    as `python train.py config/....py --key=value` does."""

    eval_interval: int = 80  # 2000
    eval_iters: int = 5  # 200
    gradient_accumulation_steps: int = 4  # 5 * 8
    batch_size: int = 8  # 12
    block_size: int = 64  # 1024
    n_layer: int = 2  # 12
    n_head: int = 4  # 12
    n_embd: int = 64  # 768
    dropout: float = 0.0
    learning_rate: float = 3e-3  # 6e-4
    max_iters: int = 240  # 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_iters: int = 24  # 2000
    lr_decay_iters: int = 240  # 600000, = max_iters
    min_lr: float = 3e-4  # 6e-5, learning_rate / 10


def nanogpt_train(opts: dict[str, Any], cfg: NanoGPTConfig = NanoGPTConfig(), *, zero_grad: bool = True) -> None:
    """nanoGPT's `train.py` loop: lr = get_lr(iter_num) written into every param group,
    estimate_loss every `eval_interval` (from iter 0), `gradient_accumulation_steps`
    micro-batches of `loss / gradient_accumulation_steps` through a (disabled, float32)
    GradScaler, unscale, clip, step, update, `zero_grad(set_to_none=True)`; max_iters + 1
    steps. `zero_grad=False` is the bug of a deleted `optimizer.zero_grad` line."""
    torch.manual_seed(1337)
    data = NANOGPT_TEXT
    g = torch.Generator().manual_seed(1337)

    def get_batch(split: str) -> Batch:
        return data.batch(split, cfg.batch_size, cfg.block_size, g)

    def get_lr(it: int) -> float:
        return warmup_cosine(it, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr)

    model = GPT(GPTConfig(data.vocab, block=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, dropout=cfg.dropout))
    # configure_optimizers: every 2D tensor (matmuls, embeddings) decays, biases and norms don't
    param_dict = {pn: p for pn, p in model.named_parameters() if p.requires_grad}
    optim_groups = [
        {"params": [p for p in param_dict.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in param_dict.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(optim_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # dtype float32: the scaler is a no-op

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                X, Y = get_batch(split)
                _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    iter_num = 0
    X, Y = get_batch("train")  # fetch the very first batch
    with gradwatch.attach(model, optimizer, **opts):
        while True:
            # determine and set the learning rate for this iteration
            lr = get_lr(iter_num)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            if iter_num % cfg.eval_interval == 0:
                estimate_loss()
            # forward backward update, with optional gradient accumulation to simulate larger batch size
            for _micro_step in range(cfg.gradient_accumulation_steps):
                _, loss = model(X, Y)
                loss = loss / cfg.gradient_accumulation_steps  # scale the loss to account for accumulation
                X, Y = get_batch("train")  # "async prefetch" of the next batch
                scaler.scale(loss).backward()
            if cfg.grad_clip != 0.0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if zero_grad:  # flush the gradients as soon as we can, no need for this memory anymore
                optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            if iter_num > cfg.max_iters:
                break


# config/train_shakespeare_char.py: no accumulation, dropout 0.2, beta2 0.99, a short warm-up
SHAKESPEARE_CHAR = NanoGPTConfig(
    eval_interval=100, gradient_accumulation_steps=1, batch_size=16, dropout=0.2,
    learning_rate=2e-3, max_iters=300, lr_decay_iters=300, min_lr=2e-4, beta2=0.99, warmup_iters=10,
)


@case("script-nanogpt-healthy",
      description="nanoGPT train.py: AdamW (0.9, 0.95), decay groups, warm-up + cosine by hand, accumulation 4, clip 1")
def script_nanogpt_healthy(opts: dict[str, Any]) -> None:
    """karpathy/nanoGPT `train.py` with its defaults (AdamW betas 0.9/0.95, wd 0.1 on 2D
    tensors, warm-up then cosine to lr/10, clip 1.0, GradScaler disabled for float32,
    estimate_loss at iter 0 and every eval_interval), scaled down: a 2-layer, 64-wide GPT
    (corpus.common's, which keeps biases), block 64, batch 8 x 4 micro-steps (from 12 x 40),
    241 iterations with a 24-iteration warm-up, learning_rate 3e-3 (from 6e-4: a tiny model)
    on char-level synthetic English. The model returns (logits, loss)."""
    nanogpt_train(opts)


@case("script-nanogpt-shakespeare-char-healthy",
      description="nanoGPT config/train_shakespeare_char.py: no accumulation, dropout 0.2, beta2 0.99")
def script_nanogpt_shakespeare_char(opts: dict[str, Any]) -> None:
    """nanoGPT `train.py config/train_shakespeare_char.py` (baby GPT: one micro-step per
    iteration, dropout 0.2, beta2 0.99, lr 1e-3 -> min 1e-4, warm-up 100 of 5000 iterations),
    scaled down: 2 layers of width 64, batch 16 x block 64 (from 64 x 256), 301 iterations
    with a 10-iteration warm-up, lr 2e-3, on char-level synthetic English."""
    nanogpt_train(opts, SHAKESPEARE_CHAR)


@case("script-nanogpt-lr1", ("divergence", "exploding_gradients", "update_ratio", "plateau"), onset=1,
      description="nanoGPT train.py --learning_rate=1.0: loss climbs to 7-9 in the warm-up, then stuck at unigram loss")
def script_nanogpt_lr1(opts: dict[str, Any]) -> None:
    """nanoGPT `train.py --learning_rate=1.0` (min_lr left at its default): the first step,
    at warm-up lr 0.04, changes the weights by 69% of their norm (healthy: 0.2%); as the
    warm-up ramps, the loss climbs from 3.24 to a median of 7-9 (steps 20-110) with the
    pre-clip gradient norm at 7-15 (healthy: 1-2) and updates of 3-13% of the weights per
    step (healthy: ~1%); once the cosine has brought the LR under ~0.5 (step ~130) the loss
    falls to 2.8, the unigram entropy, and stays there (2.68-2.83) with a gradient norm of
    ~0.1-0.2 to the end (healthy run: 0.90)."""
    nanogpt_train(opts, replace(NanoGPTConfig(), learning_rate=1.0))


@case("script-nanogpt-no-zero-grad", ("accumulating_gradients",), onset=1,
      description="nanoGPT train.py with the optimizer.zero_grad(set_to_none=True) line deleted")
def script_nanogpt_no_zero_grad(opts: dict[str, Any]) -> None:
    """nanoGPT `train.py` without `optimizer.zero_grad(set_to_none=True)`: each step's
    gradient is this step's plus everything before it. clip_grad_norm_(1.0) rescales the
    sum in place every step, so it stays bounded (pre-clip norm ~1.5-2, as healthy) and
    acts like a heavy momentum: the run still learns, but slower (final loss 1.60 against
    0.90), with updates 1.5-2x the healthy run's relative size."""
    nanogpt_train(opts, zero_grad=False)


# ==== 5. transformers examples/pytorch/text-classification/run_glue_no_trainer.py ============

PAD, CLS, SEP = 0, 1, 2
TOPICS, TOPIC_WORDS, COMMON_WORDS = 4, 8, 30
FIRST_TOPIC_WORD = 3
FIRST_COMMON_WORD = FIRST_TOPIC_WORD + TOPICS * TOPIC_WORDS
BERT_VOCAB = FIRST_COMMON_WORD + COMMON_WORDS


def topic_sentences(n: int, seed: int, max_len: int = 32) -> dict[str, torch.Tensor]:
    """A GLUE-like tokenised dataset: `[CLS] words [SEP]` padded to `max_len`, each sentence
    of 10-30 words drawn mostly from common words, 30% from its topic's 8 words and 5% from
    other topics'; the label is the topic."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, TOPICS, (n,), generator=g)
    lengths = torch.randint(10, max_len - 1, (n,), generator=g)
    kind = torch.rand(n, max_len, generator=g)
    common = FIRST_COMMON_WORD + torch.randint(0, COMMON_WORDS, (n, max_len), generator=g)
    other_topic = torch.randint(0, TOPICS, (n, max_len), generator=g)
    topic = torch.where(kind < 0.05, other_topic, labels.view(-1, 1))
    word = torch.randint(0, TOPIC_WORDS, (n, max_len), generator=g)
    topical = FIRST_TOPIC_WORD + topic * TOPIC_WORDS + word
    input_ids = torch.where(kind < 0.35, topical, common)
    positions = torch.arange(max_len).view(1, -1)
    input_ids[:, 0] = CLS
    input_ids = torch.where(positions == lengths.view(-1, 1), SEP, input_ids)
    attention_mask = (positions <= lengths.view(-1, 1)).long()
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask, "labels": labels}


class SequenceClassifierOutput(dict):
    """transformers' ModelOutput, in short: a dict of the outputs that are not None, whose
    keys are also attributes (`outputs.loss`, `outputs["logits"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class BertConfig:
    vocab_size: int = BERT_VOCAB
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 64
    hidden_dropout_prob: float = 0.1
    num_labels: int = TOPICS
    initializer_range: float = 0.02


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=PAD)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.num_attention_heads, cfg.hidden_dropout_prob
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.transpose(1, 2).reshape(B, T, C)


class BertOutput(nn.Module):
    """BertSelfOutput / BertOutput: dense, dropout, LayerNorm of the residual sum."""

    def __init__(self, cfg: BertConfig, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertLayer(nn.Module):
    """A post-LN encoder layer with BERT's module names (so `LayerNorm.weight` skips decay)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(cfg)
        self.attention_output = BertOutput(cfg, cfg.hidden_size)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = BertOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_output(self.attention(x, mask), x)
        return self.output(F.gelu(self.intermediate(x)), x)


class BertForSequenceClassification(nn.Module):
    """BertForSequenceClassification in miniature: embeddings, encoder, tanh pooler on
    [CLS], dropout, classifier; `forward(input_ids, attention_mask, labels)` returns a
    SequenceClassifierOutput with `loss` when labels are given, as transformers models do."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        for module in self.modules():  # _init_weights
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.initializer_range)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layer:
            x = layer(x, mask)
        logits = self.classifier(self.dropout(torch.tanh(self.pooler(x[:, 0]))))
        if labels is None:
            return SequenceClassifierOutput(logits=logits)
        return SequenceClassifierOutput(loss=F.cross_entropy(logits, labels), logits=logits)


def get_linear_schedule_with_warmup(optimizer: torch.optim.Optimizer, num_warmup_steps: int,
                                    num_training_steps: int) -> LambdaLR:
    """transformers' linear schedule: 0 -> lr over the warm-up, then linearly to 0 (the first
    step is taken at lr 0, as there)."""

    def lr_lambda(current_step: int) -> float:
        if current_step < num_warmup_steps:
            return current_step / max(1, num_warmup_steps)
        return max(0.0, (num_training_steps - current_step) / max(1, num_training_steps - num_warmup_steps))

    return LambdaLR(optimizer, lr_lambda)


def dataloader(dataset: dict[str, torch.Tensor], batch_size: int,
               g: torch.Generator | None) -> Iterator[dict[str, torch.Tensor]]:
    """DataLoader(dataset, shuffle=g is not None, collate_fn=default_data_collator)."""
    n = len(dataset["labels"])
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield {k: v[order[i:i + batch_size]] for k, v in dataset.items()}


def glue_main(
    opts: dict[str, Any],
    *,
    learning_rate: float = 1e-3,
    num_train_epochs: int = 3,
    train_size: int = 100 * 32,
    shuffle_labels: bool = False,
    schedule_epochs: int | None = None,
) -> None:
    """`main()` of run_glue_no_trainer.py: AdamW over two groups (no decay for biases and
    LayerNorm weights), linear schedule with 10% warm-up over `schedule_epochs` (default:
    all) epochs, `outputs = model(**batch)`, `loss = outputs.loss`, backward, step, scheduler
    step, zero_grad; evaluation (accuracy) after each epoch. `shuffle_labels` is a bug."""
    torch.manual_seed(42)
    train_dataset, eval_dataset = topic_sentences(train_size, seed=20), topic_sentences(512, seed=21)
    if shuffle_labels:
        # The bug: the labels were shuffled apart from their sentences while preprocessing.
        permutation = torch.randperm(train_size, generator=torch.Generator().manual_seed(7))
        train_dataset["labels"] = train_dataset["labels"][permutation]
    g = torch.Generator().manual_seed(42)
    model = BertForSequenceClassification(BertConfig())
    no_decay = ["bias", "LayerNorm.weight"]
    optimizer_grouped_parameters = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=learning_rate)
    max_train_steps = (schedule_epochs or num_train_epochs) * math.ceil(train_size / 32)
    lr_scheduler = get_linear_schedule_with_warmup(optimizer, max_train_steps // 10, max_train_steps)

    with gradwatch.attach(model, optimizer, **opts):
        for _epoch in range(num_train_epochs):
            model.train()
            for batch in dataloader(train_dataset, 32, g):
                outputs = model(**batch)
                loss = outputs.loss
                loss.backward()
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            model.eval()
            correct = 0
            for batch in dataloader(eval_dataset, 128, None):
                with torch.no_grad():
                    outputs = model(**batch)
                correct += int((outputs.logits.argmax(dim=-1) == batch["labels"]).sum())


@case("script-hf-bert-healthy",
      description="run_glue_no_trainer: tiny BERT returning a ModelOutput with loss, AdamW 1e-3, linear warm-up/decay")
def script_hf_bert_healthy(opts: dict[str, Any]) -> None:
    """transformers' `run_glue_no_trainer.py` loop (AdamW with no decay on biases and
    LayerNorm weights, linear schedule, 3 epochs, no clipping, eval after each epoch) on a
    2-layer, 64-wide BERT written here (transformers is not installed), trained from scratch
    so the LR is 1e-3 (from 5e-5) with a 10% warm-up (from 0); batch 32, 100 steps per epoch
    on a synthetic 4-topic sentence task. The loss comes from the model's output dict."""
    glue_main(opts)


@case("script-hf-bert-labels-shuffled", ("not_learning",), onset=1,
      description="run_glue_no_trainer loop on a dataset whose labels were shuffled apart from the sentences")
def script_hf_bert_labels_shuffled(opts: dict[str, Any]) -> None:
    """The healthy BERT run, but the preprocessing shuffled the training labels: they carry
    no information, the loss stays at ln 4 = 1.386 (1.35-1.45) for all 300 steps."""
    glue_main(opts, shuffle_labels=True)


@case("script-hf-bert-schedule-one-epoch", ("not_updated", "plateau"), onset=101,
      description="run_glue_no_trainer, num_training_steps=len(train_dataloader), epochs forgotten: lr 0 from step 101")
def script_hf_bert_schedule_one_epoch(opts: dict[str, Any]) -> None:
    """The classic scheduler bug: `get_linear_schedule_with_warmup(..., num_training_steps=
    len(train_dataloader))`, without `* num_train_epochs`. The LR decays three times too
    fast and is exactly 0 from step 101: epochs 2 and 3 change no weight (AdamW's update and
    its decoupled weight decay both scale with lr) and the loss stays flat at ~0.74 (0.71-1.05)
    for 200 steps, where the healthy run goes on to 0.045."""
    glue_main(opts, schedule_epochs=1)
