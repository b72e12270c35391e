"""DistributedDataParallel on 2 CPU processes (gloo). Each rank runs its own probe; the
collector merges the ranks of one run (same name on every rank, derived from the job).

    torchrun --nproc-per-node 2 examples/ddp.py
"""

import torch
import torch.distributed as dist
from torch import nn

import gradwatch

dist.init_process_group("gloo")
torch.manual_seed(0)  # the same teacher and initial weights on every rank
teacher = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
torch.manual_seed(1 + dist.get_rank())  # each rank its own batches

with gradwatch.attach(model, optimizer, name="ddp-example") as run:
    for _ in range(300):
        x = torch.randn(32, 32)
        loss = nn.functional.mse_loss(model(x), teacher(x))  # a function the model can learn
        run.log(loss=loss)
        optimizer.zero_grad()
        loss.backward()  # gradients are all-reduced here; the probe reads them after
        optimizer.step()

dist.destroy_process_group()
