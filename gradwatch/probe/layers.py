"""Which tensors the probe watches and how they fold into named layers.

Layer names come from ``named_parameters()`` with wrapper prefixes removed (DDP's
``module.``, torch.compile's ``_orig_mod.``, FSDP's ``_fsdp_wrapped_module.``), so a run
reports the same names however the model is wrapped. ``layers=`` bounds cardinality:

- ``"param"``: one layer per parameter tensor (``blocks.0.attn.c_attn.weight``);
- ``"module"``: one layer per owning module (``blocks.0.attn.c_attn``);
- an int ``d``: one layer per name prefix of depth ``d`` (``2`` -> ``blocks.0``);
- a compiled regex: the first group (or the whole match) of each name, unmatched names as themselves.

Frozen parameters (``requires_grad=False``) are named too but not measured; since
fine-tunes freeze and unfreeze during training, the run re-reads the flags on detail steps.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch

LayerSpec = str | int | re.Pattern[str]

# Path components that wrappers insert; DDP's `module` only counts as the first component.
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/\[\]<>-]")
_requires_grad = attrgetter("requires_grad")  # the fastest host-side read of the flag


def clean_name(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return _NAME_UNSAFE.sub("_", ".".join(parts))[:200] or "param"


def layer_of(name: str, spec: LayerSpec) -> str:
    if spec == "param":
        return name
    if spec == "module":
        return name.rpartition(".")[0] or name
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        return ".".join(name.split(".")[:spec])
    if isinstance(spec, re.Pattern):
        match = spec.search(name)
        if match is None:
            return name
        return (match.group(1) if spec.groups else match.group(0)) or name
    raise ValueError(
        f"layers={spec!r} is not understood: use 'param', 'module', a prefix depth >= 1, "
        "or a compiled regex (re.compile(r'^(blocks\\.\\d+)'))"
    )


@dataclass
class TensorGroup:
    """Measured tensors that share a device and dtype, so one foreach kernel covers them.

    ``layer_ids[i]`` is the layer of ``params[i]``.
    """

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    layer_ids: list[int]


class LayerMap:
    """The parameters of a model mapped to layers, and the trainable ones grouped by
    device/dtype for measuring.

    Every parameter's layer is named, frozen ones included, so that a layer unfrozen after
    attach has a slot. Which tensors are measured follows ``requires_grad``: `refresh`
    re-reads it (host-side attributes only) and regroups when it changed. A layer is frozen
    when none of its parameters requires a gradient."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: LayerSpec = "param",
        contributes: Callable[[torch.Tensor], bool] = lambda p: True,
    ) -> None:
        """`contributes(p)` False keeps p's layer in the names but leaves p out of the
        measured tensors (a replicated tensor on a non-zero rank of a sharded run)."""
        seen: set[int] = set()
        names: list[str] = []
        layer_pos: dict[str, int] = {}
        self.param_names: list[str] = []
        self._tensors: list[torch.Tensor] = []  # every distinct parameter, frozen or not
        self._layer_of: list[int] = []  # aligned with _tensors
        self._measurable: list[bool] = []  # aligned with _tensors: contributes(p)
        for raw_name, param in model.named_parameters():
            if id(param) in seen:  # shared (tied) weights count once
                continue
            seen.add(id(param))
            name = clean_name(raw_name)
            layer = layer_of(name, spec)
            if layer not in layer_pos:
                layer_pos[layer] = len(names)
                names.append(layer)
            self.param_names.append(name)
            self._tensors.append(param)
            self._layer_of.append(layer_pos[layer])
            self._measurable.append(contributes(param))
        self.names = names
        self._trainable: tuple[bool, ...] | None = None
        self.groups: list[TensorGroup] = []
        self.params: list[torch.Tensor] = []  # the measured tensors, group after group
        self.frozen: tuple[int, ...] = ()  # ids of the layers without a trainable parameter
        self.refresh()

    def refresh(self) -> bool:
        """Re-reads ``requires_grad`` of every parameter (a Python attribute: no device
        access) and, when it changed since the last call, regroups the measured tensors
        and recomputes `frozen`. Returns whether it changed."""
        trainable = tuple(map(_requires_grad, self._tensors))
        if trainable == self._trainable:
            return False
        self._trainable = trainable
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, int]]] = defaultdict(list)
        for param, layer, measurable, trains in zip(self._tensors, self._layer_of, self._measurable, trainable):
            if measurable and trains:
                by_key[(param.device, param.dtype)].append((param, layer))
        self.groups = [
            TensorGroup(
                device=device,
                dtype=dtype,
                params=[p for p, _ in members],
                layer_ids=[i for _, i in members],
            )
            for (device, dtype), members in by_key.items()
        ]
        self.params = [p for g in self.groups for p in g.params]
        live = {layer for layer, trains in zip(self._layer_of, trainable) if trains}
        self.frozen = tuple(i for i in range(len(self.names)) if i not in live)
        return True

    def __len__(self) -> int:
        return len(self.names)

