"""The LR range test (Smith 2017; fastai's and torch-lr-finder's "LR finder").

    result = gradwatch.lr_find(model, optimizer, batches, loss_fn)
    print(result)                       # the suggested LR and why
    for group, lr in zip(optimizer.param_groups, result.lr_for_groups()):
        group["lr"] = lr

`steps` optimizer steps while the LR grows geometrically from `start` to `end`; the loss is
smoothed with a bias-corrected exponential average (an uncorrected one starts near 0 and
makes the first steps look like progress), and the test stops once the smoothed loss
exceeds `diverge` x its minimum or a loss is not finite. The probe is attached for the
test as a run of its own, ``<name>-lr-find`` (tagged ``kind=lr-find``), so every step
streams to the collector. Afterwards the model, optimizer, GradScaler, RNG states and
train/eval modes are exactly as before (`TrainingState`), also when the loop raises.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gradwatch import protocol
from gradwatch.probe.batch_loss import LossFn, batch_loss, cycled
from gradwatch.probe.environment import default_run_name, unwrap_optimizer
from gradwatch.probe.run import Run
from gradwatch.probe.training_state import TrainingState

log = logging.getLogger("gradwatch.probe")

STOP_REASONS = {
    "end": "reached the end of the range",
    "diverged": "the smoothed loss exceeded {diverge:g} x its minimum",
    "nonfinite": "the loss was not finite",
    "data": "the batches ran out (a one-shot iterator; pass a list or a DataLoader to cycle)",
}
MIN_STABLE_POINTS = 5  # fewer points between warm-up and minimum than this: no slope to trust
# The first points' average rests on few losses: no slope is read there (torch-lr-finder
# skips 10 too).
WARM_UP_POINTS = 10
SLOPE_WINDOW_FRACTION = 20  # a slope spans +-1/20 of the points (5 of 100)
MIN_RELATIVE_FALL = 0.01  # a smoothed loss that never fell by 1% did not learn in the range


@dataclass(frozen=True)
class LRFindResult:
    """The range test's curve and verdict. `lrs[i]` is the LR of step i (of the param
    group with the largest LR; the others keep their ratio, `group_ratios`), `losses[i]`
    the loss of that step's batch (before its update), `smoothed[i]` their bias-corrected
    exponential average. The last point of a test that stopped early is the one that
    stopped it: its update was not applied."""

    suggested_lr: float | None  # None when the loss did not fall anywhere in the range
    reason: str
    steepest_lr: float | None  # the steepest descent of the smoothed loss before its minimum, if trusted
    min_loss_lr: float  # where the smoothed loss was lowest
    alternative_lr: float  # min_loss_lr / 10
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    steps_taken: int  # optimizer steps applied (and streamed to the collector)
    steps_planned: int
    stop_reason: str  # "end", "diverged", "nonfinite" or "data"
    stop_detail: str
    group_ratios: tuple[float, ...]
    run_name: str | None  # None when the probe was not attached

    def lr_for_groups(self, lr: float | None = None) -> list[float]:
        """One LR per param group for `lr` (default: the suggested one), keeping the
        groups' ratios: ``for g, lr in zip(opt.param_groups, result.lr_for_groups()): g["lr"] = lr``."""
        chosen = self.suggested_lr if lr is None else lr
        if chosen is None:
            raise ValueError(f"no suggested LR: {self.reason}")
        return [chosen * ratio for ratio in self.group_ratios]

    def __str__(self) -> str:
        run = f" (run {self.run_name!r})" if self.run_name else ""
        last = self.lrs[-1] if self.lrs else float("nan")
        lines = [
            (f"LR range test{run}: {self.steps_taken} of {self.steps_planned} steps, "
             f"lr {self.lrs[0]:.2e} -> {last:.2e}; stopped: {self.stop_detail}"),
            f"suggested lr: {_lr_text(self.suggested_lr)}  ({self.reason})",
            (f"alternative:  {self.alternative_lr:.2e}  (lr at the minimum of the smoothed loss, "
             f"{self.min_loss_lr:.2e}, / 10)"),
        ]
        return "\n".join(lines)

    def message(self) -> protocol.LRFind:
        """The curve and verdict for the collector; a test longer than the protocol carries
        sends every k-th point, and always its last (the one that stopped it)."""
        stride = math.ceil(len(self.lrs) / protocol.MAX_LR_FIND_POINTS)
        kept = sorted({*range(0, len(self.lrs), stride), len(self.lrs) - 1})[-protocol.MAX_LR_FIND_POINTS:]
        return protocol.LRFind(
            lrs=[self.lrs[i] for i in kept],
            losses=[self.losses[i] for i in kept],
            smoothed=[self.smoothed[i] for i in kept],
            suggested_lr=self.suggested_lr,
            alternative_lr=self.alternative_lr,
            min_loss_lr=self.min_loss_lr,
            reason=self.reason[:protocol.MAX_TEXT],
            stop_detail=self.stop_detail[:protocol.MAX_TEXT],
        )

    def plot(self, ax: Any = None) -> Any:
        """The smoothed (and raw) loss against the LR on a log axis, the suggestion marked.
        Needs matplotlib, which gradwatch does not depend on."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("LRFindResult.plot needs matplotlib: pip install matplotlib") from error
        if ax is None:
            _, ax = plt.subplots()
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        if self.suggested_lr is not None:
            ax.axvline(self.suggested_lr, color="red", linestyle="--", label=f"suggested {self.suggested_lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.legend()
        return ax


def lr_find(
    model: torch.nn.Module,
    optimizer: Any,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 100,
    *,
    scaler: Any = None,
    accumulation: int = 1,
    smoothing: float = 0.05,
    diverge: float = 4.0,
    **attach_options: Any,
) -> LRFindResult:
    """Run the LR range test on `model` with `optimizer` and restore both exactly.

    `batches`: an iterable, cycled when shorter than ``steps * accumulation``; with
    `loss_fn` each batch is ``(inputs, targets)`` and the loss ``loss_fn(model(inputs),
    targets)``, without it the model returns its loss for ``model(*batch)`` (tuple),
    ``model(**batch)`` (dict) or ``model(batch)`` (see `batch_loss`).

    The LR of step i is ``start * (end / start) ** (i / (steps - 1))``, set on every param
    group: the group with the largest LR follows it and the others keep their ratio to
    that group (discriminative LRs stay discriminative). Each optimizer step averages
    `accumulation` micro-batches (``loss / accumulation`` is backpropagated); with a
    `scaler` (GradScaler) the step is ``scaler.scale(...).backward()``, ``scaler.step``,
    ``scaler.update``. Mixed precision: call it inside your ``torch.autocast(...)`` block.
    The model trains in train mode (each module's own mode is put back afterwards).

    `smoothing` is the weight of the newest loss in the average; `diverge` the factor over
    the minimum that ends the test. `attach_options` go to the probe's run (``url=``,
    ``name=`` (``-lr-find`` is appended), ``every=``, ``tags=``, ...).

    The suggestion is the LR of the steepest descent of the smoothed loss over the stable
    part (up to its minimum), or the alternative, the LR at the minimum / 10, where that is
    lower (within a decade of the minimum the loss is about to turn). Memory: a copy of the
    parameters, buffers, gradients and optimizer state, in host memory.
    """
    _check(start, end, steps, accumulation, smoothing, diverge)
    ratios = _group_ratios(optimizer)
    schedule = [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]
    saved = TrainingState(model, optimizer, scaler)
    paused = _pause_runs(model, optimizer)
    run = _start_run(model, optimizer, scaler, attach_options)
    curve = _Curve(smoothing, diverge)
    status, bye_reason = "finished", ""
    try:
        if not model.training:
            model.train()
        stop = _range_test(model, optimizer, cycled(batches), loss_fn, scaler, accumulation, schedule, ratios,
                           curve, run)
        result = _result(curve, stop, steps, diverge, ratios, run)
        if run is not None:
            run.send_result(result.message())
        bye_reason = f"lr-find: {result.stop_detail}; suggested lr {_lr_text(result.suggested_lr)}"
    except BaseException as error:
        status, bye_reason = "crashed", f"{type(error).__name__}: {error}"
        raise
    finally:
        if run is not None:
            run.detach(status, bye_reason[:500])
        saved.restore()
        for paused_run in paused:
            paused_run.enabled = True
    return result


def _range_test(
    model: torch.nn.Module,
    optimizer: Any,
    data: Iterator[Any],
    loss_fn: LossFn | None,
    scaler: Any,
    accumulation: int,
    schedule: list[float],
    ratios: tuple[float, ...],
    curve: _Curve,
    run: Run | None,
) -> str:
    """The loop; returns why it stopped. A step's loss is checked before its update, so a
    non-finite or diverged loss never reaches the weights."""
    for lr in schedule:
        for group, ratio in zip(optimizer.param_groups, ratios):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr * ratio)
            else:
                group["lr"] = lr * ratio
        optimizer.zero_grad(set_to_none=True)
        micro_losses = []
        for _ in range(accumulation):
            batch = next(data, None)
            if batch is None:
                return "data"
            loss = batch_loss(model, batch, loss_fn)
            micro_losses.append(loss.detach())
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss = torch.stack(micro_losses).float().mean()
        stop = curve.add(lr, step_loss.item())
        if stop is not None:
            return stop
        if run is not None:
            run.log(loss=step_loss, smoothed_loss=curve.smoothed[-1])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        curve.steps_taken += 1
    return "end"


class _Curve:
    """The losses so far, their bias-corrected exponential average, and the stop rule."""

    def __init__(self, smoothing: float, diverge: float) -> None:
        self.smoothing = smoothing
        self.diverge = diverge
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.steps_taken = 0
        self._average = 0.0
        self._best = math.inf

    def add(self, lr: float, loss: float) -> str | None:
        """Record one step; says why to stop, if it should."""
        self.lrs.append(lr)
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            return "nonfinite"
        self._average += self.smoothing * (loss - self._average)
        # The average starts at 0: divide by the weight its terms carry so far (every
        # earlier loss was finite, or the test would have stopped).
        smoothed = self._average / (1.0 - (1.0 - self.smoothing) ** len(self.losses))
        self.smoothed.append(smoothed)
        self._best = min(self._best, smoothed)
        return "diverged" if smoothed > self.diverge * self._best else None


def _result(
    curve: _Curve, stop: str, steps: int, diverge: float, ratios: tuple[float, ...], run: Run | None
) -> LRFindResult:
    if not curve.lrs:
        raise ValueError("the batches ran out before the first step")
    stop_detail = STOP_REASONS[stop].format(diverge=diverge)
    stopped_by_loss = stop in ("diverged", "nonfinite")
    if stopped_by_loss:
        stop_detail += f" at step {len(curve.lrs) - 1} (lr {curve.lrs[-1]:.2e})"
    elif stop == "data":
        stop_detail += f" after {curve.steps_taken} steps"
    # The stable part: every point before the one that stopped the test.
    stable = curve.smoothed[: len(curve.lrs) - stopped_by_loss] or curve.smoothed[:1]
    suggested, steepest, at_min, reason = suggest(curve.lrs[: len(stable)], curve.losses[: len(stable)], stable)
    return LRFindResult(
        suggested_lr=suggested,
        reason=reason,
        steepest_lr=steepest,
        min_loss_lr=at_min,
        alternative_lr=at_min / 10,
        lrs=curve.lrs,
        losses=curve.losses,
        smoothed=curve.smoothed,
        steps_taken=curve.steps_taken,
        steps_planned=steps,
        stop_reason=stop,
        stop_detail=stop_detail,
        group_ratios=ratios,
        run_name=run.name if run is not None else None,
    )


def suggest(
    lrs: list[float], losses: list[float], smoothed: list[float]
) -> tuple[float | None, float | None, float, str]:
    """(suggested, steepest, lr at the minimum, why) for the stable part of a test on a
    geometric LR grid: the steepest descent per decade of LR between the average's warm-up
    and the minimum, or the LR at the minimum / 10 where that is lower or no slope can be
    trusted; none where the loss did not fall."""
    at = min(range(len(smoothed)), key=smoothed.__getitem__)
    at_min = lrs[at]
    # Where the loss started: the mean of the warm-up's losses (one loss is too noisy), and
    # how much the losses of different batches differ before anything is learned.
    start = [loss for loss in losses[:WARM_UP_POINTS] if math.isfinite(loss)]
    level = statistics.fmean(start) if start else math.nan  # nan: the first loss was not finite
    spread = statistics.stdev(start) if len(start) > 1 else 0.0
    fall = level - smoothed[at]
    if not fall > MIN_RELATIVE_FALL * abs(level):
        return None, None, at_min, (
            f"the smoothed loss never fell by {MIN_RELATIVE_FALL:.0%} from {level:.4g}: nothing learned in the "
            "range; check the model and data, or widen the range"
        )
    if at - WARM_UP_POINTS + 1 < MIN_STABLE_POINTS:
        return at_min / 10, None, at_min, (
            f"the loss was lowest at step {at}, too early for a slope: the LR at the minimum / 10; "
            "start lower or take more steps"
        )
    if fall < spread:
        return at_min / 10, None, at_min, (
            f"the loss fell by {fall:.3g}, less than the spread of the batches' losses ({spread:.3g}): no slope "
            "to trust, the LR at the minimum / 10"
        )
    # A slope over +-half points: from one point to the next, the noise of the batches
    # outweighs the descent.
    half = max(1, len(lrs) // SLOPE_WINDOW_FRACTION)
    decades = [math.log10(lr) for lr in lrs]

    def slope(i: int) -> float:
        left, right = max(i - half, WARM_UP_POINTS), min(i + half, at)
        return (smoothed[right] - smoothed[left]) / (decades[right] - decades[left])

    steepest_at = min(range(WARM_UP_POINTS, at), key=slope)
    steepest = lrs[steepest_at]
    descent = f"steepest descent of the smoothed loss, {slope(steepest_at):.3g} per decade of LR, at lr {steepest:.2e}"
    if steepest > at_min / 10:
        # Within a decade of the minimum the loss is about to turn; the average lags the
        # losses by about 1/smoothing steps, which moves both points to higher LRs.
        return at_min / 10, steepest, at_min, (
            f"the LR at the minimum of the smoothed loss ({smoothed[at]:.4g} at lr {at_min:.2e}) / 10, below the "
            f"{descent}, which is within a decade of the minimum: the lower of the two"
        )
    return steepest, steepest, at_min, f"{descent}, before its minimum {smoothed[at]:.4g} at lr {at_min:.2e}"


def _check(start: float, end: float, steps: int, accumulation: int, smoothing: float, diverge: float) -> None:
    if not 0 < start < end:
        raise ValueError(f"start={start}, end={end}: the range needs 0 < start < end")
    if steps < 2:
        raise ValueError(f"steps={steps}: a range test needs at least 2 steps (100 is usual)")
    if accumulation < 1:
        raise ValueError(f"accumulation={accumulation}: micro-batches per optimizer step, at least 1")
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing={smoothing}: the newest loss's weight in the average, in (0, 1]")
    if not diverge > 1:
        raise ValueError(f"diverge={diverge}: the test stops at diverge x the minimum loss, so it must exceed 1")


def _group_ratios(optimizer: Any) -> tuple[float, ...]:
    """Each param group's LR over the largest one (all 1.0 when every LR is 0)."""
    base = [float(group["lr"]) for group in optimizer.param_groups]
    largest = max(base)
    return tuple(lr / largest if largest > 0 else 1.0 for lr in base)


def _pause_runs(model: torch.nn.Module, optimizer: Any) -> list[Run]:
    """The user's live runs on this model or optimizer, paused so that the test's steps go
    to the test's run only."""
    inner = unwrap_optimizer(optimizer)[0]
    paused = [run for run in list(Run.live) if run.enabled and (run.model is model or run.optimizer is inner)]
    for run in paused:
        run.enabled = False
    return paused


def _start_run(model: torch.nn.Module, optimizer: Any, scaler: Any, options: dict[str, Any]) -> Run | None:
    """The test's own run (as `attach` would make it: never raising, off under
    GRADWATCH_DISABLE), built directly because `attach` returns a live run of this model."""
    if os.environ.get("GRADWATCH_DISABLE", "").lower() in ("1", "true", "yes"):
        return None
    options = dict(options)
    name = options.pop("name", None) or os.environ.get("GRADWATCH_RUN") or default_run_name()
    tags = {**(options.pop("tags", None) or {}), "kind": "lr-find"}
    try:
        return Run(model, optimizer, scaler=scaler, name=f"{name[:120]}-lr-find", tags=tags, **options)
    except Exception as error:  # the test still runs, unwatched, as training would with `attach`
        log.warning("gradwatch: the LR range test runs without the probe: %s", error,
                    exc_info=not isinstance(error, (TypeError, ValueError)))
        return None


def _lr_text(lr: float | None) -> str:
    return "none" if lr is None else f"{lr:.2e}"
