"""Several runs wrap the same method; unwrapping one, in any order, keeps the others."""

from __future__ import annotations

import itertools

import pytest

from gradwatch.probe.wrapping import wrap_method


class Scaler:
    def update(self) -> str:
        return "update"


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_unwrapping_in_any_order_keeps_the_live_wrappers(order: tuple[int, ...]) -> None:
    scaler, calls = Scaler(), []
    live = [True, True, True]
    unwraps = [wrap_method(scaler, "update", lambda i=i: calls.append(i), lambda i=i: live[i]) for i in range(3)]
    for gone in order:
        live[gone] = False
        unwraps[gone]()
        calls.clear()
        assert scaler.update() == "update"
        assert sorted(calls) == [i for i in range(3) if live[i]]
    assert "update" not in vars(scaler)
