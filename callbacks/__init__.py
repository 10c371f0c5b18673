"""Lightning callbacks for ContinuousNet models, installed as ``lightning_cnet.callbacks``.

The callbacks here are the ``pytorch_lightning`` ones; ``lightning_cnet.lightning`` has the same callbacks for
``lightning.pytorch``. Each is written once as a namespace-free mixin in its own module and registered with
:func:`~lightning_cnet._namespace.lightning_class`; this package imports its modules and makes a callback concrete on
first access, so that importing a helper of this package (or the ``lightning.pytorch`` twins) does not import
``pytorch_lightning``.

Example:
    >>> from lightning_cnet.callbacks import DepthRefinementCallback
    >>> DepthRefinementCallback([2, 4]).schedule
    RefinementSchedule([2, 4], max_refinements=None)
"""

from __future__ import annotations

from lightning_cnet._namespace import import_submodules, module_getattr, registered_names
from lightning_cnet.callbacks.depth_refinement import DepthRefinementMixin, is_refinable, refinable_modules
from lightning_cnet.callbacks.manifestation_monitor import ManifestationMonitorMixin
from lightning_cnet.callbacks.nonfinite_guard import NonFiniteError, NonFiniteGuardMixin
from lightning_cnet.callbacks.optimizer_surgery import replace_parameters, stale_parameters
from lightning_cnet.callbacks.quick_eval import Measurement, ValidationMetric, validation_metrics
from lightning_cnet.callbacks.schedule import PlateauSchedule, RefinementSchedule

import_submodules(__name__, __path__)  # every callback module registers its callback
__getattr__ = module_getattr(__name__)

__all__ = [
    *registered_names(__name__),
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
