"""What the corpus families share: data made in code (seeded), small models, LR schedules.

Nothing here is a pathology: every bug the corpus carries is written in its case, where a
reader sees it. Data is generated, never downloaded; every generator takes a seed.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# ---- data --------------------------------------------------------------------------------

_GRAMMAR = {
    "subject": ["the cat", "a dog", "my old friend", "the teacher", "a small bird", "the farmer",
                "her brother", "the children", "our neighbour", "a tired sailor"],
    "verb": ["sees", "likes", "follows", "paints", "finds", "carries", "watches", "forgets", "sells"],
    "object": ["the red ball", "a green apple", "the river", "an old book", "the garden",
               "a wooden box", "the moon", "two brown hens", "a letter"],
    "tail": ["", "", " today", " again", " at night", " in the rain", " with great care"],
}

GRAMMAR_CHARS = sorted(set(" .".join(w for words in _GRAMMAR.values() for w in words)))


def grammar_text(n_chars: int, seed: int) -> str:
    """English-like sentences from a small random grammar ("the cat sees a letter again."):
    words are fixed, their combination is random, so a char-level model has a real floor."""
    rng = random.Random(seed)

    def pick(part: str) -> str:
        return rng.choice(_GRAMMAR[part])

    sentences: list[str] = []
    length = 0
    while length < n_chars:
        sentence = f"{pick('subject')} {pick('verb')} {pick('object')}{pick('tail')}"
        if rng.random() < 0.3:
            sentence += f" and {pick('verb')} {pick('object')}"
        sentences.append(sentence + ". ")
        length += len(sentences[-1])
    return "".join(sentences)[:n_chars]


@dataclass
class CharCorpus:
    """A text as token ids with a train/val split, and random windows of it as batches."""

    train: torch.Tensor
    val: torch.Tensor
    vocab: int

    @classmethod
    def make(cls, n_train: int, n_val: int = 4000, seed: int = 0) -> CharCorpus:
        text = grammar_text(n_train + n_val, seed)
        ids = torch.tensor([GRAMMAR_CHARS.index(c) for c in text])
        return cls(ids[:n_train], ids[n_train:], len(GRAMMAR_CHARS))

    def batch(self, split: str, batch: int, block: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` random windows of `block` tokens and their next-token targets."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + block] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + block + 1] for s in starts.tolist()])
        return x, y


def blobs(n: int, classes: int, dim: int, seed: int, spread: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters, one per class, in `dim` dimensions (unit noise)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def smooth_regression(n: int, dim: int, seed: int, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """y = sines of random projections of x plus a linear term, plus `noise`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 4, generator=g) / math.sqrt(dim)
    y = torch.sin(x @ w).sum(dim=1, keepdim=True) + 0.5 * (x @ w[:, :1])
    return x, y + noise * torch.randn(n, 1, generator=g)


SHAPE_CLASSES = ("horizontal", "vertical", "diagonal", "blob", "ring", "checker")


def shapes(n: int, seed: int, size: int = 16, noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey `size`x`size` images of six classes (stripes three ways, a gaussian blob, a ring,
    a checkerboard) with random frequency, phase and position, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=g)
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = coords.view(1, -1, 1), coords.view(1, 1, -1)
    freq = (0.5 + torch.rand(n, 1, 1, generator=g)) * 0.9
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    cy, cx = (4 + torch.rand(2, n, 1, 1, generator=g) * (size - 8)).unbind(0)
    radius2 = (rows - cy) ** 2 + (cols - cx) ** 2
    patterns = torch.stack([
        torch.sin(freq * rows + phase).expand(n, size, size),
        torch.sin(freq * cols + phase).expand(n, size, size),
        torch.sin(freq * (rows + cols) / math.sqrt(2) + phase),
        2 * torch.exp(-radius2 / 8) - 0.5,
        2 * torch.exp(-(radius2.sqrt() - 4) ** 2 / 1.5) - 0.5,
        torch.sign(torch.sin(freq * rows + phase) * torch.sin(freq * cols + phase)),
    ], dim=1)
    images = patterns[torch.arange(n), y] + noise * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), y


@torch.no_grad()
def eval_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss of a model whose forward(x, y) returns (output, loss), in eval mode."""
    model.eval()
    loss = sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    model.train()
    return loss


# ---- models ------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    vocab: int
    block: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT in miniature: token + position embeddings, pre-LN blocks, tied LM head.
    `forward(idx, targets)` returns (logits, loss), so the probe captures the loss."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class CharRNN(nn.Module):
    """A character-level LSTM or GRU language model; `forward(x, y)` returns (logits, loss)."""

    def __init__(self, vocab: int, cell: str = "lstm", hidden: int = 128, emb: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.rnn(self.embed(x))
        logits = self.head(out)
        return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten())


class ShapeCNN(nn.Module):
    """Three conv-BN-ReLU stages and a linear classifier for `shapes()` images; the second
    stage has a 1x1 projection shortcut (`skip`), as in a ResNet stage."""

    def __init__(self, classes: int = len(SHAPE_CLASSES), width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = conv_bn(1, width)
        self.block = nn.Sequential(conv_bn(width, 2 * width, stride=2), conv_bn(2 * width, 2 * width))
        self.proj = nn.Conv2d(width, 2 * width, 1, stride=2, bias=False)
        self.head = nn.Sequential(conv_bn(2 * width, 2 * width, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(dropout), nn.Linear(2 * width, classes))

    def skip(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.block(h) + self.skip(h))


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers of `sizes` with `act` (and dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [act()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


# ---- schedules ---------------------------------------------------------------------------


def warmup_cosine(step: int, max_lr: float, warmup: int, total: int, min_lr: float) -> float:
    """nanoGPT's `get_lr`: linear warm-up to `max_lr`, cosine decay to `min_lr` at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
