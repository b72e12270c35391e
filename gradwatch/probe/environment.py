"""Where a run lives: its name, its collector's address, its rank, the optimizer inside any
wrappers. Read once, at attach."""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Any

import torch


def checked_url(url: str) -> str:
    """The collector address, refused at once when it cannot work (retrying it as if the
    collector were down would only drop the whole run, step by step, to the same mistake)."""
    if url.startswith("file:"):
        return url
    if "://" not in url:
        return f"ws://{url}"  # host:port, as users type it
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("ws", "wss"):
        return url
    if scheme in ("http", "https"):
        raise ValueError(
            f"GRADWATCH_URL / url={url!r} is an HTTP address (the collector's --http-port, for /metrics "
            f"and queries); the probe streams to its websocket port: ws://HOST:8765 (--port), or file:PATH"
        )
    raise ValueError(f"url={url!r} is not a collector address: use ws://HOST:8765 (wss:// with TLS) or file:PATH")


def pick_collector(addresses: str, run_name: str) -> str:
    """The collector of this run among several (comma-separated addresses), by rendezvous
    hashing of the run name: every rank and every restart of a run picks the same one, and
    adding a collector moves only the runs it now wins, about 1/N of them. Each address is
    checked as `checked_url` does."""
    candidates = [checked_url(a.strip()) for a in addresses.split(",") if a.strip()]
    if not candidates:
        raise ValueError("GRADWATCH_URL / url is empty: give ws://HOST:8765 (several, comma-separated) or file:PATH")
    if len(candidates) == 1:
        return candidates[0]
    return max(candidates, key=lambda url: hashlib.blake2b(f"{url}\n{run_name}".encode(), digest_size=8).digest())


def unwrap_optimizer(optimizer: Any) -> tuple[Any, Any]:
    """The optimizer inside any wrappers, and the GradScaler of the outermost wrapper that has one.

    Wrappers (Accelerate's `AcceleratedOptimizer`, Lightning's and DeepSpeed's) keep the real
    optimizer at `.optimizer`; some subclass `Optimizer` without initialising it, so its hook
    registries are missing and hooks must go on the inner one, which every step reaches."""
    scaler = None
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        scaler = scaler or getattr(optimizer, "scaler", None)
        optimizer = optimizer.optimizer
    return optimizer, scaler


def default_run_name() -> str:
    import __main__

    stem = os.path.splitext(os.path.basename(getattr(__main__, "__file__", "") or "python"))[0] or "run"
    # All ranks of a distributed job must pick the same name without talking to each other.
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if job and job != "none":
        return protocol_safe(f"{stem}-{job}")
    if "MASTER_PORT" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return protocol_safe(f"{stem}-{os.environ.get('MASTER_ADDR', 'local')}-{os.environ['MASTER_PORT']}")
    return protocol_safe(f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def protocol_safe(name: str) -> str:
    """`name` made acceptable as a run name (see protocol.RUN_NAME_PATTERN)."""
    cleaned = re.sub(r"[^A-Za-z0-9._:@+-]", "-", name).lstrip("._:@+-")
    return (cleaned or "run")[:128]


def distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_sharded(t: torch.Tensor) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2): a view that in-place writes go through to; any
    other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def replicated_value(t: torch.Tensor) -> torch.Tensor | None:
    """The value every rank holds: a plain tensor, or a replicated DTensor's local copy
    (clip_grad_norm_'s total norm under FSDP2); None for a DTensor that is not replicated."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return t
    return local(t) if all(p.is_replicate() for p in placements) else None


