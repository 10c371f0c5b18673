"""Lightning callbacks for ContinuousNet models, installed as ``lightning_cnet.callbacks``."""

from lightning_cnet.callbacks.depth_refinement import (
    DepthRefinementCallback,
    DepthRefinementMixin,
    is_refinable,
    refinable_modules,
)
from lightning_cnet.callbacks.optimizer_surgery import replace_parameters, stale_parameters
from lightning_cnet.callbacks.quick_eval import validation_accuracy
from lightning_cnet.callbacks.schedule import RefinementSchedule

__all__ = [
    "DepthRefinementCallback",
    "DepthRefinementMixin",
    "RefinementSchedule",
    "is_refinable",
    "refinable_modules",
    "replace_parameters",
    "stale_parameters",
    "validation_accuracy",
]
