"""Real Lightning runs with `GradwatchCallback`: steps, the loss under accumulation, the
pre-clip norm, validation metrics and actions must agree with Lightning's own view; training
must be the same with and without it; DDP on the CPU gives one rank per process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from gradwatch import protocol
from tests.probe_helpers import read_spool

pytest.importorskip("lightning")
REPO = Path(__file__).resolve().parent.parent


def _package(name: str) -> tuple[Any, Any]:
    """The Lightning package and gradwatch's callback for it."""
    if name == "lightning":
        import lightning.pytorch as pl

        from gradwatch.integrations.lightning import GradwatchCallback
    else:
        pl = pytest.importorskip("pytorch_lightning")
        from gradwatch.integrations.pytorch_lightning import GradwatchCallback
    return pl, GradwatchCallback


def _module(pl: Any) -> Any:
    class Regression(pl.LightningModule):
        """Records the loss each micro-batch returns, by the optimizer step it belongs to."""

        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
            self.returned: dict[int, list[float]] = defaultdict(list)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.returned[self.trainer.global_step + 1].append(loss.item())
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    return Regression()


def _loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, 3 * x.sum(dim=1, keepdim=True).sin())
    return torch.utils.data.DataLoader(data, batch_size=8), torch.utils.data.DataLoader(data, batch_size=32)


def _trainer(pl: Any, tmp_path: Path, callbacks: list[Any], **options: Any) -> Any:
    defaults: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "default_root_dir": str(tmp_path),
    }
    return pl.Trainer(callbacks=callbacks, **{**defaults, **options})


def _reference_norms(pl: Any) -> Any:
    class PreclipNorms(pl.Callback):
        """The gradient norm before Lightning clips (`on_before_optimizer_step` runs first)."""

        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    return PreclipNorms()


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_records_agree_with_lightning_under_accumulation_and_clipping(tmp_path: Path, package: str) -> None:
    pl, GradwatchCallback = _package(package)
    spool = tmp_path / "spool.jsonl"
    options = {"max_epochs": 2, "accumulate_grad_batches": 2, "gradient_clip_val": 0.5}  # sanity check on (default)
    reference = _module(pl)
    _trainer(pl, tmp_path, [], **options).fit(reference, *_loaders())
    module, norms = _module(pl), _reference_norms(pl)
    trainer = _trainer(pl, tmp_path, [GradwatchCallback(url=f"file:{spool}", name="pl"), norms], **options)
    trainer.fit(module, *_loaders())

    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), reference.parameters()))
    _, records, others = read_spool(spool)
    assert [r.step for r in records] == list(range(1, trainer.global_step + 1)) and trainer.global_step == 12
    for record in records:  # the mean of what training_step returned, not divided by 2
        returned = module.returned[record.step]
        assert len(returned) == 2 and record.loss == pytest.approx(sum(returned) / 2, rel=1e-5), record.step
    assert [r.grad_norm_preclip for r in records] == pytest.approx(norms.norms, rel=1e-5)
    assert max(norms.norms) > 0.5  # clipping cut the gradients the probe measured after it
    # the sanity check is not an evaluation of the run; each epoch's validation is its last step's
    assert [(r.step, set(r.scalars)) for r in records if r.scalars] == [(6, {"val_loss"}), (12, {"val_loss"})]
    assert records[-1].scalars["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    assert isinstance(others[-1], protocol.Bye) and others[-1].status == "finished"


def test_actions_map_onto_the_trainer(tmp_path: Path) -> None:
    """stop -> trainer.should_stop; checkpoint -> trainer.save_checkpoint, at the named step."""
    pl, GradwatchCallback = _package("lightning")
    spool = tmp_path / "spool.jsonl"
    callback = GradwatchCallback(url=f"file:{spool}", name="pl-actions", actions=True)

    class Inject(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            for action in (protocol.Action(id="c", kind="checkpoint", step=3),
                           protocol.Action(id="s", kind="stop", step=5, reason="not learning")):
                callback.probe.run._actions.receive(action)

    trainer = _trainer(pl, tmp_path, [callback, Inject()], max_epochs=5)
    trainer.fit(_module(pl), _loaders()[0])

    assert trainer.global_step == 5
    assert (tmp_path / "checkpoints" / "gradwatch-step=3.ckpt").is_file()
    _, records, others = read_spool(spool)
    assert len(records) == 5 and others[-1].status == "stopped" and others[-1].reason == "not learning"


@pytest.mark.slow
def test_ddp_on_the_cpu_gives_one_rank_per_process(tmp_path: Path) -> None:
    """`strategy="ddp"` with two CPU processes (gloo): the example script, each rank's spool."""
    spool = tmp_path / "spool.jsonl"
    env = {**os.environ, "GRADWATCH_URL": f"file:{spool}", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "lightning_train.py"), "--devices", "2", "--epochs", "2"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spools = [read_spool(spool.with_name(f"{spool.name}.rank{rank}")) for rank in (0, 1)]
    assert len({hello.run for hello, _, _ in spools}) == 1
    for rank, (hello, records, others) in enumerate(spools):
        assert (hello.rank, hello.world_size) == (rank, 2)
        # 512 samples / batch 16 / 2 ranks / accumulation 2 = 8 optimizer steps per epoch
        assert [r.step for r in records] == list(range(1, 17))
        assert all(r.loss is not None and r.grad_norm_preclip is not None for r in records)
        assert [r.step for r in records if "val_loss" in r.scalars] == [8, 16]
        assert others[-1].status == "finished"


def test_steps_the_precision_plugins_grad_scaler_skips_are_recorded_as_skipped(tmp_path: Path) -> None:
    """`precision="16-mixed"` on a GPU; on the CPU the same plugin is given its GradScaler."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision

    from gradwatch.integrations.lightning import GradwatchCallback

    class Poisoned(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if batch_idx == 3:
                x = x.clone()
                x[0, 0] = math.inf
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    spool = tmp_path / "spool.jsonl"
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    trainer = _trainer(pl, tmp_path, [GradwatchCallback(url=f"file:{spool}", name="pl-amp")], max_epochs=1,
                       plugins=[precision])
    trainer.fit(Poisoned(), _loaders()[0])
    _, records, _ = read_spool(spool)
    assert [r.step for r in records] == list(range(1, 13)) and trainer.global_step == 12
    assert [r.step for r in records if r.skipped] == [4]
    assert [r.loss_scale for r in records[2:5]] == [1024.0, 1024.0, 512.0]
    assert all(r.loss < 100 for r in records if not r.skipped)  # unscaled
