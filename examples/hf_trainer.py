"""Hugging Face Trainer with one added callback: a tiny GPT-2 built from a config (no
download) learning synthetic sequences, with gradient accumulation and clipping.

    gradwatch collector &            # in another terminal (or: gradwatch up)
    python examples/hf_trainer.py    # pip install 'gradwatch[transformers]'
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradwatch.integrations.transformers import GradwatchCallback


class Sequences(torch.utils.data.Dataset):
    """Counting sequences mod 64 from random starts, of uneven length (padding labelled -100)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 64, (n, 1), generator=g)
        self.ids = (starts + torch.arange(16)) % 64
        self.labels = self.ids.clone()
        for i, length in enumerate(torch.randint(8, 17, (n,), generator=g).tolist()):
            self.labels[i, length:] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                   bos_token_id=0, eos_token_id=0))
args = TrainingArguments(
    output_dir=tempfile.mkdtemp(prefix="hf-trainer-"),
    per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=60,
    learning_rate=3e-3, max_grad_norm=1.0, logging_steps=10, eval_strategy="steps", eval_steps=20,
    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
)
trainer = Trainer(
    model=model, args=args, train_dataset=Sequences(512, seed=1), eval_dataset=Sequences(64, seed=2),
    callbacks=[GradwatchCallback()],  # the one line; keywords are gradwatch.attach's (name=, url=, actions=...)
)
trainer.train()
