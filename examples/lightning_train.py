"""Lightning with one added callback: a small regression model trained with gradient
accumulation, clipping and validation each epoch; `--devices 2` runs it under DDP on the CPU.

    gradwatch collector &                          # in another terminal (or: gradwatch up)
    python examples/lightning_train.py [--devices 2]   # pip install 'gradwatch[lightning]'
"""

import argparse

import lightning.pytorch as L
import torch
from torch import nn

from gradwatch.integrations.lightning import GradwatchCallback


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Inputs and the outputs of a fixed random teacher network: a function the model can learn."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(x, teacher(x))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (2 or more: DDP over gloo)")
    parser.add_argument("--epochs", type=int, default=5)
    options = parser.parse_args()
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=options.devices, strategy="ddp" if options.devices > 1 else "auto",
        max_epochs=options.epochs, accumulate_grad_batches=2, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[GradwatchCallback()],  # the one line; keywords are gradwatch.attach's
    )
    trainer.fit(
        Regression(),
        torch.utils.data.DataLoader(data(512, seed=1), batch_size=16, shuffle=True),
        torch.utils.data.DataLoader(data(128, seed=2), batch_size=64),
    )
