"""The loss-landscape slice: centred on the current weights, exact restore (also on error),
filter-normalised directions, a curvature that matches a quadratic worked by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import protocol
from gradwatch.probe.landscape import filter_normalize_, landscape
from tests.diagnostic_models import (
    TinyGPT,
    assert_identical,
    cnn_bn,
    image_batches,
    mlp,
    state_of,
    teacher_batches,
    token_batches,
)
from tests.probe_helpers import read_spool


def trained(model: nn.Module, batches: list[Any], loss_fn: Any, steps: int = 30) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(steps):
        batch = batches[i % len(batches)]
        optimizer.zero_grad()
        (loss_fn(model(batch[0]), batch[1]) if loss_fn else model(*batch)).backward()
        optimizer.step()
    return model


CASES = {
    "mlp": lambda: (trained(mlp(dropout=0.1), teacher_batches(8), F.mse_loss), teacher_batches(2, seed=5), F.mse_loss),
    "cnn-batchnorm": lambda: (trained(cnn_bn(), image_batches(4), F.cross_entropy), image_batches(2, seed=5),
                              F.cross_entropy),
    "gpt": lambda: (trained(TinyGPT(), token_batches(4), None), token_batches(2, seed=5), None),
}


def loss_now(model: nn.Module, batches: list[Any], loss_fn: Any) -> float:
    """The loss at the current weights, evaluated by hand the same way (eval mode, no grad)."""
    training = model.training
    model.eval()
    with torch.no_grad():
        losses = [(loss_fn(model(b[0]), b[1]) if loss_fn else model(*b)).float() for b in batches]
    model.train(training)
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_the_slice_is_centred_and_restores_everything(case: str, directions: int) -> None:
    model, batches, loss_fn = CASES[case]()
    model.train()
    before = state_of(model)
    centre = loss_now(model, batches, loss_fn)

    result = landscape(model, batches, loss_fn, directions=directions, points=7, radius=0.5)

    assert_identical(before, state_of(model))
    assert result.centre == centre
    assert result.losses[len(result.betas) // 2][3] == centre
    assert len(result.losses) == (7 if directions == 2 else 1) and all(len(row) == 7 for row in result.losses)
    assert result.forwards == len(batches) * 7 ** directions
    # A trained model sits in a valley: moving away along a random direction costs loss.
    assert all(rise > 0 for rise in result.rise_at_half_radius)
    assert len(result.curvature) == directions and all(c > 0 for c in result.curvature)


class FailsAfter(nn.Module):
    def __init__(self, inner: nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.calls_left = inner, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls_left -= 1
        if self.calls_left < 0:
            raise RuntimeError("injected failure")
        return self.inner(x)


def test_weights_and_modes_are_restored_when_an_evaluation_raises() -> None:
    model = FailsAfter(trained(mlp(dropout=0.1), teacher_batches(8), F.mse_loss), calls=9)
    model.train()
    model.inner[2].eval()
    before = state_of(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        landscape(model, teacher_batches(2), F.mse_loss, directions=2, points=5)
    assert_identical(before, state_of(model))


class Quadratic(nn.Module):
    """Linear regression: L(W + a D) = L(W) + a <g, D> + a^2 mean ||D x||^2, so the
    curvature along D is 2 mean ||D x||^2 exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_curvature_and_rise_match_a_quadratic_worked_by_hand() -> None:
    model = Quadratic().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)

    def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((prediction - target) ** 2).sum(dim=1).mean()

    result = landscape(model, [(x, y)], mse, directions=1, points=21, radius=2.0, seed=0)

    # The first direction is the seed's first draw, filter-normalised.
    raw = torch.randn((3, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    direction = filter_normalize_(raw, model.linear.weight).double()
    quadratic = float(((x @ direction.T) ** 2).sum(dim=1).mean())
    assert result.curvature[0] == pytest.approx(2 * quadratic, rel=1e-6)
    assert result.rise_at_half_radius[0] == pytest.approx(quadratic * 1.0**2, rel=1e-6)  # at +-radius/2 = +-1


def test_directions_are_normalised_per_filter() -> None:
    conv = torch.randn(8, 3, 3, 3)
    raw = torch.randn(8, 3, 3, 3)
    direction = filter_normalize_(raw, conv)
    assert direction is raw  # in place: one buffer
    assert torch.allclose(direction.flatten(1).norm(dim=1), conv.flatten(1).norm(dim=1))
    linear = torch.randn(5, 4)
    raw = torch.randn(5, 4)
    raw[2] = 0
    normalised = filter_normalize_(raw, linear)
    assert torch.allclose(normalised.norm(dim=1)[[0, 1, 3, 4]], linear.norm(dim=1)[[0, 1, 3, 4]])
    assert torch.equal(normalised[2], torch.zeros(4))  # a row the direction does not move stays put


def test_biases_and_one_dimensional_parameters_do_not_move() -> None:
    model = nn.Sequential(nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.zero_()
    batches = [(torch.zeros(4, 16), torch.zeros(4, 1))]  # zero inputs: only the bias could change the loss
    result = landscape(model, batches, F.mse_loss, directions=2, points=5)
    assert {v for row in result.losses for v in row} == {result.centre}


def test_the_last_update_is_the_first_direction() -> None:
    model = trained(mlp(), teacher_batches(8), F.mse_loss)
    before = [p.detach().clone() for p in model.parameters()]
    trained(model, teacher_batches(8, seed=3), F.mse_loss, steps=1)
    update = {name: p.detach() - b for (name, p), b in zip(model.named_parameters(), before)}
    by_name = landscape(model, teacher_batches(2), F.mse_loss, directions=2, points=5, last_update=update)
    in_order = landscape(model, teacher_batches(2), F.mse_loss, directions=2, points=5,
                         last_update=list(update.values()))
    random = landscape(model, teacher_batches(2), F.mse_loss, directions=2, points=5)
    assert by_name.directions == ("last_update", "random") and random.directions == ("random", "random")
    assert by_name.losses == in_order.losses
    assert by_name.line(0) != random.line(0) and by_name.line(1) == random.line(1)
    with pytest.raises(ValueError, match="shape"):
        landscape(model, teacher_batches(2), F.mse_loss, last_update={"0.weight": torch.zeros(3)})


def test_a_seed_fixes_the_directions() -> None:
    model = trained(mlp(), teacher_batches(8), F.mse_loss)
    first, again, other = (landscape(model, teacher_batches(2), F.mse_loss, directions=1, points=5, seed=seed)
                           for seed in (0, 0, 1))
    assert first.losses == again.losses and first.losses != other.losses


def test_the_summary_reads_and_logs() -> None:
    model = trained(mlp(), teacher_batches(8), F.mse_loss)
    result = landscape(model, teacher_batches(2), F.mse_loss, directions=2, points=5)
    assert "5x5 points" in str(result) and "curvature" in str(result)
    assert set(result.scalars()) == {"landscape_centre", "landscape_curvature_0", "landscape_rise_0",
                                     "landscape_curvature_1", "landscape_rise_1"}
    assert result.line(1)[2] == result.centre


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"directions": 3}, "1 \\(a line\\) or 2"), ({"points": 6}, "odd"), ({"radius": 0.0}, "positive")],
)
def test_bad_arguments_say_what_to_do(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        landscape(mlp(), teacher_batches(1), F.mse_loss, **kwargs)


@pytest.mark.parametrize("directions", [1, 2])
def test_plot_draws_a_line_or_a_contour(directions: int, tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    model = trained(mlp(), teacher_batches(8), F.mse_loss)
    ax = landscape(model, teacher_batches(2), F.mse_loss, directions=directions, points=5).plot()
    assert ax.get_xlabel() == "random direction"
    ax.figure.savefig(tmp_path / "landscape.png")


@pytest.mark.parametrize("directions", [1, 2])
def test_run_landscape_sends_its_grid(directions: int, tmp_path: Path) -> None:
    model = trained(mlp(), teacher_batches(8), F.mse_loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    spool = tmp_path / "s.jsonl"
    run = gradwatch.attach(model, optimizer, name="grid", url=f"file:{spool}")
    batch = teacher_batches(1)[0]
    optimizer.zero_grad()
    F.mse_loss(model(batch[0]), batch[1]).backward()
    optimizer.step()
    result = run.landscape(teacher_batches(2), F.mse_loss, directions=directions, points=5)
    run.detach()
    _, _, others = read_spool(spool)
    grid = next(m for m in others if isinstance(m, protocol.Landscape))
    assert (grid.step, grid.alphas, grid.centre) == (1, result.alphas, result.centre)
    assert grid.directions == ["random"] * directions and grid.losses == result.losses
    assert grid.betas == (result.betas if directions == 2 else [])


def test_a_grid_too_large_for_the_protocol_is_not_sent() -> None:
    model = mlp()
    big = landscape(model, teacher_batches(1), F.mse_loss, directions=1, points=protocol.MAX_LANDSCAPE_AXIS + 2)
    small = landscape(model, teacher_batches(1), F.mse_loss, directions=1, points=5)
    assert big.message(0) is None and small.message(0) is not None
