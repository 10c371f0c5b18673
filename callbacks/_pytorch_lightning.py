"""The ``pytorch_lightning`` callbacks: the namespace-free mixins made concrete with ``pytorch_lightning.Callback``."""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_cnet._namespace import pytorch_lightning_namespace
from lightning_cnet.callbacks.depth_refinement import DepthRefinementMixin
from lightning_cnet.callbacks.manifestation_monitor import ManifestationMonitorMixin
from lightning_cnet.callbacks.nonfinite_guard import NonFiniteGuardMixin


class DepthRefinementCallback(DepthRefinementMixin, pl.Callback):
    __doc__ = DepthRefinementMixin.__doc__
    __module__ = "lightning_cnet.callbacks"
    lightning = pytorch_lightning_namespace()


class ManifestationMonitor(ManifestationMonitorMixin, pl.Callback):
    __doc__ = ManifestationMonitorMixin.__doc__
    __module__ = "lightning_cnet.callbacks"
    lightning = pytorch_lightning_namespace()


class NonFiniteGuard(NonFiniteGuardMixin, pl.Callback):
    __doc__ = NonFiniteGuardMixin.__doc__
    __module__ = "lightning_cnet.callbacks"
    lightning = pytorch_lightning_namespace()


__all__ = ["DepthRefinementCallback", "ManifestationMonitor", "NonFiniteGuard"]
