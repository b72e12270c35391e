"""Real tiny models and exact state comparison for the LR-find and landscape tests."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def teacher_batches(n: int, seed: int = 0, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, teacher(x)) pairs from a fixed random teacher network: something an MLP can learn."""
    with torch.random.fork_rng():  # the global RNG is part of what the tests compare
        torch.manual_seed(1234)
        teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        for p in teacher.parameters():
            nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.randn(size, 16, generator=g)
            out.append((x, teacher(x)))
    return out


def mlp(seed: int = 1, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 1))


def cnn_bn(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def image_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images labelled by which of four channel statistics is largest: learnable by a CNN."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 3, 8, 8, generator=g)
        means = x.mean(dim=(2, 3))
        out.append((x, torch.cat([means, -means.sum(dim=1, keepdim=True)], dim=1).argmax(dim=1)))
    return out


class TinyGPT(nn.Module):
    """One pre-norm transformer block with a tied LM head; `forward(idx, targets)` returns the loss."""

    def __init__(self, vocab: int = 32, width: int = 32, context: int = 16, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True, dropout=0.1)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(0.1))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.register_buffer("mask", torch.triu(torch.ones(context, context, dtype=torch.bool), 1), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        x = x + self.mlp(self.ln_2(x))
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def token_batches(n: int, seed: int = 0, vocab: int = 32, context: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences that count up mod vocab from a random start: learnable next-token targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(vocab, (8, 1), generator=g)
        seq = (start + torch.arange(context + 1)) % vocab
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


# ---- exact state ------------------------------------------------------------------------------


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scaler: Any = None) -> dict[str, Any]:
    """Everything the diagnostics must leave as it was, deep-copied."""
    state: dict[str, Any] = {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "grads": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "modes": {name: m.training for name, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = copy.deepcopy(optimizer.state_dict())
    if scaler is not None:
        state["scaler"] = copy.deepcopy(scaler.state_dict())
        state["scaler_tensors"] = [copy.deepcopy(getattr(scaler, key)) for key in ("_scale", "_growth_tracker")]
    return state


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_identical(want: Any, got: Any, where: str = "state") -> None:
    """Bit for bit: torch.equal on every tensor (NaNs compare by their bits), == elsewhere."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert want.dtype == got.dtype and want.shape == got.shape and want.device == got.device, where
        assert torch.equal(_bits(want), _bits(got)), where
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping) and set(want) == set(got), (where, set(want) ^ set(got))
        for key in want:
            assert_identical(want[key], got[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(want) == len(got), where
        for i, (a, b) in enumerate(zip(want, got)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert want == got, (where, want, got)
