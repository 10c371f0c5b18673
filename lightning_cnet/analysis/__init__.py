"""Studies of trained ContinuousNets: is a model a meaningful integrator, how smooth is it in depth, how far can it
be compressed. Plain PyTorch (no Lightning); the ``lightning-cnet-analyze`` command (:mod:`.cli`) runs them on
checkpoints.

* :func:`manifestation_sweep`: accuracy, loss and logit distance to a fine reference for every scheme and step
  count, with the stages-off baseline and, optionally, BatchNorm statistics re-estimated per manifestation.
* :func:`convergence_study`: error against step count and the fitted order, aligned step counts apart.
* :func:`depth_profile`: norms of the pieces of ``theta(t)``, jumps between neighbours, gates, smoothness.
* :func:`compression_sweep`: accuracy, parameters and latency of projected copies.
* :func:`export_program`, :func:`export_onnx`: a graph of the model at one manifestation, checked against eager.
* :func:`recalibrate_bn`: re-estimate BatchNorm statistics at the current manifestation.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", scheme="rk4", n_steps=2).eval()
    >>> batches = as_batches([(torch.randn(8, 1, 8, 8), torch.arange(8))])
    >>> rows = manifestation_sweep(model, batches, schemes=["rk4"], n_steps=[1, 2], reference_steps=8, progress=False)
    >>> rows[0]["scheme"]  # the stages-off baseline comes first
    'stages_off'
"""

from lightning_cnet.analysis._files import write_csv
from lightning_cnet.analysis.compression import compression_sweep
from lightning_cnet.analysis.convergence import convergence_study, fit_order
from lightning_cnet.analysis.depth_profile import depth_profile
from lightning_cnet.analysis.evaluation import as_batches, evaluate
from lightning_cnet.analysis.export import export_onnx, export_program
from lightning_cnet.analysis.manifestation import manifestation_sweep, step_grid
from lightning_cnet.recalibration import recalibrate_bn

__all__ = [
    "as_batches",
    "compression_sweep",
    "convergence_study",
    "depth_profile",
    "evaluate",
    "export_onnx",
    "export_program",
    "fit_order",
    "manifestation_sweep",
    "recalibrate_bn",
    "step_grid",
    "write_csv",
]
