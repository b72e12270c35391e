"""Accelerate: a plain loop over `accelerator.prepare`-d objects; `attach` takes the prepared
optimizer as it is, and `accelerator.accumulate` gives one record per optimizer step.

    gradwatch collector &            # in another terminal (or: gradwatch up)
    python examples/accelerate_loop.py
"""

import torch
from accelerate import Accelerator
from torch import nn

import gradwatch

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
teacher = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1)).requires_grad_(False)  # a learnable target
x = torch.randn(2048, 16)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, teacher(x)), batch_size=32, shuffle=True)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

run = gradwatch.attach(model, optimizer)  # the one line: the AcceleratedOptimizer is fine

for epoch in range(3):
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)  # the probe reads the loss here (divided by 4, summed per step)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

run.detach()
