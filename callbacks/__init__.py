"""Lightning callbacks for ContinuousNet models, installed as ``lightning_cnet.callbacks``.

The callbacks here are the ``pytorch_lightning`` ones; ``lightning_cnet.lightning`` has the same callbacks for
``lightning.pytorch``. They are imported on first access, so that importing a helper of this package (or the
``lightning.pytorch`` twins) does not import ``pytorch_lightning``.

Example:
    >>> from lightning_cnet.callbacks import DepthRefinementCallback
    >>> DepthRefinementCallback([2, 4]).schedule
    RefinementSchedule([2, 4], max_refinements=None)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lightning_cnet.callbacks.depth_refinement import DepthRefinementMixin, is_refinable, refinable_modules
from lightning_cnet.callbacks.manifestation_monitor import ManifestationMonitorMixin
from lightning_cnet.callbacks.nonfinite_guard import NonFiniteError, NonFiniteGuardMixin
from lightning_cnet.callbacks.optimizer_surgery import replace_parameters, stale_parameters
from lightning_cnet.callbacks.quick_eval import Measurement, ValidationMetric, validation_metrics
from lightning_cnet.callbacks.schedule import PlateauSchedule, RefinementSchedule

#: Callbacks made concrete for ``pytorch_lightning``, imported on first access.
_PYTORCH_LIGHTNING_CALLBACKS = ("DepthRefinementCallback", "ManifestationMonitor", "NonFiniteGuard")


def __getattr__(name: str) -> Any:
    if name in _PYTORCH_LIGHTNING_CALLBACKS:
        return getattr(import_module("lightning_cnet.callbacks._pytorch_lightning"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_PYTORCH_LIGHTNING_CALLBACKS,
    "DepthRefinementMixin",
    "Measurement",
    "ManifestationMonitorMixin",
    "NonFiniteError",
    "NonFiniteGuardMixin",
    "PlateauSchedule",
    "RefinementSchedule",
    "ValidationMetric",
    "is_refinable",
    "refinable_modules",
    "replace_parameters",
    "stale_parameters",
    "validation_metrics",
]
