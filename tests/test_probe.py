"""The probe on real CPU training loops, every reported number against an independent
reference computed with torch.linalg.vector_norm per tensor."""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.probe.layers import LayerMap, clean_name, layer_of
from gradwatch.probe.measure import Measurer
from tests.probe_helpers import (
    TinyNet,
    assert_close,
    batches,
    read_spool,
    ref_layer_sq,
    train,
)


def attach(model, optimizer, spool: Path, **kw):
    return gradwatch.attach(model, optimizer, url=f"file:{spool}", name="test-run", **kw)


def test_plain_loop_every_norm_matches_reference(spool: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    run = attach(model, opt, spool, every=2)
    expected = []
    for x, y in batches(6):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = ref_layer_sq({n: p.grad for n, p in model.named_parameters()})
        opt.step()
        run.log(loss=loss, accuracy=0.5)
        weights = ref_layer_sq(dict(model.named_parameters()))
        updates = ref_layer_sq({n: p - before[n] for n, p in model.named_parameters()})
        expected.append((float(loss.detach()), grads, weights, updates))
    run.detach()

    hello, records, others = read_spool(spool)
    assert hello.layers == [n for n, _ in model.named_parameters()]
    assert [r.step for r in records] == [1, 2, 3, 4, 5, 6]
    assert others[-1].type == "bye" and others[-1].dropped == 0
    for i, (record, (_, grads, weights, updates)) in enumerate(zip(records, expected)):
        assert_close(record.grad_norm_sq, sum(grads.values()))
        assert record.lr == [0.05] and record.momentum == [0.9] and record.weight_decay == [1e-4]
        assert record.nonfinite_layers == 0 and not record.skipped
        if i % 2 == 0:  # per-layer detail every 2 steps
            for got, want in zip(record.layer_grad_sq, grads.values()):
                assert_close(got, want)
            for got, want in zip(record.layer_weight_sq, weights.values()):
                assert_close(got, want)
            for got, want in zip(record.layer_update_sq, updates.values()):
                assert_close(got, want, rel=1e-3)
        else:
            assert record.layer_grad_sq is None and record.layer_weight_sq is None
    # run.log(...) after step i, before step i+1 begins, belongs to step i: every record,
    # the last one included (detach sends what was waiting)
    for record, (loss, *_) in zip(records, expected):
        assert_close(record.loss, loss)
        assert record.scalars == {"accuracy": 0.5}


def test_loss_captured_from_forward_and_loss_fn(spool: Path) -> None:
    model = TinyNet()
    loss_fn = torch.nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = attach(model, opt, spool, loss_fn=loss_fn)
    losses = []
    for x, y in batches(3):
        loss = loss_fn(model(x), y)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # evaluation forwards are not training loss
        loss_fn(model(batches(1)[0][0]), batches(1)[0][1])
    run.detach()
    _, records, _ = read_spool(spool)
    for record, loss in zip(records, losses):
        assert_close(record.loss, loss)
    assert records[0].momentum == [0.9]  # Adam's beta1


def test_clipping_reports_the_preclip_norm(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = attach(model, opt, spool, every=1)
    totals, post = [], []
    for x, y in batches(3):
        opt.zero_grad()
        (100 * torch.nn.functional.mse_loss(model(x), y)).backward()
        totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)))
        post.append(sum(ref_layer_sq({n: p.grad for n, p in model.named_parameters()}).values()))
        opt.step()
    run.detach()
    _, records, _ = read_spool(spool)
    for record, total, post_sq in zip(records, totals, post):
        assert_close(record.grad_norm_preclip, total)
        assert_close(record.grad_norm_sq, post_sq)  # what the optimizer saw: clipped
        assert total > 0.5 and math.sqrt(record.grad_norm_sq) <= 0.5 + 1e-4


def test_gradient_accumulation_gives_one_record_per_optimizer_step(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = attach(model, opt, spool, loss_fn=None)
    data = batches(8)
    micro_losses, grads = [], []
    for step in range(4):
        opt.zero_grad()
        for x, y in data[2 * step : 2 * step + 2]:
            loss = torch.nn.functional.mse_loss(model(x), y) / 2
            run.log(loss=loss)
            micro_losses.append(float(loss.detach()))
            loss.backward()
        grads.append(sum(ref_layer_sq({n: p.grad for n, p in model.named_parameters()}).values()))
        opt.step()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.step for r in records] == [1, 2, 3, 4]
    for i, record in enumerate(records):
        assert_close(record.grad_norm_sq, grads[i])
        assert_close(record.loss, (micro_losses[2 * i] + micro_losses[2 * i + 1]) / 2)


def test_grad_scaler_counts_skipped_steps_and_reports_unscaled_norms(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    run = attach(model, opt, spool, scaler=scaler, every=1)
    unscaled, scales = [], []
    for i, (x, y) in enumerate(batches(5)):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if i == 2:
            loss = loss * float("inf")  # forced overflow: GradScaler skips this step
        scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        unscaled.append(sum(ref_layer_sq({n: p.grad for n, p in model.named_parameters()}).values()))
        scaler.step(opt)
        scaler.update()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.step for r in records] == [1, 2, 3, 4, 5]
    assert [r.skipped for r in records] == [False, False, True, False, False]
    assert records[2].nonfinite_layers > 0
    for i in (0, 1, 3, 4):
        assert_close(records[i].grad_norm_sq, unscaled[i])
    assert [r.loss_scale for r in records] == scales
    assert scales[3] == scales[2] / 2  # the scaler backed off after the overflow


@pytest.mark.parametrize("first", [0, 1], ids=["inner-first", "outer-first"])
def test_two_runs_on_one_grad_scaler_detach_in_any_order(tmp_path: Path, first: int) -> None:
    """Two models, two optimizers, one GradScaler (a GAN): detaching the first run leaves
    the second one's skipped-step detection in place, and the last detach restores the
    scaler's own update."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    models = [TinyNet(), TinyNet()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    runs = [gradwatch.attach(m, o, url=f"file:{tmp_path / f'{i}.jsonl'}", name=f"gan-{i}", scaler=scaler, every=1)
            for i, (m, o) in enumerate(zip(models, opts))]
    for i, (x, y) in enumerate(batches(4)):
        if i == 2:
            runs[first].detach()
        for model, opt in zip(models, opts):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y) * (float("inf") if i == 3 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
        scaler.update()
    runs[1 - first].detach()
    assert "update" not in vars(scaler)
    _, records, _ = read_spool(tmp_path / f"{1 - first}.jsonl")
    assert [r.skipped for r in records] == [False, False, False, True]


def test_fused_optimizer_under_grad_scaler_reports_unscaled_norms(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    run = attach(model, opt, spool, scaler=scaler)
    expected = []
    for x, y in batches(3):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        # fused Adam unscales inside its kernel: the grads here are still scaled
        expected.append(sum(ref_layer_sq({n: p.grad for n, p in model.named_parameters()}).values()) / 256.0**2)
        scaler.step(opt)
        scaler.update()
    run.detach()
    _, records, _ = read_spool(spool)
    for record, want in zip(records, expected):
        assert_close(record.grad_norm_sq, want)
        assert not record.skipped


def test_without_optimizer_every_backward_is_reported(spool: Path) -> None:
    model = TinyNet()
    run = attach(model, None, spool, every=1)
    expected = []
    for x, y in batches(3):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected.append(ref_layer_sq({n: p.grad for n, p in model.named_parameters()}))
        with torch.no_grad():  # updated by hand, as in pytorch/examples word_language_model
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.1)
    run.detach()
    hello, records, _ = read_spool(spool)
    assert hello.param_groups == 0
    assert len(records) == 3
    for record, grads in zip(records, expected):
        for got, want in zip(record.layer_grad_sq, grads.values()):
            assert_close(got, want)
        assert record.lr == []


def test_lbfgs_with_closure_gives_one_record_per_step(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    run = attach(model, opt, spool)
    x, y = batches(1)[0]
    final_grads = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        final_grads.append(sum(ref_layer_sq({n: p.grad for n, p in model.named_parameters()}).values()))
    run.detach()
    _, records, _ = read_spool(spool)
    assert len(records) == 3
    for record, want in zip(records, final_grads):
        assert_close(record.grad_norm_sq, want)


def test_two_param_groups_report_their_own_learning_rates(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(
        [{"params": model.inp.parameters(), "lr": 0.1}, {"params": list(model.hidden.parameters()) + list(model.out.parameters())}],
        lr=0.01,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run = attach(model, opt, spool)
    for x, y in batches(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    run.detach()
    _, records, _ = read_spool(spool)
    assert records[0].lr == [0.1, 0.01]
    assert records[1].lr == [0.05, 0.005]


def test_frozen_layers_are_named_but_not_measured_and_missing_grads_reported(spool: Path) -> None:
    model = TinyNet()
    model.inp.requires_grad_(False)
    extra = torch.nn.Linear(3, 3)  # trainable but never used: its grad stays None
    model.unused = extra
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run = attach(model, opt, spool, every=1)
    for x, y in batches(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    run.detach()
    hello, records, _ = read_spool(spool)
    frozen = [i for i, name in enumerate(hello.layers) if name.startswith("inp.")]
    unused = [i for i, name in enumerate(hello.layers) if name.startswith("unused.")]
    assert frozen and unused
    for record in records:
        assert record.layer_frozen == frozen  # no gradient by design, not a dead layer
        for i in frozen:
            assert (record.layer_grad_sq[i], record.layer_weight_sq[i], record.layer_update_sq[i]) == (None,) * 3
        assert all(record.layer_grad_sq[i] is None for i in unused)  # trainable, got no gradient
        measured = [i for i in range(len(hello.layers)) if i not in frozen + unused]
        assert all(record.layer_grad_sq[i] is not None for i in measured)
        assert all(record.layer_weight_sq[i] is not None for i in unused)


@dataclass(frozen=True)
class Freezing:
    name: str
    every: int
    toggles: dict[int, tuple[str, bool]]  # before step i (0-based): module.requires_grad_(flag)
    at_attach: tuple[str, ...] = ()  # modules frozen before attach
    optimizer: bool = True


FREEZING = [
    Freezing("frozen after attach, before a plain step", 2, {3: ("hidden", False)}),
    Freezing("frozen at attach, unfrozen before a detail step", 2, {2: ("inp", True)}, ("inp",)),
    Freezing("frozen at attach, unfrozen before a plain step", 2, {3: ("inp", True)}, ("inp",)),
    Freezing("frozen and unfrozen again, detail every step", 1, {2: ("out", False), 5: ("out", True)}),
    Freezing("without an optimizer", 2, {2: ("inp", True), 5: ("hidden", False)}, ("inp",), optimizer=False),
]


@pytest.mark.parametrize("case", FREEZING, ids=[c.name for c in FREEZING])
def test_freezing_after_attach_is_noticed_on_the_next_detail_step(spool: Path, case: Freezing) -> None:
    """On a detail step the frozen layers are listed and not measured, the others are
    measured exactly; between detail steps the set of the last detail step holds."""
    model = TinyNet()
    for module in case.at_attach:
        getattr(model, module).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if case.optimizer else None
    run = attach(model, opt, spool, every=case.every)
    steps = []  # per step: the trainable parameter names and the reference squared grads
    for i, (x, y) in enumerate(batches(8)):
        if i in case.toggles:
            module, flag = case.toggles[i]
            getattr(model, module).requires_grad_(flag)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        steps.append(({n for n, p in model.named_parameters() if p.requires_grad},
                      ref_layer_sq({n: p.grad for n, p in model.named_parameters()})))
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-0.05)
    run.detach()
    hello, records, _ = read_spool(spool)
    assert hello.layers == [n for n, _ in model.named_parameters()]  # frozen ones named too
    assert len(records) == len(steps)
    measured: set[str] = set()
    for i, (record, (trainable, grads)) in enumerate(zip(records, steps)):
        if i % case.every == 0:
            measured = trainable
            assert [hello.layers[j] for j in record.layer_frozen] == [n for n in hello.layers if n not in trainable]
            for j, name in enumerate(hello.layers):
                if name in trainable:
                    assert_close(record.layer_grad_sq[j], grads[name])
                    assert record.layer_weight_sq[j] is not None
                else:
                    assert (record.layer_grad_sq[j], record.layer_weight_sq[j]) == (None, None)
                    assert record.layer_update_sq is None or record.layer_update_sq[j] is None
        else:
            assert record.layer_frozen is None and record.layer_grad_sq is None
        assert_close(record.grad_norm_sq, sum(grads[n] for n in measured if grads[n] is not None))


@pytest.mark.parametrize("every", [1, 3])
def test_freezing_and_unfreezing_never_change_the_math(every: int) -> None:
    torch.manual_seed(2)
    base = TinyNet()
    data = batches(12)
    toggles = {3: ("hidden", False), 5: ("inp", False), 8: ("hidden", True), 10: ("inp", True)}

    def trained(run_probe: bool) -> list[torch.Tensor]:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = gradwatch.attach(model, opt, url="ws://127.0.0.1:9", every=every) if run_probe else None

        def toggle(step: int) -> None:
            if step in toggles:
                module, flag = toggles[step]
                getattr(model, module).requires_grad_(flag)

        weights = train(model, opt, data, run, on_step=toggle)
        if run is not None:
            run.detach()
            assert run.step == len(data)
        return weights

    for a, b in zip(trained(False), trained(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", [True, False])
def test_requires_grad_is_reread_on_detail_steps_only(spool: Path, monkeypatch, optimizer: bool) -> None:
    """The re-read is a host-side pass over the flags once per detail step; the measured
    groups (and their device-side indices) are rebuilt only when the flags changed, never
    for a gradient that is missing on some steps."""
    reads, regroups = [], []
    refresh, regroup = LayerMap.refresh, Measurer._regroup
    monkeypatch.setattr(LayerMap, "refresh", lambda self: reads.append(1) or refresh(self))
    monkeypatch.setattr(Measurer, "_regroup", lambda self: regroups.append(1) or regroup(self))
    model = TinyNet()
    model.unused = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if optimizer else None
    run = attach(model, opt, spool, every=3)
    assert (len(reads), len(regroups)) == (1, 1)  # at attach
    counts = []
    for i, (x, y) in enumerate(batches(9)):
        if i == 4:
            model.hidden.requires_grad_(False)
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if i % 2:  # a gradient present on some steps only: no new index, no regroup
            loss = loss + model.unused(x[:, :3]).sum()
        loss.backward()
        if opt is not None:
            opt.step()
        counts.append((len(reads) - 1, len(regroups) - 1))
    run.detach()
    # detail steps are the 1st, 4th and 7th; the freeze before the 5th shows at the 7th
    assert counts == [(1, 0), (1, 0), (1, 0), (2, 0), (2, 0), (2, 0), (3, 1), (3, 1), (3, 1)]
    _, records, _ = read_spool(spool)
    assert records[6].layer_frozen == [2, 3]


def test_compiled_model_keeps_working_and_is_measured(spool: Path) -> None:
    model = TinyNet()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = attach(compiled, opt, spool, loss_fn=None)
    expected = []
    for x, y in batches(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(compiled(x), y).backward()
        expected.append(sum(ref_layer_sq({n: p.grad for n, p in model.named_parameters()}).values()))
        opt.step()
    run.detach()
    hello, records, _ = read_spool(spool)
    assert hello.layers == [n for n, _ in model.named_parameters()]  # no _orig_mod. prefix
    for record, want in zip(records, expected):
        assert_close(record.grad_norm_sq, want)


def test_nonfinite_gradients_are_counted_per_layer(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run = attach(model, opt, spool, every=1)
    x, y = batches(1)[0]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    model.hidden.weight.grad[0, 0] = float("nan")
    opt.step()
    run.detach()
    hello, records, _ = read_spool(spool)
    assert records[0].nonfinite_layers == 1
    assert math.isnan(records[0].layer_grad_sq[hello.layers.index("hidden.weight")])


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("param", ["inp.weight", "inp.bias", "hidden.weight", "hidden.bias", "out.weight", "out.bias"]),
        ("module", ["inp", "hidden", "out"]),
        (1, ["inp", "hidden", "out"]),
        (re.compile(r"^(inp|hidden)"), ["inp", "hidden", "out.weight", "out.bias"]),
    ],
)
def test_layers_option_bounds_cardinality_and_sums_squares(spool: Path, spec, names) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = attach(model, opt, spool, layers=spec)
    x, y = batches(1)[0]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    per_param = ref_layer_sq({n: p.grad for n, p in model.named_parameters()})
    opt.step()
    run.detach()
    hello, records, _ = read_spool(spool)
    assert hello.layers == names
    for name, got in zip(hello.layers, records[0].layer_grad_sq):
        want = sum(v for n, v in per_param.items() if layer_of(n, spec) == name)
        assert_close(got, want)


def test_layer_names_drop_wrapper_prefixes() -> None:
    assert clean_name("module._orig_mod.blocks.0.attn.weight") == "blocks.0.attn.weight"
    assert clean_name("encoder.module.weight") == "encoder.module.weight"
    with pytest.raises(ValueError, match="layers="):
        layer_of("a.b", "per-tensor")


@pytest.mark.parametrize("setting", ["no-collector", "disabled"])
def test_probe_never_changes_the_math(monkeypatch, setting: str) -> None:
    torch.manual_seed(1)
    base = TinyNet()
    data = batches(20)
    bare_model = copy.deepcopy(base)
    bare = train(bare_model, torch.optim.AdamW(bare_model.parameters(), lr=1e-2), data, clip=1.0)

    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if setting == "disabled":
        monkeypatch.setenv("GRADWATCH_DISABLE", "1")
    # nothing listens on port 9 (discard): the probe buffers and training goes on
    run = gradwatch.attach(model, opt, url="ws://127.0.0.1:9", every=1)
    probed = train(model, opt, data, run, clip=1.0)
    run.detach()
    if setting == "no-collector":
        assert run.step == 20
    for a, b in zip(bare, probed):
        assert torch.equal(a, b)


def test_context_manager_and_idempotent_detach(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(model, opt, spool) as run:
        x, y = batches(1)[0]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    run.detach()
    _, records, others = read_spool(spool)
    assert len(records) == 1 and [o.type for o in others] == ["bye"]
    # hooks are gone: further steps are not recorded and nothing breaks
    opt.step()
    assert run.step == 1


def _two_micro_batch_steps(model: torch.nn.Module, opt: torch.optim.Optimizer | None, other: torch.nn.Module,
                           scaler: torch.amp.GradScaler | None = None) -> list[float]:
    """A loop that computes its loss outside the model (as most scripts do), accumulates
    two micro-batches, and trains another model in between; returns each step's loss."""
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    totals = []
    for x, y in batches(4):
        other_opt.zero_grad()
        other(x).pow(2).mean().backward()  # not this run's loss
        other_opt.step()
        total = 0.0
        for xs, ys in ((x[:8], y[:8]), (x[8:], y[8:])):
            loss = torch.nn.functional.mse_loss(model(xs), ys) / 2
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.detach())
            if opt is None:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.05 * p.grad
                        p.grad = None
        if opt is not None:
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        totals.append(total)
    return totals


@pytest.mark.parametrize("mode", ["optimizer", "grad scaler", "no optimizer"])
def test_loss_computed_outside_the_model_is_read_from_backward(spool: Path, mode: str) -> None:
    """Scripts whose model returns predictions still report their loss: the sum of the
    losses backpropagated since the previous step, unscaled, and only those that reached
    this run's parameters."""
    torch.manual_seed(0)
    model, other = TinyNet(), TinyNet()
    opt = None if mode == "no optimizer" else torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if mode == "grad scaler" else None
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="outside", scaler=scaler)
    totals = _two_micro_batch_steps(model, opt, other, scaler)
    run.detach()
    _, records, _ = read_spool(spool)
    if mode == "no optimizer":  # one record per backward: each micro-batch's loss
        assert len(records) == 8
        for record, pair in zip(records[::2], totals):
            assert record.loss is not None and record.loss < pair
        assert_close(sum(r.loss for r in records), sum(totals))
    else:
        assert [r.step for r in records] == [1, 2, 3, 4]
        for record, total in zip(records, totals):
            assert_close(record.loss, total)


class _PartialLoss(torch.nn.Module):
    """Returns each micro-batch's share of the step's loss, as Hugging Face models do under
    accumulation (a sum over the micro-batch divided by the items of the whole step)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor, y: torch.Tensor, items: int) -> torch.Tensor:
        return (self.net(x) - y).pow(2).sum() / items


@pytest.mark.parametrize("through", ["the model", "a submodule"])
def test_loss_from_backward_is_the_sum_over_the_step(spool: Path, through: str) -> None:
    """`loss_from="backward"` (what the framework callbacks set): the step's loss is what was
    backpropagated in it, whether the probe sees the model's forward or not (Lightning calls
    `training_step`, so the step begins at its first backward)."""
    model = _PartialLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="partial", loss_from="backward")
    totals = []
    for x, y in batches(4):
        total = 0.0
        for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):  # uneven micro-batches
            share = model(xs, ys, len(x)) if through == "the model" else (model.net(xs) - ys).pow(2).sum() / len(x)
            share.backward()
            total += float(share.detach())
        opt.step()
        opt.zero_grad()
        totals.append(total)
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.step for r in records] == [1, 2, 3, 4]
    for record, total in zip(records, totals):
        assert_close(record.loss, total)


def test_a_logged_loss_wins_over_backward(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="logged")
    for x, y in batches(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        run.log(loss=7.0)
        loss.backward()
        opt.step()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.loss for r in records] == [7.0, 7.0, 7.0]


@pytest.mark.parametrize(
    "clear, kept",
    [
        ("zero_grad", False),  # set_to_none, the default
        ("zero_grad(set_to_none=False)", False),
        ("model.zero_grad", False),
        ("zero_grad before backward", False),
        ("nothing", True),  # gradients pile up across steps
    ],
)
def test_the_probe_sees_gradients_that_nothing_clears(spool: Path, clear: str, kept: bool) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="kept")
    for x, y in batches(4):
        if clear == "zero_grad before backward":
            opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # edits .grad in place, before the step
        opt.step()
        if clear == "zero_grad":
            opt.zero_grad()
        elif clear == "zero_grad(set_to_none=False)":
            opt.zero_grad(set_to_none=False)
        elif clear == "model.zero_grad":
            model.zero_grad()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.grads_kept for r in records] == [False] + [kept] * 3


def test_accumulation_cycles_that_clear_after_the_step_are_not_kept(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="cycles")
    data = batches(6)
    for step in range(3):
        for x, y in data[2 * step: 2 * step + 2]:
            (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        opt.step()
        opt.zero_grad()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.grads_kept for r in records] == [False, False, False]


@pytest.mark.parametrize(
    "cleared, updates_between, kept",
    [
        (True, True, False),  # the usual hand-written loop: update, then zero the gradients
        (False, True, True),  # updated by hand, gradients never cleared: they pile up
        (False, False, False),  # several backwards, no update in between: accumulation on purpose
    ],
)
def test_without_an_optimizer_kept_gradients_need_an_update_in_between(
    spool: Path, cleared: bool, updates_between: bool, kept: bool
) -> None:
    model = TinyNet()
    run = gradwatch.attach(model, url=f"file:{spool}", name="manual-kept")
    for x, y in batches(4):
        torch.nn.functional.mse_loss(model(x), y).backward()
        if updates_between:
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
        if cleared:
            model.zero_grad()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.grads_kept for r in records] == [False] + [kept] * 3


class _WrappedOptimizer(torch.optim.Optimizer):
    """Like Accelerate's AcceleratedOptimizer: subclasses Optimizer without initialising it
    (no hook registries), keeps the real one at `.optimizer` and steps it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, closure: Any = None) -> Any:
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def _three_steps(model: torch.nn.Module, opt: Any) -> None:
    for x, y in batches(3):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_attach_unwraps_an_optimizer_wrapper(spool: Path) -> None:
    model = TinyNet()
    opt = _WrappedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="wrapped")
    _three_steps(model, opt)
    run.detach()
    _, records, _ = read_spool(spool)
    assert [(r.step, r.lr) for r in records] == [(1, [0.05]), (2, [0.05]), (3, [0.05])]


def test_attach_takes_an_accelerate_prepared_optimizer(spool: Path) -> None:
    """`accelerator.prepare` wraps the optimizer in an AcceleratedOptimizer, which crashed
    `attach` (no `_optimizer_step_pre_hooks`): the probe hooks the optimizer inside."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = TinyNet()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="accelerate")
    for x, y in batches(3):
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.step for r in records] == [1, 2, 3]
    assert all(r.loss is not None and r.grad_norm_sq for r in records)


@pytest.mark.parametrize(
    "model, optimizer, says",
    [
        (TinyNet(), object(), "is not a torch.optim.Optimizer"),
        (TinyNet(), None, "every=0"),  # a bad option: said at once, training goes on
    ],
    ids=["an optimizer it cannot use", "a bad option"],
)
def test_attach_never_raises_into_training(
    caplog: pytest.LogCaptureFixture, spool: Path, model: torch.nn.Module, optimizer: Any, says: str
) -> None:
    options = {"every": 0} if says == "every=0" else {}
    with caplog.at_level("WARNING", logger="gradwatch.probe"):
        run = gradwatch.attach(model, optimizer, url=f"file:{spool}", name="refused", **options)
    assert isinstance(run, gradwatch.probe.DisabledRun)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "training continues without the probe" in warnings[0] and says in warnings[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _three_steps(model, opt)  # training is unaffected
    run.detach()


def test_a_model_without_parameters_does_not_break_attach(spool: Path) -> None:
    model = torch.nn.ReLU()
    run = gradwatch.attach(model, url=f"file:{spool}", name="empty")
    model(torch.randn(2, 2))
    run.detach()


def test_attaching_twice_returns_the_run_already_attached(caplog: pytest.LogCaptureFixture, spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = gradwatch.attach(model, opt, url=f"file:{spool}", name="once")
    with caplog.at_level("WARNING", logger="gradwatch.probe"):
        second = gradwatch.attach(model, opt, url=f"file:{spool}", name="twice")
    assert second is first
    assert any("already attached" in r.getMessage() for r in caplog.records)
    _three_steps(model, opt)
    first.detach()
    _, records, _ = read_spool(spool)
    assert [r.step for r in records] == [1, 2, 3]  # one record per step, not two
    third = gradwatch.attach(model, opt, url=f"file:{spool}.2", name="after-detach")
    assert third is not first
    third.detach()


def test_without_an_optimizer_the_preclip_norm_belongs_to_its_backward(spool: Path) -> None:
    """A hand-written loop clips after the backward whose record is sealed during it: the
    norm still lands on that record, not the next (word_language_model's loop)."""
    model = TinyNet()
    run = gradwatch.attach(model, url=f"file:{spool}", name="manual-clip")
    totals = []
    for x, y in batches(4):
        model.zero_grad()
        (100 * torch.nn.functional.mse_loss(model(x), y)).backward()
        totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
    run.detach()
    _, records, _ = read_spool(spool)
    assert len(records) == 4
    for record, total in zip(records, totals):
        assert_close(record.grad_norm_preclip, total)


def test_an_evaluation_logged_between_steps_belongs_to_the_step_before(spool: Path) -> None:
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = gradwatch.attach(model, opt, url=f"file:{spool}", name="eval")
    for step, (x, y) in enumerate(batches(4), start=1):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            model.eval()
            with torch.no_grad():
                model(x)  # an evaluation forward does not start a step
            run.log(val_loss=float(step))
            model.train()
    run.detach()
    _, records, _ = read_spool(spool)
    assert [r.scalars.get("val_loss") for r in records] == [None, 2.0, None, 4.0]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9108", "https://collector:9108", "tcp://127.0.0.1:8765"])
def test_a_collector_address_that_cannot_work_is_said_once_at_attach(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Not retried as an outage for the whole run: one warning with the fix, training goes on."""
    monkeypatch.setenv("GRADWATCH_URL", url)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level("WARNING", logger="gradwatch"):
        run = gradwatch.attach(model, opt, name="misaddressed")
        _three_steps(model, opt)
        run.detach()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ws://HOST:8765" in warnings[0]
    assert isinstance(run, gradwatch.probe.DisabledRun)


@pytest.mark.parametrize(
    "model, says",
    [(torch.nn.ReLU(), "has no parameters"), (object(), "is not a torch.nn.Module")],
    ids=["a model with no parameters", "not a module"],
)
def test_a_model_the_probe_cannot_measure_is_said_once(caplog: pytest.LogCaptureFixture, spool: Path,
                                                        model: Any, says: str) -> None:
    with caplog.at_level("WARNING", logger="gradwatch.probe"):
        run = gradwatch.attach(model, url=f"file:{spool}", name="unmeasurable")
    assert isinstance(run, gradwatch.probe.DisabledRun)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and says in warnings[0] and "the module that trains" in warnings[0]


def test_several_collectors_a_run_always_picks_the_same_one() -> None:
    """GRADWATCH_URL may list several collectors: every rank and restart of a run lands on the
    same one, runs spread over all of them, and adding a collector moves only ~1/N of the runs."""
    from gradwatch.probe.environment import pick_collector

    three = "ws://c0:8765, ws://c1:8765,ws://c2:8765"
    four = three + ",ws://c3:8765"
    runs = [f"job-{i}" for i in range(600)]
    picked = {run: pick_collector(three, run) for run in runs}
    assert all(pick_collector(three, run) == url for run, url in picked.items())  # rank 1, a restart
    assert pick_collector("ws://c2:8765,ws://c0:8765,ws://c1:8765", "job-7") == picked["job-7"]  # order-free
    counts = Counter(picked.values())
    assert set(counts) == {"ws://c0:8765", "ws://c1:8765", "ws://c2:8765"} and min(counts.values()) > 150
    moved = [run for run in runs if pick_collector(four, run) != picked[run]]
    assert all(pick_collector(four, run) == "ws://c3:8765" for run in moved)  # only to the new one
    assert 0.15 < len(moved) / len(runs) < 0.35
    assert pick_collector("127.0.0.1:8765", "x") == "ws://127.0.0.1:8765"
    with pytest.raises(ValueError, match="HTTP address"):
        pick_collector("ws://c0:8765,http://c1:9108", "x")
