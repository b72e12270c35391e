"""The gradient-flow matrix behind the web view's heatmap: per-layer gradient norm, layers x steps.

Pure and bounded. Columns are step buckets (see buckets.py) holding, per layer, the largest
gradient norm of the detail steps that fell in them (so a spike survives downsampling); at
most MAX_ROWS rows (beyond that, neighbouring layers share a row, named after its first and
last layer) and about CELL_BUDGET float32 cells, grown with the run: at most about 256 KiB
per run, whatever its length and depth. A non-finite norm (NaN or inf) is kept as inf, which the page draws
as non-finite; a cell without a value (a frozen layer, no gradient, no detail step in its
steps) holds EMPTY.

Only the largest value is kept, not the smallest too: merging is then an element-wise max
of two columns (norms are >= 0, so the EMPTY sentinel -1 loses to any value), which keeps
this a small part of ingest on every detail step.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from gradwatch.collector.buckets import StepBuckets

MAX_ROWS = 512
CELL_BUDGET = 65_536
MIN_COLUMNS, MAX_COLUMNS = 32, 512
EMPTY = -1.0


class GradientFlow:
    def __init__(self, rows: Sequence[str], layers_per_row: int, layers_total: int) -> None:
        self.rows = tuple(rows)
        self.layers_per_row = layers_per_row
        self.layers_total = layers_total
        columns = min(MAX_COLUMNS, max(MIN_COLUMNS, CELL_BUDGET // max(1, len(self.rows))))
        columns -= columns % 2  # buckets merge in pairs
        self.buckets = StepBuckets(columns)
        self.cells = array("f")  # column-major, grown with the buckets
        self.buckets.members.append(self)

    @classmethod
    def for_layers(cls, layers: Sequence[str]) -> GradientFlow:
        per_row = max(1, math.ceil(len(layers) / MAX_ROWS))
        groups = [layers[i:i + per_row] for i in range(0, len(layers), per_row)]
        return cls([g[0] if len(g) == 1 else f"{g[0]} … {g[-1]}" for g in groups], per_row, len(layers))

    def add(self, step: int, norms: Sequence[float | None], version: int) -> None:
        """One detail step's per-layer gradient norms, aligned with the layers."""
        used = self.buckets.used
        j = self.buckets.place(step, version)
        fresh = j >= used  # an empty column: no merging with what it holds
        n = len(self.rows)
        norms = norms[:self.layers_total]
        try:  # the usual vector, every layer measured: converted in C (this runs on every detail step)
            values = array("f", norms)
        except TypeError:  # a None: a layer without a value
            values = array("f", [EMPTY if v is None else v for v in norms])
        if math.isnan(sum(values)):  # norms are >= 0, so only a NaN makes the sum NaN
            values = array("f", [math.inf if math.isnan(v) else v for v in values])
        if self.layers_per_row > 1:
            g = self.layers_per_row
            values = array("f", [max(values[i:i + g]) for i in range(0, len(values), g)])
        values.extend([EMPTY] * (n - len(values)))
        column = slice(j * n, (j + 1) * n)
        if not fresh:  # the conditional is 2.5x faster than max() or map(max, ...) here
            values = array("f", [old if old > new else new for old, new in zip(self.cells[column], values)])  # noqa: FURB136
        self.cells[column] = values

    def grow(self, buckets: int) -> None:
        self.cells.extend(array("f", [EMPTY]) * (buckets * len(self.rows) - len(self.cells)))

    def merge_pairs(self, used: int) -> None:
        n = len(self.rows)
        halves = used // 2
        for i in range(halves):
            a, b = 2 * i * n, (2 * i + 1) * n
            pairs = zip(self.cells[a:a + n], self.cells[b:b + n])
            self.cells[i * n:(i + 1) * n] = array("f", [x if x > y else y for x, y in pairs])  # noqa: FURB136
        del self.cells[halves * n:]

    def since(self, version: int, reset: bool) -> dict[str, Any]:
        """The columns changed after `version`, or all of them (with the row names) when
        `reset` or when they were merged since. `max` holds the columns' cells as
        little-endian float32, base64: column j's rows are values [j*rows, (j+1)*rows)
        (exact, and a tenth of the time and half the size of JSON numbers)."""
        reset = reset or version < self.buckets.relaid_at
        start = 0 if reset else self.buckets.first_changed_after(version)
        cells = self.cells[start * len(self.rows):self.buckets.used * len(self.rows)]
        out: dict[str, Any] = {
            "reset": reset,
            "width": self.buckets.width,
            "from": start,
            "step": self.buckets.steps_json(start),
            "max": _base64(cells),
        }
        if reset:
            out |= {"rows": list(self.rows), "layers_per_row": self.layers_per_row,
                    "layers_total": self.layers_total, "origin": self.buckets.origin}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], version: int) -> GradientFlow:
        """From a full `since(..., reset=True)`; raises ValueError, KeyError or TypeError on a
        malformed one."""
        rows = data["rows"]
        if not rows or not all(isinstance(r, str) for r in rows):
            raise ValueError("row names must be strings")
        flow = cls(rows, int(data["layers_per_row"]), int(data["layers_total"]))
        if flow.layers_per_row < 1 or len(rows) != math.ceil(flow.layers_total / flow.layers_per_row):
            raise ValueError("rows do not match the layer count")
        flow.buckets.restore(data["origin"], int(data["width"]), data["step"], version)
        cells = array("f", base64.b64decode(data["max"], validate=True))
        if sys.byteorder == "big":
            cells.byteswap()
        if len(cells) != len(data["step"]) * len(rows):
            raise ValueError(f"{len(cells)} cells for {len(data['step'])} columns of {len(rows)} rows")
        flow.cells[:] = cells
        return flow

    @property
    def nbytes(self) -> int:
        return len(self.cells) * self.cells.itemsize + self.buckets.nbytes + sum(len(r) for r in self.rows)


def _base64(cells: array) -> str:
    if sys.byteorder == "big":
        cells = array(cells.typecode, cells)
        cells.byteswap()
    return base64.b64encode(cells.tobytes()).decode("ascii")
