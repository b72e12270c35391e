"""What to try first, per alert kind: a one-line title and a hint every fired alert carries.

Hints list likely causes and first fixes in the order a practitioner would check them;
they are printed in terminals (`gradwatch alerts`, the demo, the collector's log), so they
stay plain text of one to three imperative sentences. The full runbook of each kind (what
it means, the evidence the alert carries, causes, fixes) is a section of docs/detectors.md
that `runbook_url` points at.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gradwatch.protocol import ALERT_KINDS

# No project URL is declared in pyproject.toml; this is where the docs are published.
REPOSITORY_URL = "https://github.com/gradwatch/gradwatch"
DETECTORS_DOC_URL = f"{REPOSITORY_URL}/blob/main/docs/detectors.md"
# docs/detectors.md titles each runbook section "Runbook: `<kind>`"; GitHub's anchor for
# that heading is this prefix followed by the kind (backticks and colon dropped).
ANCHOR_PREFIX = "runbook-"


@dataclass(frozen=True)
class Runbook:
    title: str  # also the Prometheus rule's summary: "Run <run>: <title> (<kind>)"
    hint: str


RUNBOOKS: Mapping[str, Runbook] = MappingProxyType({
    "nonfinite": Runbook(
        "non-finite gradients or loss",
        "Check the batch of the first bad step for inf/NaN inputs or labels, and guard log, sqrt and "
        "divisions with an eps. Then lower the LR and add clip_grad_norm_(params, 1.0); under fp16 AMP "
        "use a GradScaler (or bf16) and keep the loss in fp32.",
    ),
    "exploding_gradients": Runbook(
        "exploding gradients",
        "Lower the LR 3-10x or lengthen the warm-up, and add or tighten gradient clipping "
        "(clip_grad_norm_ 1.0). Then check the batch at the alert step for outliers or unnormalised "
        "inputs, and deep stacks for missing normalisation or a bad init.",
    ),
    "vanishing_gradients": Runbook(
        "vanishing gradients",
        "Replace saturating activations (sigmoid, tanh) with ReLU or GELU and use a matching init "
        "(kaiming_ for ReLU, xavier_ for tanh). Add normalisation (LayerNorm, BatchNorm) or residual "
        "connections to deep stacks.",
    ),
    "dead_layer": Runbook(
        "a layer gets no gradient",
        "Check that the layer's output reaches the loss: a branch the loss does not use, or a detach() "
        "or torch.no_grad() where it should not be. If it does, its ReLUs are dead: lower the LR, use "
        "LeakyReLU or GELU, check the init; a layer unused on purpose: requires_grad_(False).",
    ),
    "loss_spike": Runbook(
        "loss spike",
        "Inspect the batch at the alert step (corrupt or mislabelled samples, a data shard boundary). "
        "If spikes recur, lower the LR, lengthen the warm-up and add gradient clipping "
        "(clip_grad_norm_ 1.0); for large models try Adam beta2 = 0.95.",
    ),
    "plateau": Runbook(
        "loss plateau",
        "Lower the LR 2-10x (a decay schedule or the reduce_lr action does it); if the loss was flat "
        "from the start, the LR may be too low instead. Then check the clipping threshold, the weight "
        "decay and whether the model is too small for the task.",
    ),
    "overfitting": Runbook(
        "overfitting",
        "Keep the checkpoint with the best val_loss and stop early. Then add regularisation (weight "
        "decay, dropout, data augmentation), get more data or use a smaller model.",
    ),
    "amp_scale_collapse": Runbook(
        "AMP loss scale collapsed",
        "Find the op that overflows fp16 in the forward pass (attention logits, exp, softmax, a large "
        "loss) and run it in fp32 (autocast(enabled=False)), or train in bf16. Then lower the LR and "
        "clip after scaler.unscale_(optimizer).",
    ),
    "update_ratio": Runbook(
        "update-to-weight ratio out of band",
        "Above the band: lower the LR of that layer's param group (check for an LR typo), or add "
        "warm-up and clipping. Below it while the layer has a gradient: its group's LR is tiny or 0, "
        "or it is missing from the optimizer; check the per-group LRs and weight decay.",
    ),
    "divergence": Runbook(
        "training diverging",
        "Lower the LR 10x and add or tighten gradient clipping (clip_grad_norm_ 1.0); lengthen the "
        "warm-up. Then check the data for inf/NaN or unnormalised inputs.",
    ),
    "not_learning": Runbook(
        "not learning",
        "Check the LR and its schedule (a warm-up stuck at 0, an LR far too small) and the clipping "
        "threshold (max_norm far too small). Then check that labels match inputs and that weight "
        "decay does not overwhelm the gradient.",
    ),
    "not_updated": Runbook(
        "a layer is never updated",
        "Add the layer to the optimizer: it is missing from its param groups (created or replaced "
        "after the optimizer was built, or filtered out), or its group's LR is 0. If it should stay "
        "fixed, freeze it with requires_grad_(False).",
    ),
    "accumulating_gradients": Runbook(
        "gradients accumulating across steps",
        "Call optimizer.zero_grad() every step, after optimizer.step(), or once per accumulation "
        "cycle when you accumulate on purpose: without it every backward adds to .grad.",
    ),
    "run_lost": Runbook(
        "the run stopped reporting",
        "Check the training job first: crashed (OOM, a killed pod, a preempted node) or hung (data "
        "loading, a collective)? Its logs and exit code tell. If it still trains, check its path to "
        "the collector (GRADWATCH_URL, firewall, token).",
    ),
    "rank_lost": Runbook(
        "a rank went silent",
        "Check that rank's process and host (OOM, a crashed worker, a preempted node): the other "
        "ranks hang at the next collective until its timeout. If it still trains, check its path to "
        "the collector (GRADWATCH_URL, firewall, token).",
    ),
})


def runbook(kind: str) -> Runbook:
    """The kind's title and hint; a ValueError naming the known kinds for any other."""
    try:
        return RUNBOOKS[kind]
    except KeyError:
        raise ValueError(f"unknown alert kind {kind!r}; known kinds: {', '.join(ALERT_KINDS)}") from None


def hint(kind: str) -> str:
    """What to try first for an alert of this kind."""
    return runbook(kind).hint


def runbook_url(kind: str) -> str:
    """The kind's runbook section in docs/detectors.md."""
    runbook(kind)  # an unknown kind has no section: say so rather than return a dead link
    return f"{DETECTORS_DOC_URL}#{ANCHOR_PREFIX}{kind}"
