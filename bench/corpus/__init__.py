"""The detection corpus: real CPU trainings, healthy or with one pathology each.

A case is a function that trains a model with `gradwatch.attach(model, optimizer, **opts)`
(`opts` carries the spool `url` and the run `name`; everything else is the case's own
choice, as a user's script would make it). `expected` lists the alert kinds that are a
correct answer, the first being the case's own kind (empty: healthy, nothing may fire);
`onset` is the optimizer step at which the pathology starts (1: present from the start).

Modules register their cases with `@case(...)`; the split into a tuning and a held-out
half is made by `bench/detection.py` from a hash of the name, never by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TrainFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    name: str
    expected: tuple[str, ...]
    onset: int
    description: str
    train: TrainFn

    @property
    def primary(self) -> str | None:
        return self.expected[0] if self.expected else None


CASES: dict[str, Case] = {}


def case(name: str, expected: tuple[str, ...] = (), onset: int = 1, description: str = "") -> Callable[[TrainFn], TrainFn]:
    def register(train: TrainFn) -> TrainFn:
        if name in CASES:
            raise ValueError(f"case {name!r} is registered twice")
        CASES[name] = Case(name, expected, onset if expected else 0, description, train)
        return train

    return register


# Importing a family module registers its cases.
from corpus import (  # noqa: F401
    cases_accum,
    cases_amp,
    cases_cnn,
    cases_finetune,
    cases_gpt,
    cases_manual,
    cases_mlp,
    cases_rnn,
    cases_scripts,
)

# The CI subset: a few of each family, both halves, trains in about a minute.
QUICK: tuple[str, ...] = (
    "mlp-blobs-healthy",
    "mlp-sgd-lr-1e-7",
    "rnn-gru-lm-sgd-clip",
    "rnn-gru-labels-shuffled",
    "manual-gru-lm-linear-decay",
    "manual-lstm-lm-grads-never-zeroed",
    "cnn-nan-pixels",
    "amp-fp16-scale-collapse",
    "finetune-freeze-then-unfreeze",
    "gpt-lr-1",
    "script-wordlm-lstm-tied-healthy",
    "script-wordlm-lr2000",
)
