"""Watch invariance to the manifestation while training: a small sweep on a few validation batches per epoch.

Example:
    >>> monitor = ManifestationMonitorMixin(schemes=["euler", "rk4"], n_steps=[2, 4], num_batches=2)
    >>> monitor.schemes, monitor.n_steps
    (('euler', 'rk4'), (2, 4))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, ClassVar

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.callbacks._instances import others_of_kind, settings_state_key
from lightning_cnet.callbacks.depth_refinement import refinable_modules
from lightning_cnet.callbacks.quick_eval import MetricFunction, ValidationMetric
from lightning_cnet.integrators import get_scheme, validate_n_steps

if TYPE_CHECKING:
    from lightning_cnet._namespace import Namespace


@lightning_class("ManifestationMonitor", base="Callback")
class ManifestationMonitorMixin:
    """Log the module's validation metric at other manifestations of the model as it trains.

    Every ``every_n_epochs`` epochs, after validation, the module's own validation metric (the quantity its
    ``validation_step`` logs, chosen as by :class:`~lightning_cnet.callbacks.DepthRefinementCallback`; the
    classifier's ``val_acc``) is measured (eval mode, BatchNorm statistics as they are) on the first ``num_batches``
    validation batches per rank with each scheme and step count, all ODE stages alike, and the callback logs
    ``{prefix}/<name>_{scheme}_{n}`` for each (``manifestation/val_acc_rk4_4``) and
    ``{prefix}/invariance_gap``, the largest minus the smallest of these values. A meaningful integrator keeps
    the gap small; a model whose gap stays small while its stages-off value is as good says nothing (see
    ``lightning-cnet-analyze manifestation``). What the sweep cost is logged as ``manifestation/seconds``. Where
    nothing can be measured one line says so once and nothing is logged. The epoch's own validation metrics are not
    touched. Works under DDP (values are reduced over ranks) and every precision.
    ``lightning_cnet.callbacks.ManifestationMonitor`` (``pytorch_lightning``) and
    ``lightning_cnet.lightning.ManifestationMonitor`` (``lightning.pytorch``) are this logic made concrete.

    Args:
        every_n_epochs: evaluate every this many epochs (after validation of epochs ``n - 1, 2n - 1, ...``).
        schemes: scheme names.
        n_steps: step counts per stage; ``None``: half, once and twice the model's current largest step count
            (which grows with refinement).
        num_batches: validation batches per rank.
        monitor: the logged quantity to measure (default: chosen as by
            :class:`~lightning_cnet.callbacks.DepthRefinementCallback`).
        metric: measure with ``metric(trainer, pl_module)`` instead of ``validation_step`` (a number or
            ``{name: number}``).
        prefix: the metrics are ``{prefix}/<name>_{scheme}_{n}``, ``{prefix}/invariance_gap`` and
            ``{prefix}/seconds``; two monitors in one Trainer need two prefixes (a second one with the same prefix is
            refused at ``setup``, as it would write the same keys).

    Example:
        >>> import pytorch_lightning as pl  # doctest: +SKIP
        >>> from lightning_cnet.callbacks import ManifestationMonitor  # doctest: +SKIP
        >>> trainer = pl.Trainer(callbacks=[ManifestationMonitor(schemes=["euler", "rk4"])])  # doctest: +SKIP
    """

    #: The Lightning namespace of the concrete class.
    lightning: ClassVar[Namespace]

    @property
    def state_key(self) -> str:
        """The class name, and the metric prefix when it is not the default (the monitor keeps no state; the key
        names it in Lightning's profiler)."""
        return settings_state_key(self, {"prefix": self.prefix}, {"prefix": "manifestation"})

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse a second monitor with the same metric prefix."""
        if clashing := [other for other in others_of_kind(self, trainer.callbacks, ManifestationMonitorMixin)
                        if other.prefix == self.prefix]:
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__}(prefix={self.prefix!r}): the Trainer has {len(clashing) + 1} manifestation "
                f"monitors logging '{self.prefix}/...', which would write the same metrics; give each its own "
                f"prefix, e.g. {type(self).__name__}(prefix='{self.prefix}_2')"
            )

    def __init__(
        self,
        every_n_epochs: int = 1,
        schemes: Sequence[str] = ("euler", "midpoint", "rk4"),
        n_steps: Sequence[int] | None = None,
        num_batches: int = 2,
        monitor: str | None = None,
        metric: MetricFunction | None = None,
        prefix: str = "manifestation",
    ) -> None:
        super().__init__()
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix={prefix!r} must be a non-empty string (the metrics are '{{prefix}}/...')")
        check_integer("every_n_epochs", every_n_epochs)
        check_integer("num_batches", num_batches)
        for scheme in schemes:
            get_scheme(scheme)
        for steps in n_steps or ():
            validate_n_steps(steps)
        self.every_n_epochs = every_n_epochs
        self.schemes = tuple(schemes)
        self.n_steps = None if n_steps is None else tuple(n_steps)
        self.num_batches = num_batches
        self.monitor = monitor
        self.metric = metric
        self.prefix = prefix
        self.measure = ValidationMetric(monitor, metric, num_batches)
        self._said_unmeasured = False

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        nets = refinable_modules(pl_module)
        if not nets:
            return
        start = time.perf_counter()
        largest = max(r.n_steps for net in nets for r in net.stage_resolutions)
        n_steps = self.n_steps or tuple(sorted({max(1, largest // 2), largest, 2 * largest}))
        values: dict[str, float] = {}
        name = None
        for scheme in self.schemes:
            for steps in n_steps:
                with ExitStack() as stack:
                    for net in nets:
                        stack.enter_context(net.manifestation(scheme=scheme, n_steps=steps))
                    measurement = self.measure(trainer, pl_module, name)
                if measurement.name is None:
                    self._say_unmeasured(measurement.reason)
                    return
                name = measurement.name
                values[f"{self.prefix}/{name}_{scheme}_{steps}"] = measurement.value
        values[f"{self.prefix}/invariance_gap"] = max(values.values()) - min(values.values())
        values[f"{self.prefix}/seconds"] = time.perf_counter() - start
        for key, value in values.items():
            pl_module.log(key, value, on_epoch=True, on_step=False)

    def _say_unmeasured(self, reason: str | None) -> None:
        if not self._said_unmeasured:
            self._said_unmeasured = True
            self.lightning.rank_zero_info(f"{type(self).__name__}: nothing is measured ({reason}); choose what to "
                                          "measure with monitor= or metric=")
