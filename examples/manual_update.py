"""A model updated by hand, without an optimizer (as pytorch/examples' word_language_model):
the probe falls back to gradient hooks and reports every backward's gradient norms. The
LSTM learns to continue sine waves of random phase and frequency one step ahead.

    gradwatch collector &            # in another terminal (or: gradwatch up)
    python examples/manual_update.py
"""

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.LSTM(16, 64, num_layers=2)
head = nn.Linear(64, 16)
net = nn.ModuleDict({"lstm": model, "head": head})
lr = 5


def waves(length: int = 21, batch: int = 8) -> torch.Tensor:
    """(length, batch, 16): 16 sine channels per sequence, each with its own phase and frequency."""
    t = torch.arange(length, dtype=torch.float32).view(-1, 1, 1)
    phase = torch.rand(1, batch, 16) * 6.28
    freq = 0.2 + 0.3 * torch.rand(1, batch, 16)
    return torch.sin(freq * t + phase)


with gradwatch.attach(net) as run:  # no optimizer
    for _ in range(300):
        x = waves()
        out, _ = model(x[:-1])
        loss = nn.functional.mse_loss(head(out), x[1:])
        run.log(loss=loss)
        net.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(p.grad, alpha=-lr)
