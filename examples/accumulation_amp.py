"""Gradient accumulation + mixed precision with GradScaler and gradient clipping.

The probe reads gradients once per optimizer step (after the last micro-batch), unscaled,
reports the pre-clip norm returned by clip_grad_norm_, the loss scale, and every step
GradScaler skipped. On a CUDA machine this runs with fp16 autocast; on the CPU, bf16.
"""

import torch
from torch import nn

import gradwatch

device = "cuda" if torch.cuda.is_available() else "cpu"
amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False).to(device)
model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 1)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler(device)
accumulation = 4

run = gradwatch.attach(model, optimizer, scaler=scaler)

for _ in range(200):
    for _ in range(accumulation):
        x = torch.randn(32, 32, device=device)
        with torch.autocast(device, dtype=amp_dtype):
            loss = nn.functional.mse_loss(model(x).float(), teacher(x).float())
        run.log(loss=loss)  # optional (backward() is read too): the step's loss is their mean
        scaler.scale(loss / accumulation).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

run.detach()
