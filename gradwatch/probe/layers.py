"""Which trainable tensors the probe watches and how they fold into named layers.

Layer names come from ``named_parameters()`` with wrapper prefixes removed (DDP's
``module.``, torch.compile's ``_orig_mod.``, FSDP's ``_fsdp_wrapped_module.``), so a run
reports the same names however the model is wrapped. ``layers=`` bounds cardinality:

- ``"param"``: one layer per parameter tensor (``blocks.0.attn.c_attn.weight``);
- ``"module"``: one layer per owning module (``blocks.0.attn.c_attn``);
- an int ``d``: one layer per name prefix of depth ``d`` (``2`` -> ``blocks.0``);
- a compiled regex: the first group (or the whole match) of each name, unmatched names as themselves.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

LayerSpec = str | int | re.Pattern[str]

# Path components that wrappers insert; DDP's `module` only counts as the first component.
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/\[\]<>-]")


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
    """Watched tensors that share a device and dtype, so one foreach kernel covers them.

    ``layer_ids[i]`` is the layer of ``params[i]``.
    """

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    layer_ids: list[int]


class LayerMap:
    """The trainable parameters of a model, grouped by device/dtype and mapped to layers."""

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
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, int]]] = defaultdict(list)
        self.param_names: list[str] = []
        for raw_name, param in model.named_parameters():
            if not param.requires_grad or id(param) in seen:  # frozen or shared (tied) weights
                continue
            seen.add(id(param))
            name = clean_name(raw_name)
            layer = layer_of(name, spec)
            if layer not in layer_pos:
                layer_pos[layer] = len(names)
                names.append(layer)
            self.param_names.append(name)
            if not contributes(param):
                continue
            by_key[(param.device, param.dtype)].append((param, layer_pos[layer]))
        self.names = names
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

    def __len__(self) -> int:
        return len(self.names)
