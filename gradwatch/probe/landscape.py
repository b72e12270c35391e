"""A loss-landscape slice: the loss along one or two directions around the current weights
(Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

    result = gradwatch.landscape(model, val_batches, loss_fn, directions=2, points=21)
    print(result)          # centre loss, curvature and rise per direction

Directions are normalised per filter: for each output row of a weight (a conv filter, a
row of a linear or embedding weight) the direction's norm equals the weight's, so layers
with large weights do not dominate and a step of 1 is "one weight norm" everywhere.
Parameters with one dimension (biases, norm scales and shifts) get no direction, as in the
paper's default (their scale is not that of a filter). Only the parameters that train
(``requires_grad``) move. A direction is random (a fixed seed), or, with `last_update`,
the first one is the last update (normalised the same way), so one axis shows the valley
along which training moved.

Memory and exactness: the one extra copy of the weights kept is the originals, in place of
a direction buffer; the directions are never stored whole but redrawn per tensor at each
point from their seed (one float32 tensor-sized temporary at a time; the weights' row
norms, one float per row, are kept), at the cost of a random draw per weight and direction
at each point (docs/performance.md has the figures). Each point writes the perturbed
weights as ``original + a*d1 + b*d2`` from the originals (no drift from point to point),
and the end writes the originals back, so the weights are bit-identical afterwards, also on
error (float addition cannot be undone exactly by a subtraction, a copy can).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradwatch import protocol
from gradwatch.probe.batch_loss import LossFn, batch_loss


@dataclass(frozen=True)
class LandscapeResult:
    """`losses[j][i]` is the mean loss over the batches at ``alphas[i]`` along the first
    direction and ``betas[j]`` along the second (``betas == [0.0]`` for one direction);
    the grid is odd-sized, so its middle point is the current weights, `centre`."""

    alphas: list[float]
    betas: list[float]
    losses: list[list[float]]
    centre: float
    directions: tuple[str, ...]  # "random" or "last_update", per axis
    radius: float
    # Per direction: the second derivative at the centre (a quadratic fitted to the inner
    # half of the line), and the mean rise of the loss over the centre at +-radius/2.
    curvature: tuple[float, ...]
    rise_at_half_radius: tuple[float, ...]
    forwards: int  # model forwards run: points x batches

    def line(self, direction: int = 0) -> list[float]:
        """The losses along one direction, through the centre."""
        middle = len(self.alphas) // 2
        if direction == 0:
            return self.losses[len(self.betas) // 2]
        return [row[middle] for row in self.losses]

    def scalars(self) -> dict[str, float]:
        """The summary as scalars for ``run.log(**result.scalars())``."""
        values = {"landscape_centre": self.centre}
        for k, (curvature, rise) in enumerate(zip(self.curvature, self.rise_at_half_radius)):
            values[f"landscape_curvature_{k}"] = curvature
            values[f"landscape_rise_{k}"] = rise
        return values

    def message(self, step: int) -> protocol.Landscape | None:
        """The grid for the collector, taken at `step`; None when an axis has more points
        than the protocol carries (the summary scalars still go)."""
        if len(self.alphas) > protocol.MAX_LANDSCAPE_AXIS:
            return None
        two = len(self.directions) == 2
        return protocol.Landscape(step=step, alphas=self.alphas, betas=self.betas if two else [], losses=self.losses,
                                  centre=self.centre, directions=list(self.directions), radius=self.radius)

    def __str__(self) -> str:
        size = "x".join(str(len(axis)) for axis in (self.alphas, self.betas) if len(axis) > 1)
        header = (f"loss landscape, {size} points within +-{self.radius:g} (filter-normalised): "
                  f"centre loss {self.centre:.4g}, {self.forwards} forwards")
        lines = [header]
        for name, curvature, rise in zip(self.directions, self.curvature, self.rise_at_half_radius):
            lines.append(f"  {name:<11} direction: curvature {curvature:.4g}, "
                         f"loss +{rise:.4g} at +-{self.radius / 2:g}")
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """A line (one direction) or a contour (two). Needs matplotlib, which gradwatch
        does not depend on."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("LandscapeResult.plot needs matplotlib: pip install matplotlib") from error
        if ax is None:
            _, ax = plt.subplots()
        if len(self.betas) == 1:
            ax.plot(self.alphas, self.losses[0])
            ax.set_xlabel(f"{self.directions[0]} direction")
            ax.set_ylabel("loss")
        else:
            contour = ax.contour(self.alphas, self.betas, self.losses, levels=20)
            ax.clabel(contour, fontsize=7)
            ax.set_xlabel(f"{self.directions[0]} direction")
            ax.set_ylabel(f"{self.directions[1]} direction")
        return ax


def landscape(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    directions: int = 2,
    points: int = 21,
    radius: float = 1.0,
    *,
    last_update: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> LandscapeResult:
    """The loss on a `points` (x `points`) grid within +-`radius` around the current
    weights, along `directions` (1 or 2) filter-normalised directions; see the module.

    `batches` follows `batch_loss`'s contract (``(inputs, targets)`` with `loss_fn`, else
    the model returns its loss); they are read once into a list and every point's loss is
    their mean, so pass a few batches, not a whole loader. `last_update`: the weights'
    last change (after minus before), by parameter name or in ``model.parameters()``
    order; it becomes the first direction. Evaluated in eval mode under
    ``torch.no_grad()``; the weights and every module's mode are restored exactly, also
    when an evaluation raises. Cost: one forward per batch per point, and one copy of the
    trained weights.
    """
    if directions not in (1, 2):
        raise ValueError(f"directions={directions}: a slice has 1 (a line) or 2 (a plane) directions")
    if points < 3 or points % 2 == 0:
        raise ValueError(f"points={points}: an odd number >= 3, so that the grid's middle is the current weights")
    if not radius > 0:
        raise ValueError(f"radius={radius}: the grid spans +-radius, so it must be positive")
    evaluated = list(batches)
    if not evaluated:
        raise ValueError("batches is empty: give at least one batch")
    moving = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    kinds = ("last_update", "random")[:directions] if last_update is not None else ("random",) * directions
    sources = [
        _Direction(_updates_by_param(model, moving, last_update) if kind == "last_update" else None,
                   2 * seed + k)  # distinct for every (seed, direction)
        for k, kind in enumerate(kinds)
    ]
    axis = [radius * (2 * i / (points - 1) - 1) for i in range(points)]
    betas = axis if directions == 2 else [0.0]
    modes = [(module, module.training) for module in model.modules()]
    originals = [p.detach().clone() for _, p in moving]
    norms = [row_norms(p) if p.dim() >= 2 else None for _, p in moving]  # one float per row: kept
    try:
        model.eval()
        with torch.no_grad():
            centre = _mean_loss(model, evaluated, loss_fn)
            losses = []
            for beta in betas:
                row = []
                for alpha in axis:
                    if alpha == 0 and beta == 0:
                        row.append(centre)  # the weights are the originals, untouched
                        continue
                    _place(moving, originals, norms, sources, (alpha, beta))
                    row.append(_mean_loss(model, evaluated, loss_fn))
                losses.append(row)
    finally:
        with torch.no_grad():
            for (_, p), original in zip(moving, originals):
                p.copy_(original)
        for module, training in modes:
            module.training = training
    lines = [losses[len(betas) // 2], [row[points // 2] for row in losses]][:directions]
    return LandscapeResult(
        alphas=axis,
        betas=betas,
        losses=losses,
        centre=centre,
        directions=kinds,
        radius=radius,
        curvature=tuple(_curvature(axis, line, radius) for line in lines),
        rise_at_half_radius=tuple(_rise(axis, line, radius / 2, centre) for line in lines),
        forwards=len(evaluated) * len(axis) * len(betas),
    )


class _Direction:
    """One direction, produced per parameter on demand: a random one redrawn from its seed
    (the same values at every point), or the given update; filter-normalised either way."""

    def __init__(self, updates: list[torch.Tensor | None] | None, seed: int) -> None:
        self._updates = updates
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def restart(self) -> None:
        """Before each point: the draws start again from the seed."""
        for generator in self._generators.values():
            generator.manual_seed(self._seed)

    def of(self, index: int, original: torch.Tensor, row_norms: torch.Tensor) -> torch.Tensor | None:
        if self._updates is not None:
            update = self._updates[index]
            if update is None:
                return None
            raw = update.detach().to(original.device, torch.float32, copy=True)  # scaled in place below
        else:
            generator = self._generators.get(original.device)
            if generator is None:
                generator = self._generators[original.device] = torch.Generator(device=original.device)
                generator.manual_seed(self._seed)
            raw = torch.randn(original.shape, generator=generator, device=original.device, dtype=torch.float32)
        return _scale_rows_(raw, row_norms).to(original.dtype)


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output row (filter) of a weight, in float32."""
    return weight.detach().float().flatten(1).norm(dim=1)


def filter_normalize_(direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Scales `direction` in place (one tensor-sized buffer, not two) so that each output
    row (filter) has the norm of the weight's row; a zero row stays zero."""
    return _scale_rows_(direction, row_norms(weight))


def _scale_rows_(direction: torch.Tensor, target_norms: torch.Tensor) -> torch.Tensor:
    norms = direction.flatten(1).norm(dim=1)
    scale = torch.where(norms > 0, target_norms / norms.clamp_min(1e-30), 0.0)
    return direction.mul_(scale.view(-1, *([1] * (direction.dim() - 1))))


def _place(moving: list[tuple[str, torch.Tensor]], originals: list[torch.Tensor], norms: list[torch.Tensor | None],
           sources: list[_Direction], coefficients: tuple[float, float]) -> None:
    """Write ``original + a*d1 (+ b*d2)`` into the parameters, one tensor at a time. A
    direction at 0 is not drawn at all: each point draws from the seed again."""
    active = [(source, coefficient) for source, coefficient in zip(sources, coefficients) if coefficient != 0]
    for source, _ in active:
        source.restart()
    for index, ((_, p), original, target_norms) in enumerate(zip(moving, originals, norms)):
        p.copy_(original)
        if target_norms is None:
            continue  # biases and norm parameters stay put (see the module)
        for source, coefficient in active:
            direction = source.of(index, original, target_norms)
            if direction is not None:
                p.add_(direction, alpha=coefficient)


def _mean_loss(model: torch.nn.Module, batches: list[Any], loss_fn: LossFn | None) -> float:
    total = torch.stack([batch_loss(model, batch, loss_fn).float() for batch in batches]).mean()
    return float(total)


def _updates_by_param(model: torch.nn.Module, moving: list[tuple[str, torch.Tensor]],
                      last_update: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The update aligned with the moving parameters (None where it has none)."""
    if isinstance(last_update, Mapping):
        by_name = dict(last_update)
    else:
        names = [name for name, _ in model.named_parameters()]
        if len(last_update) != len(names):
            raise ValueError(f"last_update has {len(last_update)} tensors, the model {len(names)} parameters: give "
                             "one per model.parameters(), in order, or a dict by parameter name")
        by_name = dict(zip(names, last_update))
    aligned = []
    for name, p in moving:
        update = by_name.get(name)
        if update is not None and update.shape != p.shape:
            raise ValueError(f"last_update[{name!r}] has shape {tuple(update.shape)}, the parameter {tuple(p.shape)}")
        aligned.append(update)
    return aligned


def _curvature(axis: list[float], line: list[float], radius: float) -> float:
    """The second derivative of a quadratic fitted (least squares) to the points within
    radius/2 of the centre (at least the 3 middle ones)."""
    middle = len(axis) // 2
    reach = max(1, sum(1 for x in axis[middle + 1:] if x <= radius / 2 * (1 + 1e-9)))
    xs = torch.tensor(axis[middle - reach: middle + reach + 1], dtype=torch.float64)
    ys = torch.tensor(line[middle - reach: middle + reach + 1], dtype=torch.float64)
    if not bool(torch.isfinite(ys).all()):
        return math.nan
    design = torch.stack([torch.ones_like(xs), xs, xs * xs], dim=1)
    coefficients = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution.squeeze(1)
    return 2.0 * float(coefficients[2])


def _rise(axis: list[float], line: list[float], distance: float, centre: float) -> float:
    """The mean of the loss at -distance and +distance (linear between grid points) minus
    the centre's."""

    def at(x: float) -> float:
        for i in range(len(axis) - 1):
            if axis[i] <= x <= axis[i + 1]:
                weight = (x - axis[i]) / (axis[i + 1] - axis[i])
                return line[i] + weight * (line[i + 1] - line[i])
        return math.nan

    return (at(-distance) + at(distance)) / 2 - centre
