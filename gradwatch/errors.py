"""Exceptions both sides raise; importable without torch or either side's modules."""

from __future__ import annotations


class StopTraining(Exception):
    """Raised by the probe at a step boundary when a `stop` action asks training to end."""
