"""Bounded, downsampled storage by step: the part the curves and the gradient-flow matrix share.

A fixed number of buckets, each `width` steps wide from the first step seen. When a step
falls past the last bucket the width doubles and neighbouring buckets merge, so memory
stays fixed however long the run, and between half and all of the buckets are in use.
Each bucket keeps the min and max (and, for curves, the last) of the values that fell in
it: downsampling never hides a spike.

Steps arrive in increasing order (the registry merges them so), so a change only ever
touches the last buckets: each bucket remembers the version of its last change, and those
versions rise with the bucket index. "What changed since version N" is then a tail,
found by bisection, unless the buckets were re-laid (merged) after N.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

NAN = math.nan
EMPTY_STEP = -1


def fmin(a: float, b: float) -> float:
    """min ignoring NaN (NaN marks an empty cell)."""
    return b if math.isnan(a) or b < a else a


def fmax(a: float, b: float) -> float:
    return b if math.isnan(a) or b > a else a


def encode(values: Iterable[float], digits: int) -> list[float | str | None]:
    """JSON-ready numbers: rounded to `digits` significant digits, an empty cell (NaN) as
    null, infinities as the strings "Infinity" / "-Infinity" (a browser's JSON.parse
    refuses the bare constants)."""
    spec = f".{digits}g"
    out: list[float | str | None] = []
    for v in values:
        if math.isnan(v):
            out.append(None)
        elif v in (math.inf, -math.inf):
            out.append("Infinity" if v > 0 else "-Infinity")
        else:
            out.append(float(format(v, spec)))
    return out


def decode(values: Sequence[object]) -> list[float]:
    """The inverse of `encode` (rounding aside); raises ValueError on anything else."""
    out = []
    for v in values:
        if v is None:
            out.append(NAN)
        elif v in ("Infinity", "-Infinity"):
            out.append(math.inf if v == "Infinity" else -math.inf)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out.append(float(v))
        else:
            raise ValueError(f"not a stored number: {v!r}")
    return out


class Member(Protocol):
    """Arrays kept per bucket of a `StepBuckets`, which grows and merges them with its own."""

    def grow(self, buckets: int) -> None:
        """Hold `buckets` buckets, the new ones empty."""

    def merge_pairs(self, used: int) -> None:
        """Bucket i becomes buckets 2i and 2i+1 merged (`used` is even); hold only those."""


class Cells:
    """One curve: min, max and last of what fell in each bucket. NaN: nothing yet."""

    def __init__(self) -> None:
        self.min, self.max, self.last = array("d"), array("d"), array("d")

    def add(self, at: int, value: float) -> None:
        """`value` is not NaN."""
        self.min[at] = fmin(self.min[at], value)
        self.max[at] = fmax(self.max[at], value)
        self.last[at] = value

    def grow(self, buckets: int) -> None:
        for column in (self.min, self.max, self.last):
            column.extend(array("d", [NAN]) * (buckets - len(column)))

    def merge_pairs(self, used: int) -> None:
        # In place: bucket i is written after buckets 2i and 2i+1, both >= i, were read.
        halves = used // 2
        for i in range(halves):
            a, b = 2 * i, 2 * i + 1
            self.min[i] = fmin(self.min[a], self.min[b])
            self.max[i] = fmax(self.max[a], self.max[b])
            self.last[i] = self.last[a] if math.isnan(self.last[b]) else self.last[b]
        for column in (self.min, self.max, self.last):
            del column[halves:]

    def restore(self, which: str, values: Sequence[float]) -> None:
        column = getattr(self, which)
        if len(values) != len(column):
            raise ValueError(f"{which}: {len(values)} values for {len(column)} buckets")
        column[:] = array("d", values)

    @property
    def nbytes(self) -> int:
        return sum(len(c) * c.itemsize for c in (self.min, self.max, self.last))


class StepBuckets:
    """Which bucket a step falls in, the last step seen in each (their x) and when each last
    changed. Its arrays, and its members', grow with the run up to `capacity` buckets: a
    short run costs little."""

    def __init__(self, capacity: int, counters: Sequence[str] = ()) -> None:
        if capacity < 2 or capacity % 2:
            raise ValueError(f"buckets merge in pairs: {capacity} is not an even number >= 2")
        self.capacity = capacity
        self.width = 1
        self.origin: int | None = None
        self.relaid_at = 0  # the version at which the buckets were last merged
        self.step = array("q")
        self.changed = array("q")  # rises with the index: see the module's docstring
        self.counters = {name: array("q") for name in counters}
        self.members: list[Member] = []

    @property
    def used(self) -> int:
        """1 + the highest bucket written."""
        return len(self.step)

    def place(self, step: int, version: int) -> int:
        """The bucket of `step` (>= every step placed before), merging neighbours first if
        it falls past the last one; marks it changed at `version`."""
        if self.origin is None:
            self.origin = step
        while (step - self.origin) // self.width >= self.capacity:
            self._merge_pairs()
            self.relaid_at = version
        i = (step - self.origin) // self.width
        if i >= self.used:
            # Buckets skipped over (a gap in the steps) are changed at `version` too, so
            # that the versions keep rising with the index.
            self._grow(i + 1, version)
        self.step[i] = step
        self.changed[i] = version
        return i

    def first_changed_after(self, version: int) -> int:
        """The first bucket changed after `version`: every later one has too."""
        return bisect_right(self.changed, version)

    def _grow(self, buckets: int, version: int) -> None:
        more = buckets - self.used
        self.step.extend(array("q", [EMPTY_STEP]) * more)
        self.changed.extend(array("q", [version]) * more)
        for counts in self.counters.values():
            counts.extend(array("q", [0]) * more)
        for member in self.members:
            member.grow(buckets)

    def _merge_pairs(self) -> None:
        if self.used % 2:  # an empty last bucket to pair with
            self._grow(self.used + 1, self.changed[-1])
        for member in self.members:
            member.merge_pairs(self.used)
        halves = self.used // 2
        for i in range(halves):
            later = self.step[2 * i + 1]
            self.step[i] = later if later != EMPTY_STEP else self.step[2 * i]
            self.changed[i] = max(self.changed[2 * i], self.changed[2 * i + 1])
            for counts in self.counters.values():
                counts[i] = counts[2 * i] + counts[2 * i + 1]
        for column in (self.step, self.changed, *self.counters.values()):
            del column[halves:]
        self.width *= 2

    def steps_json(self, start: int) -> list[int | None]:
        return [s if s != EMPTY_STEP else None for s in self.step[start:]]

    def restore(
        self, origin: int | None, width: int, steps: Sequence[object], version: int,
        counters: Mapping[str, Sequence[object]] | None = None,
    ) -> None:
        """Buckets as `steps_json` and the counters listed them (all changed at `version`);
        the members are grown to match, for them to restore theirs."""
        if width < 1 or len(steps) > self.capacity or (origin is None) != (not steps):
            raise ValueError(f"{len(steps)} buckets of width {width} from {origin!r} do not fit {self.capacity}")
        if not all(s is None or (isinstance(s, int) and s >= 0) for s in steps):
            raise ValueError("steps must be integers >= 0 or null")
        self.origin, self.width = origin, width
        self.step = array("q", [EMPTY_STEP if s is None else s for s in steps])  # type: ignore[misc]
        self.changed = array("q", [version]) * len(steps)
        for name in self.counters:
            counts = (counters or {}).get(name, [0] * len(steps))
            if len(counts) != len(steps) or not all(isinstance(c, int) and c >= 0 for c in counts):
                raise ValueError(f"{name}: not {len(steps)} counts")
            self.counters[name] = array("q", counts)  # type: ignore[arg-type]
        for member in self.members:
            member.grow(len(steps))
        self.relaid_at = version

    @property
    def nbytes(self) -> int:
        """Its own arrays (its members count theirs)."""
        arrays = [self.step, self.changed, *self.counters.values()]
        return sum(len(a) * a.itemsize for a in arrays)
