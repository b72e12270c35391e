"""gradwatch: training diagnostics for PyTorch.

    run = gradwatch.attach(model, optimizer)

The probe (``gradwatch.probe``) needs torch; importing this package does not, so the
collector can run in an image without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from gradwatch.errors import StopTraining

if TYPE_CHECKING:
    from gradwatch.probe.run import Run


def attach(model: Any, optimizer: Any = None, **options: Any) -> Run:
    """Attach a probe to `model` (and `optimizer`); see `gradwatch.probe.attach`."""
    from gradwatch.probe import attach as _attach

    return _attach(model, optimizer, **options)


__all__ = ["StopTraining", "__version__", "attach"]
