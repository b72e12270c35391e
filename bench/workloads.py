"""Training workloads for the overhead benchmark: small models written here, each with a
fixed set of preallocated batches so that a step does no data work besides the model's.

A `Workload` knows how to take one optimizer step (with gradient accumulation and AMP when
asked); the benchmark wraps that step in its timing and its monitors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BATCHES_KEPT = 4  # distinct preallocated batches, cycled


# ---- models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A nanoGPT decoder: token + position embeddings, pre-norm blocks, tied LM head.
    `forward(idx, targets)` returns the loss, so the probe captures it without code."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class Classifier(nn.Module):
    """Wraps a network that returns logits so that forward returns the training loss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


def mlp(width: int = 1024, depth: int = 3, inputs: int = 784, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU()]
    return Classifier(nn.Sequential(*layers, nn.Linear(width, classes)))


def cnn(channels: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU stages with stride-2 downsampling, global pooling, a linear head."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in channels:
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        ]
        c_in = c_out
    return Classifier(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)))


# ---- workloads ----------------------------------------------------------------------------


@dataclass
class Workload:
    """One model, its optimizer and its batches; `step()` is one optimizer step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    items_per_micro_batch: int  # tokens (GPT) or samples
    item_kind: str
    accumulation: int = 1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    _next: int = field(default=0, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def items_per_step(self) -> int:
        return self.items_per_micro_batch * self.accumulation

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accumulation):
            inputs, targets = self.batches[self._next]
            self._next = (self._next + 1) % len(self.batches)
            with self._autocast():
                loss = self.model(inputs, targets) / self.accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


def _amp(device: torch.device) -> tuple[torch.dtype, torch.amp.GradScaler]:
    # fp16 needs loss scaling on CUDA; the CPU autocasts to bf16, and the CPU GradScaler
    # still runs so that the probe's scaler path (loss scale, skipped steps) is exercised.
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return dtype, torch.amp.GradScaler(device.type)


def _token_batches(
    cfg: GPTConfig, batch: int, seq_len: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    def one() -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.randint(cfg.vocab_size, (batch, seq_len + 1), device=device)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    return [one() for _ in range(BATCHES_KEPT)]


def gpt_workload(
    name: str, cfg: GPTConfig, batch: int, device: torch.device, *, accumulation: int = 1, amp: bool = False,
    seq_len: int | None = None,
) -> Workload:
    """`seq_len` tokens per sequence (default: the model's block size)."""
    seq_len = seq_len or cfg.block_size
    model = GPT(cfg).to(device)
    # nanoGPT's optimizer: AdamW, decay on matrices only, fused where the device has it.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    amp_dtype, scaler = _amp(device) if amp else (None, None)
    return Workload(
        name, model, optimizer, _token_batches(cfg, batch, seq_len, device), batch * seq_len, "tokens",
        accumulation=accumulation, amp_dtype=amp_dtype, scaler=scaler,
    )


def classifier_workload(
    name: str, make_model: Callable[[], nn.Module], input_shape: tuple[int, ...], batch: int, device: torch.device
) -> Workload:
    model = make_model().to(device)
    batches = [
        (torch.randn(batch, *input_shape, device=device), torch.randint(10, (batch,), device=device))
        for _ in range(BATCHES_KEPT)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Workload(name, model, optimizer, batches, batch, "samples")


GPT_SMALL = GPTConfig()  # 4 layers x 256 wide: ~3.7M parameters
GPT_TINY = GPTConfig(block_size=64, vocab_size=1024, n_layer=2, n_head=4, n_embd=128)
GPT2_SMALL = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)  # 124M


WorkloadFactory = Callable[[], Workload]


def default_workloads(device: torch.device, quick: bool) -> dict[str, WorkloadFactory]:
    """The CPU-sized set: GPT, MLP, CNN with BatchNorm, GPT with accumulation + AMP.
    Factories, so that only one workload's model lives at a time."""
    gpt_cfg, gpt_batch = (GPT_TINY, 4) if quick else (GPT_SMALL, 8)
    width, images = (256, 16) if quick else (1024, 64)
    return {
        "gpt": functools.partial(gpt_workload, "gpt", gpt_cfg, gpt_batch, device),
        "mlp": functools.partial(classifier_workload, "mlp", functools.partial(mlp, width), (784,), 256, device),
        "cnn-bn": functools.partial(classifier_workload, "cnn-bn", cnn, (3, 32, 32), images, device),
        # the same tokens per optimizer step as "gpt", in 4 micro-batches under autocast
        "gpt-accum4-amp": functools.partial(
            gpt_workload, "gpt-accum4-amp", gpt_cfg, gpt_batch // 4, device, accumulation=4, amp=True
        ),
    }


def gpt2_small_workloads(device: torch.device, batch: int, quick: bool = False) -> dict[str, WorkloadFactory]:
    """GPT-2 small (124M) in fp32 and AMP (fp16 on CUDA), accumulation 1 and 8, `batch`
    sequences of 1024 tokens per micro-batch. `quick`: the same model on 1 sequence of 32
    tokens, fp32 without accumulation and AMP with 2 micro-batches (a smoke run: the path
    works, not a measurement)."""
    settings = [(False, 1), (True, 2)] if quick else [(False, 1), (False, 8), (True, 1), (True, 8)]
    factories = {}
    for amp, accumulation in settings:
        name = f"gpt2-small-{'amp' if amp else 'fp32'}-accum{accumulation}"
        factories[name] = functools.partial(
            gpt_workload, name, GPT2_SMALL, 1 if quick else batch, device, accumulation=accumulation, amp=amp,
            seq_len=32 if quick else None,
        )
    return factories
