"""Small pure helpers the detectors share: rolling windows, an outlier-free baseline, a latch."""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from collections.abc import Iterable


class RollingWindow:
    """The last `size` finite values. Non-finite values are refused, so one NaN can never
    poison a median or a standard deviation (the `nonfinite` detector reports them).
    Running sums keep `std` O(1) (detectors call it on every step of every run); they are
    recomputed exactly once per window length so rounding from values long gone (a loss
    of 10 early on, 1e-6 now) cannot accumulate."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._values: deque[float] = deque(maxlen=size)
        self._sum = 0.0
        self._sum_sq = 0.0
        self._adds = 0

    def add(self, value: float | None) -> bool:
        """Append `value` when finite; says whether it was taken."""
        if value is None or not math.isfinite(value):
            return False
        if len(self._values) == self._size:
            evicted = self._values[0]
            self._sum -= evicted
            self._sum_sq -= evicted * evicted
        self._values.append(value)
        self._sum += value
        self._sum_sq += value * value
        self._adds += 1
        if self._adds % self._size == 0:
            self._resum()
        return True

    def replace(self, values: Iterable[float]) -> None:
        self._values.clear()
        self._values.extend(values)
        self._resum()

    def _resum(self) -> None:
        self._sum = math.fsum(self._values)
        self._sum_sq = math.fsum(x * x for x in self._values)

    def __len__(self) -> int:
        return len(self._values)

    def median(self) -> float:
        return statistics.median(self._values)

    def max(self) -> float:
        return max(self._values)

    def std(self) -> float:
        n = len(self._values)
        if n < 2:
            return 0.0
        mean = self._sum / n
        return math.sqrt(max(0.0, self._sum_sq / n - mean * mean))


class OutlierFreeBaseline:
    """A rolling window that leaves outliers out, so that a spike cannot inflate the baseline
    it is judged against (OLMo's z-score window includes the spike), yet adopts a level that
    persists for `adopt_after` consecutive values: a lasting shift becomes the new normal."""

    def __init__(self, size: int, adopt_after: int) -> None:
        self.window = RollingWindow(size)
        self._adopt_after = adopt_after
        self._pending: list[float] = []

    def add(self, value: float, outlier: bool) -> bool:
        """Feed one finite value; returns True when a persistent new level was just adopted."""
        if not outlier:
            self._pending.clear()
            self.window.add(value)
            return False
        self._pending.append(value)
        if len(self._pending) < self._adopt_after:
            return False
        self.window.replace(self._pending)
        self._pending.clear()
        return True


class Latch:
    """Debounces a condition: on after `on_after` consecutive true updates, off after
    `off_after` consecutive false ones. Counting updates rather than steps lets per-layer
    rules count detail observations, whatever the probe's `every`."""

    def __init__(self, on_after: int, off_after: int = 1) -> None:
        self._on_after = on_after
        self._off_after = off_after
        self._streak = 0  # consecutive updates disagreeing with the current state
        self.active = False

    def update(self, condition: bool) -> bool:
        """Feed this update's condition; returns whether the latch is on now."""
        if condition == self.active:
            self._streak = 0
        else:
            self._streak += 1
            if self._streak >= (self._off_after if self.active else self._on_after):
                self.active = condition
                self._streak = 0
        return self.active

    @property
    def idle(self) -> bool:
        """Off with nothing pending: indistinguishable from a fresh latch."""
        return not self.active and self._streak == 0

    def reset(self) -> None:
        self._streak = 0
        self.active = False


class Excursion:
    """A value's excursions above its own outlier-free rolling baseline, debounced.

    Callers read `window` to set thresholds, then call `update` with whether the value is
    above them (the enter threshold while calm, the lower exit threshold while active, which
    is the hysteresis band). Values above are kept out of the baseline; a level that lasts
    `window` values is adopted as the new normal and ends the excursion."""

    def __init__(self, window: int, warmup: int, on_after: int, off_after: int) -> None:
        self._baseline = OutlierFreeBaseline(window, adopt_after=window)
        self._latch = Latch(on_after, off_after)
        self._warmup = warmup

    @property
    def window(self) -> RollingWindow:
        return self._baseline.window

    @property
    def active(self) -> bool:
        return self._latch.active

    @property
    def warming_up(self) -> bool:
        return len(self._baseline.window) < self._warmup

    def warm(self, value: float) -> None:
        self._baseline.add(value, outlier=False)

    def update(self, value: float, above: bool) -> bool:
        active = self._latch.update(above)
        if self._baseline.add(value, outlier=above):
            self._latch.reset()
            return False
        return active


def compiled(pattern: str) -> re.Pattern[str]:
    """A settings regex, or a ValueError that says what is wrong with it (for pydantic)."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"not a regular expression: {error}") from None


# sigma of a normal sample from its median absolute deviation
MAD_TO_SIGMA = 1.4826


def median_and_error(values: list[float]) -> tuple[float, float]:
    """The median and its standard error, 1.2533 sigma / sqrt(n), sigma from the MAD."""
    median = statistics.median(values)
    sigma = MAD_TO_SIGMA * statistics.median([abs(x - median) for x in values])
    return median, 1.2533 * sigma / math.sqrt(len(values))


def all_finite(values: Iterable[float | None]) -> bool:
    """True when every value is a finite float, in one C-level `sum` instead of a Python
    loop: per-layer rules screen the usual all-healthy vector with it before looking layer
    by layer (a None raises TypeError; a NaN, an inf or an overflowing sum is not finite)."""
    try:
        return math.isfinite(sum(values))  # type: ignore[arg-type]
    except TypeError:
        return False


def first_finite(*values: float | None) -> float | None:
    """The first argument that is a finite number (e.g. the pre-clip norm, else the norm)."""
    for value in values:
        if value is not None and math.isfinite(value):
            return value
    return None


def max_lr(lrs: Iterable[float]) -> float | None:
    """The largest finite LR over the param groups (None when none is reported)."""
    finite_lrs = [lr for lr in lrs if math.isfinite(lr)]
    return max(finite_lrs) if finite_lrs else None
