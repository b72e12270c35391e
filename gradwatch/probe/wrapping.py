"""Wrapping a method of the user's object (`optimizer.step`, `scaler.update`) so that a
run's callable runs first, in a way that several runs can share: each wrapper is an
instance attribute over what was there, and unwrapping one keeps the others. The outermost
puts back the first wrapper beneath it whose run is still live (or the class's method); an
inner one stays in the chain as a pass-through until the one above it goes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def wrap_method(obj: Any, name: str, before: Callable[[], Any], live: Callable[[], bool]) -> Callable[[], None]:
    """Makes `obj.<name>` call `before()` first while `live()`; returns the unwrap."""
    beneath = vars(obj).get(name)  # another run's wrapper, or None: the class's method
    original = getattr(obj, name)

    @functools.wraps(original)  # keeps the marks LR schedulers put on optimizer.step
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if live():
            before()
        return original(*args, **kwargs)

    wrapper.gradwatch_wrap = (live, beneath)  # type: ignore[attr-defined]
    setattr(obj, name, wrapper)

    def unwrap() -> None:
        if vars(obj).get(name) is not wrapper:
            return  # wrapped again since: this one passes through once `live()` is False
        restore = beneath
        while restore is not None and hasattr(restore, "gradwatch_wrap") and not restore.gradwatch_wrap[0]():
            restore = restore.gradwatch_wrap[1]
        if restore is None:
            delattr(obj, name)
        else:
            setattr(obj, name, restore)

    return unwrap
