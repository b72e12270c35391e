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
    from gradwatch.probe.landscape import LandscapeResult
    from gradwatch.probe.lr_find import LRFindResult
    from gradwatch.probe.run import Run


def attach(model: Any, optimizer: Any = None, **options: Any) -> Run:
    """Attach a probe to `model` (and `optimizer`); see `gradwatch.probe.attach`."""
    from gradwatch.probe import attach as _attach

    return _attach(model, optimizer, **options)


def lr_find(model: Any, optimizer: Any, batches: Any, *args: Any, **options: Any) -> LRFindResult:
    """The LR range test, streamed as the run `<name>-lr-find`; see `gradwatch.probe.lr_find`."""
    from gradwatch.probe.lr_find import lr_find as _lr_find

    return _lr_find(model, optimizer, batches, *args, **options)


def landscape(model: Any, batches: Any, *args: Any, **options: Any) -> LandscapeResult:
    """The loss around the current weights; see `gradwatch.probe.landscape`."""
    from gradwatch.probe.landscape import landscape as _landscape

    return _landscape(model, batches, *args, **options)


__all__ = ["StopTraining", "__version__", "attach", "landscape", "lr_find"]
