"""The smallest complete example: a plain PyTorch loop with the one added line.

    gradwatch collector &            # in another terminal (or: gradwatch up)
    python examples/plain_loop.py
"""

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False)  # what to learn
model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = nn.MSELoss()

run = gradwatch.attach(model, optimizer, loss_fn=loss_fn)  # the one line

for step in range(500):
    x = torch.randn(64, 32)
    loss = loss_fn(model(x), teacher(x))  # captured by the probe through loss_fn
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        with torch.no_grad():
            x_val = torch.randn(256, 32)
            run.log(val_loss=loss_fn(model(x_val), teacher(x_val)))

run.detach()
