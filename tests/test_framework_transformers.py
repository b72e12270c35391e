"""A real Hugging Face Trainer with `GradwatchCallback`: what the probe records must agree
with what the Trainer logs itself, and training must be the same with and without it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gradwatch import protocol
from tests.probe_helpers import read_spool

transformers = pytest.importorskip("transformers")
from gradwatch.integrations.transformers import GradwatchCallback


class Sequences(torch.utils.data.Dataset):
    """Token sequences with uneven padding (labels -100), so that micro-batches of one
    optimizer step hold different numbers of tokens, which is when the Trainer normalises
    each micro-batch's loss by the tokens of the whole accumulated batch."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 16), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, 4 + (i * 7) % 12 :] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Regression(torch.nn.Module):
    """The smallest model the Trainer accepts: returns a dict with the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}


class Points(torch.utils.data.Dataset):
    def __init__(self, n: int, poison: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True).sin()
        if poison is not None:
            self.x[poison, 0] = math.nan

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _trainer(tmp_path: Path, model: torch.nn.Module, train: Any, callbacks: list[Any], **args: Any) -> Any:
    defaults: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 1e-3,
        "report_to": "none", "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
    }
    return transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**{**defaults, **args}), train_dataset=train,
        eval_dataset=Sequences(16, seed=1) if isinstance(train, Sequences) else None, callbacks=callbacks,
    )


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no accumulation", "accumulation 2"])
def test_records_agree_with_what_the_trainer_logs(tmp_path: Path, accumulation: int) -> None:
    spool = tmp_path / "spool.jsonl"
    args = {"gradient_accumulation_steps": accumulation, "max_steps": 12, "logging_steps": 3, "eval_strategy": "steps",
                "eval_steps": 6, "max_grad_norm": 0.5}
    reference = _trainer(tmp_path, _gpt2(), Sequences(64), [], **args)
    reference.train()
    trainer = _trainer(tmp_path, _gpt2(), Sequences(64), [GradwatchCallback(url=f"file:{spool}", name="hf")], **args)
    trainer.train()

    assert all(torch.equal(a, b) for a, b in zip(_weights(trainer.model), _weights(reference.model)))
    _, records, others = read_spool(spool)
    assert [r.step for r in records] == list(range(1, trainer.state.global_step + 1))
    by_step = {r.step: r for r in records}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    last = 0
    for entry in logs:
        window = [by_step[s].loss for s in range(last + 1, entry["step"] + 1)]
        assert sum(window) / len(window) == pytest.approx(entry["loss"], rel=1e-5), entry
        assert by_step[entry["step"]].grad_norm_preclip == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert by_step[entry["step"]].lr == [pytest.approx(entry["learning_rate"])] * 2  # decay / no decay
        last = entry["step"]
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [e["step"] for e in evaluations] == [6, 12]  # the last one at the final step
    for entry in evaluations:
        assert by_step[entry["step"]].scalars["val_loss"] == pytest.approx(entry["eval_loss"])
        assert not any(key.endswith(("runtime", "per_second")) for key in by_step[entry["step"]].scalars)
    assert isinstance(others[-1], protocol.Bye) and others[-1].status == "finished"


class _Inject(transformers.TrainerCallback):
    """Hands actions to the probe as if the collector had sent them, once it is attached."""

    def __init__(self, gradwatch_callback: GradwatchCallback, actions: list[protocol.Action]) -> None:
        self.gradwatch_callback = gradwatch_callback
        self.actions = actions

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for action in self.actions:
            self.gradwatch_callback.probe.run._actions.receive(action)  # type: ignore[union-attr]


def test_actions_map_onto_the_trainers_controls(tmp_path: Path) -> None:
    """stop -> should_training_stop, checkpoint -> should_save, reduce_lr under the Trainer's
    scheduler, each at the step the collector named."""
    spool = tmp_path / "spool.jsonl"
    callback = GradwatchCallback(url=f"file:{spool}", name="hf-actions", actions=True)
    actions = [
        protocol.Action(id="lr", kind="reduce_lr", step=2, params={"factor": 0.5}),
        protocol.Action(id="ckpt", kind="checkpoint", step=3),
        protocol.Action(id="stop", kind="stop", step=5, reason="diverging"),
    ]
    trainer = _trainer(tmp_path, Regression(), Points(256), [callback, _Inject(callback, actions)],
                       max_steps=20, logging_steps=1, lr_scheduler_type="cosine")
    trainer.train()

    assert trainer.state.global_step == 5
    assert (tmp_path / "out" / "checkpoint-3").is_dir()
    _, records, others = read_spool(spool)
    scheduled = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    for record in records:
        factor = 0.5 if record.step >= 2 else 1.0
        assert record.lr == [pytest.approx(scheduled[record.step] * factor)] * 2, record.step
    assert others[-1].status == "stopped" and others[-1].reason == "diverging"


def test_skip_step_keeps_a_poisoned_batch_out_of_the_weights(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    callback = GradwatchCallback(url=f"file:{spool}", name="hf-skip", actions=True)
    arm = protocol.Action(id="skip", kind="skip_step", step=1, params={"on": "nonfinite"})
    trainer = _trainer(tmp_path, Regression(), Points(64, poison=17), [callback, _Inject(callback, [arm])],
                       max_steps=16, per_device_train_batch_size=4)
    trainer.train()

    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    _, records, _ = read_spool(spool)
    skipped = [r for r in records if r.skipped]
    assert len(records) == 16 and len(skipped) == 1 and skipped[0].nonfinite_layers > 0
