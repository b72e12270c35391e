"""A run's one-off results for its page: the LR range test's curve and verdict (`lr_find`)
and the latest loss-landscape grid (`landscape`).

Kept as the validated protocol messages. Served with non-finite numbers as null (a browser's
JSON has no NaN: a point that is not finite is not drawn); saved as the message's own JSON
(NaN kept), and validated again by the protocol when read back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gradwatch.protocol import (
    Landscape,
    LRFind,
    ProtocolError,
    decode_probe_message,
    encode,
)

Result = LRFind | Landscape


class Results:
    """The newest result of each kind, with the series version that brought it."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, Result, int]] = {}  # type -> (version, message, frame bytes)

    def keep(self, message: Result, version: int) -> None:
        self.latest[message.type] = (version, message, len(encode(message)))

    def since(self, version: int, reset: bool) -> dict[str, Any]:
        """The results that arrived after `version` (all of them on a reset), JSON-ready."""
        return {kind: _json_safe(message.model_dump()) for kind, (v, message, _) in self.latest.items()
                if reset or v > version}

    def to_json(self) -> dict[str, str]:
        return {kind: encode(message) for kind, (_, message, _) in self.latest.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], version: int) -> Results:
        """Raises ValueError when a saved result is not a valid message of its kind."""
        results = cls()
        for kind, frame in data.items():
            try:
                message = decode_probe_message(frame)
            except (ProtocolError, TypeError) as err:
                raise ValueError(f"saved {kind!r} result: {err}") from None
            if message.type != kind or not isinstance(message, (LRFind, Landscape)):
                raise ValueError(f"saved {kind!r} result is a {message.type!r} message")
            results.keep(message, version)
        return results

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self.latest.values())


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value
