"""A model updated by hand, without an optimizer (as pytorch/examples' word_language_model):
the probe falls back to gradient hooks and reports every backward's gradient norms."""

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.LSTM(16, 64, num_layers=2)
head = nn.Linear(64, 16)
net = nn.ModuleDict({"lstm": model, "head": head})
lr = 0.5

with gradwatch.attach(net) as run:  # no optimizer
    for _ in range(100):
        x = torch.randn(20, 8, 16)
        out, _ = model(x)
        loss = nn.functional.mse_loss(head(out[:-1]), x[1:])
        run.log(loss=loss)
        net.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(p.grad, alpha=-lr)
