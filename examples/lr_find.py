"""Pick the learning rate with the LR range test, train with it, then look at the loss
landscape around the trained weights.

    gradwatch collector &            # in another terminal (or: gradwatch up)
    python examples/lr_find.py

The range test streams as a run of its own, named after this one with "-lr-find"; the
model and optimizer are exactly as before it when it returns.
"""

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False)  # what to learn
model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = nn.MSELoss()


def batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, 32)
    return x, teacher(x)


# 1. The range test: lr from 1e-7 to 10 over 100 steps, stopped when the loss explodes.
found = gradwatch.lr_find(model, optimizer, [batch() for _ in range(100)], loss_fn)
print(found)
for group, lr in zip(optimizer.param_groups, found.lr_for_groups()):
    group["lr"] = lr

# 2. Train with the suggested LR.
run = gradwatch.attach(model, optimizer, loss_fn=loss_fn)
for step in range(500):
    x, y = batch()
    loss = loss_fn(model(x), y)  # captured by the probe through loss_fn
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        with torch.no_grad():
            x_val, y_val = batch(256)
            run.log(val_loss=loss_fn(model(x_val), y_val))

# 3. The loss around the trained weights along two filter-normalised random directions:
#    a sharp minimum rises fast, a flat one slowly. Its summary goes with the run's last step.
held_out = [batch(256) for _ in range(2)]
slice_ = run.landscape(held_out, loss_fn, directions=2, points=11, radius=1.0)  # its summary is logged too
run.detach()
print(slice_)
