"""Incremental-in-depth training: double the time resolution of every ODE stage at scheduled epochs.

:class:`DepthRefinementMixin` holds all the logic using only torch types and duck typing, so the same code
serves ``pytorch_lightning`` (:class:`DepthRefinementCallback`, here) and ``lightning.pytorch``
(:class:`lightning_cnet.lightning.DepthRefinementCallback`).

What a refinement does, at the start of a scheduled epoch and on every rank at the same point:

1. (optional) measure the module's own validation metric
   (:class:`~lightning_cnet.callbacks.quick_eval.ValidationMetric`);
2. refine every :class:`~lightning_cnet.models.ContinuousNet` inside the LightningModule in place
   (``K -> 2K``, ``N -> step_factor * N``, ``T`` fixed), with optional seeded multiplicative weight noise;
3. refine the averaged copies kept by weight-averaging callbacks (EMA, SWA), without noise;
4. re-wrap the model in ``DistributedDataParallel`` under DDP, so the new parameters are all-reduced
   (the wrapper's constructor also broadcasts rank 0's weights, so the noise is identical on all ranks);
5. patch every optimizer in place (:func:`~lightning_cnet.callbacks.optimizer_surgery.replace_parameters`):
   the LR scheduler, the gradient scaler and LightningCLI's parse-time optimizer keep working unchanged;
6. (optional) measure that metric again, then log one rank-zero line and the metrics ``refinement/*``.

Whether to refine is decided by comparing the level the callback has reached (its own state, saved in every
checkpoint with the model it refined) with the level the schedule asks for at the current epoch, at the start of
every epoch and at its first batch (Lightning skips the epoch-start hook after a restart from a checkpoint written
on an epoch's last batch), so resuming from an end-of-epoch or mid-epoch checkpoint never refines twice or skips one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import prune

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.callbacks._instances import (
    adopt_saved_state,
    others_of_kind,
    settings_state_key,
    stable_description,
)
from lightning_cnet.callbacks.optimizer_surgery import (
    OptimizerState,
    optimized_parameters,
    replace_parameters,
    stale_parameters,
)
from lightning_cnet.callbacks.quick_eval import Measurement, MetricFunction, ValidationMetric, training_inputs
from lightning_cnet.callbacks.schedule import PlateauSchedule, RefineAt, RefinementSchedule
from lightning_cnet.cost import training_batch_shape
from lightning_cnet.evaluation import defines
from lightning_cnet.layers import ParameterChange
from lightning_cnet.ode_block import check_noise_std
from lightning_cnet.recalibration import recalibrate_bn

if TYPE_CHECKING:
    from lightning_cnet._namespace import Namespace

#: Strategy classes (and their subclasses) whose parameters are sharded or flattened.
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy",
                          "XLAFSDPStrategy")
#: Strategy classes (and their subclasses) that are supported.
SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def is_refinable(module: nn.Module) -> bool:
    """Whether ``module`` can be refined like a :class:`~lightning_cnet.models.ContinuousNet` or an
    :class:`~lightning_cnet.ode_block.ODEBlock` (duck-typed: ``refine()`` and ``stage_resolutions``)."""
    return callable(getattr(module, "refine", None)) and hasattr(module, "stage_resolutions")


def refinable_modules(module: nn.Module) -> list[Any]:
    """The outermost refinable modules inside ``module`` (``module`` itself included), in module order (typed
    ``Any``: refinable is duck-typed, see :func:`is_refinable`)."""
    found: list[Any] = []
    inside: set[int] = set()
    for _, child in module.named_modules():
        if id(child) in inside:
            continue
        if is_refinable(child):
            found.append(child)
            inside.update(id(m) for m in child.modules())
    return found


def _n_steps(net: Any) -> tuple[int, ...]:
    return tuple(stage.n_steps for stage in net.stage_resolutions)


def _level_in(state: dict[str, Any]) -> int:
    """The level a saved state reached (a state of lightning-cnet 0.2.0 has no ``level``: its last refinement's)."""
    if "level" in state:
        return int(state["level"])
    return max((int(entry.get("level", 0)) for entry in state.get("history", [])), default=0)


def _averaged_copies(trainer: Any) -> Iterator[nn.Module]:
    """Models kept by weight-averaging callbacks (``_average_model``: EMA/SWA in both namespaces)."""
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None)
        if isinstance(average, nn.Module):
            yield average


def _refuse_non_finite(pl_module: nn.Module, epoch: int) -> None:
    """Raise ``FloatingPointError`` if a parameter or buffer of the module holds a NaN or an infinity."""
    bad = [name for name, tensor in (*pl_module.named_parameters(), *pl_module.named_buffers())
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise FloatingPointError(
            f"refusing to refine at epoch {epoch}: {len(bad)} parameters or buffers are not finite (first: {bad[0]}); "
            "the run diverged before this refinement (lightning_cnet.callbacks.NonFiniteGuard stops it when it does)"
        )


@lightning_class("DepthRefinementCallback", base="Callback")
class DepthRefinementMixin:
    """Refine ContinuousNet models at scheduled epochs during ``trainer.fit``.

    ``lightning_cnet.callbacks.DepthRefinementCallback`` (``pytorch_lightning``) and
    ``lightning_cnet.lightning.DepthRefinementCallback`` (``lightning.pytorch``) are this logic mixed with each
    namespace's ``Callback``.

    Every :class:`~lightning_cnet.models.ContinuousNet` (or stand-alone :class:`~lightning_cnet.ode_block.ODEBlock`)
    inside the LightningModule (found by duck typing: ``refine()`` and ``stage_resolutions``) goes from ``K`` to
    ``2K`` weight pieces (its basis decides) and from ``N`` to ``step_factor * N`` steps at the start of each scheduled
    epoch; the optimizer keeps training exactly the model's parameters, the LR schedule continues, DDP is re-wrapped,
    EMA/SWA copies are refined too.

    Optimizer state: the paper's code rebuilt the optimizer after each refinement, i.e. it **reset** the
    momenta and kept the current learning rate (``optimizer_state="reset"`` reproduces it). The default is
    ``"interpolate"``: the state is mapped with the same operator as the weights, so for the exact
    piecewise-constant refinement the optimizer continues as if nothing but the step size had changed, and
    adaptive optimizers avoid the sign-like, full learning-rate first steps Adam takes after a reset.

    Checkpoints: the model saves its resolution, and loading a finer checkpoint into a freshly built coarse
    model refines it before tensors are copied, so ``trainer.fit(ckpt_path=...)``, ``load_from_checkpoint``
    and ``load_state_dict`` work. This callback saves its history and the resolution training started from.

    Args:
        refine_at: epochs (0-based, strictly increasing ints), fractions of ``max_epochs`` (floats in
            ``(0, 1)``), a callable ``epoch -> bool``, or a
            :class:`~lightning_cnet.callbacks.PlateauSchedule` that decides from a validation metric; the
            refinement happens at the start of the epoch.
        max_refinements: refine at most this many times (a ``PlateauSchedule`` takes its own).
        max_n_steps: never refine a model past this many steps per stage.
        step_factor: each refinement multiplies the step counts by this (``1``: refine the weights only, e.g. raise
            the degree of a Legendre basis at the same steps).
        optimizer_state: ``"interpolate"`` (default) or ``"reset"`` the state of refined parameters.
        noise_std: multiply the refined convolution weights by ``1 + noise_std * N(0, 1)`` (the paper:
            ``0.1``); drawn from a generator seeded by ``seed`` and the refinement level.
        seed: seed of the noise.
        evaluate: measure the module's validation metric just before and right after each refinement: by default the
            quantity its ``validation_step`` logs (see ``monitor``), on ``eval_batches`` validation batches, without
            side effects on training or on what Lightning logs. Where nothing can be measured (no validation data, a
            ``validation_step`` that logs nothing) one line says so once, and refinement goes on.
        eval_batches: validation batches per rank for that measurement (``None``: all).
        monitor: the logged quantity to measure (e.g. ``"val_loss"``); default: the module's ``monitor`` attribute
            (the classifier's is ``"val_acc"``), else the monitor of the Trainer's ``ModelCheckpoint``, whichever
            ``validation_step`` logs, else the first quantity it logs.
        metric: measure with ``metric(trainer, pl_module)`` instead of ``validation_step``: a number (named ``monitor``,
            else after the function) or ``{name: number}``; it runs in eval mode under ``no_grad``.
        recalibrate_bn: right after each refinement (before the "after" measurement), re-estimate every BatchNorm
            statistic at the new step count from the first ``recalibration_batches`` training batches (the same on
            every rank), with :func:`~lightning_cnet.recalibrate_bn`.
        recalibration_batches: training batches for that re-estimation.
        verbose: print one rank-zero line per refinement.

    What the callback needs from a LightningModule: a submodule it can refine (a ContinuousNet or an ``ODEBlock``,
    anywhere inside, e.g. the body of a torchvision detector) and optimizers built in ``configure_optimizers``.
    Measuring needs a ``validation_step`` that logs (or ``metric``); ``recalibrate_bn`` needs a ``forward`` that takes
    the model input of a batch (:func:`~lightning_cnet.batches.model_input`). Batches may have any structure.

    Raises:
        ValueError: an invalid schedule or argument (at construction).
        MisconfigurationException: at ``setup``: an unsupported strategy, a model with nothing refinable,
            ``recalibrate_bn`` with a module that has no ``forward``,
            pruning (Lightning's ``ModelPruning`` callback, or ``torch.nn.utils.prune`` hooks in the model),
            fractions without ``max_epochs``, a second refinement callback in the Trainer.
        ResolutionCostError: at ``setup`` (a ``ValueError``): the resolution after the last scheduled refinement is
            beyond the bounds of :mod:`lightning_cnet.cost` or, with its training activations at the data module's
            batch (``batch_size``, ``in_chans``, ``image_size``), does not fit in the device's memory.

    One per Trainer: every refinement callback refines every ContinuousNet and ODEBlock of the LightningModule, so a
    second one is refused at ``setup`` (give one callback the combined schedule). Its state (the level reached, the
    history) is saved under :attr:`state_key`; a checkpoint that saved it under another key (written by
    lightning-cnet 0.2.0, or with another schedule) resumes with that state.

    Logged metrics (per epoch): ``refinement/level`` and ``refinement/refined`` (1 at refinement epochs);
    at refinement epochs also ``refinement/epoch``, ``refinement/parameters``, ``refinement/n_steps``,
    ``refinement/seconds`` and, named after the quantity measured, ``refinement/<name>_before`` and
    ``refinement/<name>_after`` (``refinement/val_acc_before`` for the classifier, ``refinement/val_loss_before``
    for a module whose measured quantity is ``val_loss``).

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_cnet.module import ContinuousNetClassifier
        >>> callback = DepthRefinementCallback([2, 4, 6], noise_std=0.1)
        >>> task = ContinuousNetClassifier("cnet_digits", scheme="rk4", n_steps=1)
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.fit(task, datamodule=...)  # doctest: +SKIP
    """

    #: The Lightning namespace of the concrete class.
    lightning: ClassVar[Namespace]

    @property
    def state_key(self) -> str:
        """Where Lightning stores this callback's state: the class name and the schedule, e.g.
        ``"DepthRefinementCallback{'refine_at': [2, 4]}"`` (``max_refinements``/``max_n_steps``/``step_factor`` too when
        not the default)."""
        return settings_state_key(self, self._key_settings,
                                  {"max_refinements": None, "max_n_steps": None, "step_factor": 2})

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Take the state saved under another key of this class: by lightning-cnet 0.2.0
        (``"DepthRefinementCallback"``), or with another schedule before a resume (there is one refinement callback).

        A checkpoint written without a refinement callback (the model loaded already, Lightning calls this after)
        gives the level as the refinements of the basis from the model as built to the model as loaded."""
        if (key := adopt_saved_state(self, trainer.callbacks, DepthRefinementMixin, checkpoint)) is not None:
            self.lightning.rank_zero_info(f"{type(self).__name__}: restored the state saved under {key!r}")
        elif not any(isinstance(key, str) and key.split("{", 1)[0] == type(self).__qualname__
                     for key in checkpoint.get("callbacks") or {}):
            self.level = self._level_of(refinable_modules(pl_module))

    def __init__(
        self,
        refine_at: RefineAt | PlateauSchedule,
        *,
        max_refinements: int | None = None,
        max_n_steps: int | None = None,
        step_factor: int = 2,
        optimizer_state: OptimizerState = "interpolate",
        noise_std: float = 0.0,
        seed: int = 0,
        evaluate: bool = True,
        eval_batches: int | None = 10,
        monitor: str | None = None,
        metric: MetricFunction | None = None,
        recalibrate_bn: bool = False,
        recalibration_batches: int = 10,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(refine_at, PlateauSchedule):
            if max_refinements is not None:
                raise ValueError("max_refinements goes to the PlateauSchedule itself, not to the callback")
            self.schedule: RefinementSchedule | PlateauSchedule = refine_at
        else:
            self.schedule = RefinementSchedule(refine_at, max_refinements=max_refinements)
        self._key_settings = {"refine_at": stable_description(refine_at), "max_refinements": max_refinements,
                              "max_n_steps": max_n_steps, "step_factor": step_factor}
        check_integer("max_n_steps", max_n_steps, optional=True)
        check_integer("step_factor", step_factor)
        if optimizer_state not in ("interpolate", "reset"):
            raise ValueError(f"optimizer_state={optimizer_state!r} is not known: expected 'interpolate' or 'reset'")
        check_noise_std(noise_std)
        check_integer("eval_batches", eval_batches, optional=True)
        self.measure = ValidationMetric(monitor, metric, eval_batches)
        check_integer("recalibration_batches", recalibration_batches)
        self.max_n_steps = max_n_steps
        self.step_factor = step_factor
        self.optimizer_state = optimizer_state
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.evaluate = evaluate
        self.eval_batches = eval_batches
        self.monitor = monitor
        self.metric = metric
        self.recalibrate_bn = recalibrate_bn
        self.recalibration_batches = recalibration_batches
        self.verbose = verbose
        self.base_n_steps: list[tuple[int, ...]] | None = None
        self._built: list[tuple[Any, ...]] = []
        self.level = 0
        self.history: list[dict[str, Any]] = []
        self._said_unmeasured = False

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check strategy, model and schedule before any training step."""
        if stage != "fit":
            return
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        refused = names.intersection(UNSUPPORTED_STRATEGIES)
        if refused or not names.intersection(SUPPORTED_STRATEGIES):
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__} does not support strategy {type(trainer.strategy).__name__}: refining "
                "replaces parameters, which sharding strategies (FSDP, DeepSpeed, model parallel, XLA) own; use "
                "a single device or strategy='ddp' / 'ddp_spawn' / 'ddp_fork'"
            )
        nets = refinable_modules(pl_module)
        if not nets:
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__} found nothing to refine in {type(pl_module).__name__}: expected a submodule "
                "with refine() and stage_resolutions such as lightning_cnet.ContinuousNet or lightning_cnet.ODEBlock"
            )
        if others := others_of_kind(self, trainer.callbacks, DepthRefinementMixin):
            keys = ", ".join(callback.state_key for callback in [self, *others])
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__}: the Trainer has {len(others) + 1} refinement callbacks ({keys}); each refines "
                "every ContinuousNet and ODEBlock of the LightningModule, so they would refine the same modules: keep "
                "one, with the combined schedule"
            )
        pruning = [type(cb).__name__ for cb in trainer.callbacks
                   if any(cls.__name__ == "ModelPruning" for cls in type(cb).__mro__)]
        if pruning or any(prune.is_pruned(net) for net in nets):
            what = (f"the {pruning[0]} callback" if pruning
                    else f"a model already pruned (torch.nn.utils.prune hooks in {type(pl_module).__name__})")
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__} cannot be used with {what}: pruning reparametrises `weight` as "
                "`weight_orig * weight_mask`, which a refinement cannot carry to the new pieces; prune after the "
                "last refinement (a separate fit), or make the pruning permanent with torch.nn.utils.prune.remove "
                "before fit"
            )
        if self.recalibrate_bn and not defines(pl_module, "forward"):
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__}(recalibrate_bn=True) runs the module on the inputs of training batches, but "
                f"{type(pl_module).__name__} defines no forward; define forward(self, x), or recalibrate the "
                "backbone yourself with lightning_cnet.recalibrate_bn"
            )
        self.schedule.resolve(trainer.max_epochs, self.lightning.MisconfigurationException)
        if isinstance(self.schedule, PlateauSchedule):
            self.schedule.check_trainer(trainer, self.lightning.MisconfigurationException)
        if self.base_n_steps is None:
            self.base_n_steps = [_n_steps(net) for net in nets]
            self._built = [tuple(net.stage_resolutions) for net in nets]
        if len(self.base_n_steps) != len(nets):
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__} recorded {len(self.base_n_steps)} refinable models but "
                f"{type(pl_module).__name__} has {len(nets)}"
            )
        self._check_cost(trainer, nets)
        epochs = self.schedule.epochs
        if epochs and trainer.max_epochs is not None and trainer.max_epochs > 0 and epochs[-1] >= trainer.max_epochs:
            self.lightning.rank_zero_warn(
                f"refine_at={epochs} reaches past max_epochs={trainer.max_epochs}: later epochs never run")

    def _check_cost(self, trainer: Any, nets: list[Any]) -> None:
        """Refuse a schedule whose last refinement would not fit (see :mod:`lightning_cnet.cost`), before training."""
        last_epoch = trainer.max_epochs - 1 if trainer.max_epochs is not None and trainer.max_epochs > 0 else (
            self.schedule.epochs[-1] if self.schedule.epochs else None)
        if last_epoch is None:
            return  # a callable schedule without max_epochs: each refinement checks itself
        refinements = self.schedule.target_level(last_epoch, cap=self._cap_level())
        shape = training_batch_shape(getattr(trainer, "datamodule", None))
        for net in nets:
            check = getattr(net, "check_refine", None)
            if refinements and callable(check):
                try:
                    check(refinements, training=True, batch_shape=shape, device=trainer.strategy.root_device,
                          step_factor=self.step_factor)
                except TypeError:  # a refinable module whose check takes the count only
                    check(refinements)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check that the optimizers train the model's parameters.

        Lightning restores a checkpoint (refining a coarse model to its resolution) before the strategy builds the
        optimizers, so they see the refined tensors; an optimizer built earlier (before the load) is an error.
        """
        self._check_optimizers(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Refine until the model has the level the schedule asks for at this epoch."""
        level, refined = self._catch_up(trainer, pl_module)
        pl_module.log("refinement/level", float(level), on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("refinement/refined", float(refined), on_step=False, on_epoch=True, sync_dist=True)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Refine at the first batch of an epoch whose start hook Lightning skipped: after a restart from a
        checkpoint written on the last batch of the previous epoch, ``on_train_epoch_start`` is not called."""
        if batch_idx == 0:
            level, refined = self._catch_up(trainer, pl_module)
            if refined:
                pl_module.log("refinement/refined", 1.0, on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Let a :class:`~lightning_cnet.callbacks.PlateauSchedule` decide from this validation run's metric."""
        if isinstance(self.schedule, PlateauSchedule) and not trainer.sanity_checking:
            self.schedule.update(trainer)

    def _catch_up(self, trainer: Any, pl_module: Any) -> tuple[int, bool]:
        """Refine until the level is the one the schedule asks for at the current epoch; return the level and whether
        a refinement happened. Deciding from the level reached (saved in checkpoints with the model it describes), not
        from hooks seen, never refines twice or skips one, whatever checkpoint training resumed from."""
        nets = refinable_modules(pl_module)
        epoch = trainer.current_epoch
        target = self.schedule.target_level(epoch, cap=self._cap_level())
        refined = self.level < target
        while self.level < target:
            self._refine_once(trainer, pl_module, nets, epoch, self.level)
            self.level += 1
        return self.level, refined

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The level reached, the refinement history, the resolution training started from, and a plateau schedule's
        decisions."""
        state = {"level": self.level, "history": [dict(entry) for entry in self.history],
                 "base_n_steps": None if self.base_n_steps is None else [list(n) for n in self.base_n_steps]}
        if isinstance(self.schedule, PlateauSchedule):
            state["schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (a state of lightning-cnet 0.2.0, without ``level``, gives the level of
        its last refinement)."""
        self.level = _level_in(state_dict)
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        base = state_dict.get("base_n_steps")
        self.base_n_steps = None if base is None else [tuple(n) for n in base]
        if isinstance(self.schedule, PlateauSchedule) and "schedule" in state_dict:
            self.schedule.load_state_dict(state_dict["schedule"])

    # ------------------------------------------------------------------ levels
    def _level_of(self, nets: list[Any]) -> int:
        """Refinements of every stage's basis from its resolution as built (at ``setup``) to its resolution now, if
        all stages agree (0 otherwise, or for stages that do not say their basis)."""
        levels = set()
        for net, built in zip(nets, self._built):
            for before, now in zip(built, net.stage_resolutions):
                basis, pieces, level = getattr(now, "basis_family", None), getattr(before, "n_basis", None), 0
                if basis is None or pieces is None:
                    return 0
                while pieces < now.n_basis:
                    pieces, level = basis.refined_size(pieces), level + 1
                levels.add(level if pieces == now.n_basis else -1)
        return levels.pop() if len(levels) == 1 and -1 not in levels else 0

    def _cap_level(self) -> float:
        """The highest level at which no stage has more than ``max_n_steps`` steps."""
        if self.max_n_steps is None or self.step_factor == 1:
            return math.inf
        assert self.base_n_steps is not None
        largest, level = max(max(base) for base in self.base_n_steps), 0
        while largest * self.step_factor ** (level + 1) <= self.max_n_steps:
            level += 1
        return level

    # ------------------------------------------------------------------ refinement
    def _generator(self, level: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + level) % 2**63)

    def _refine_once(self, trainer: Any, pl_module: Any, nets: list[Any], epoch: int, level: int) -> None:
        _refuse_non_finite(pl_module, epoch)
        measured_before = self._measured(trainer, pl_module)
        before = [_n_steps(net) for net in nets]
        params_before = sum(p.numel() for p in pl_module.parameters())
        start = time.perf_counter()

        generator = self._generator(level)
        changes = [change for net in nets for change in net.refine(
            noise_std=self.noise_std, generator=generator, step_factor=self.step_factor).parameter_changes]
        for average in _averaged_copies(trainer):
            for net in refinable_modules(average):
                net.refine(step_factor=self.step_factor)
        self._rewrap_ddp(trainer)
        for optimizer in trainer.optimizers:
            replace_parameters(optimizer, changes, optimizer_state=self.optimizer_state)
        self._check_optimizers(trainer, pl_module, changes)
        if self.recalibrate_bn:
            with trainer.precision_plugin.forward_context():
                recalibrate_bn(pl_module, training_inputs(trainer, pl_module, self.recalibration_batches))

        seconds = time.perf_counter() - start
        measured_after = self._measured(trainer, pl_module, measured_before.name)
        depths = [[r.T for r in net.stage_resolutions] for net in nets]
        entry = {
            "epoch": epoch, "level": level + 1,
            "n_steps_before": [list(n) for n in before], "n_steps_after": [list(_n_steps(n)) for n in nets],
            "T": depths, "step_size": [[r.T / r.n_steps for r in net.stage_resolutions] for net in nets],
            "parameters_before": params_before, "parameters_after": sum(p.numel() for p in pl_module.parameters()),
            "seconds": seconds, "metric": measured_before.name,
        }
        if measured_before.name is not None:
            entry[f"{measured_before.name}_before"] = measured_before.value
            entry[f"{measured_before.name}_after"] = measured_after.value
        self.history.append(entry)
        self._report(pl_module, entry)

    def _measured(self, trainer: Any, pl_module: Any, name: str | None = None) -> Measurement:
        """The measurement before (``name=None``: choose what to measure) or after a refinement; the first time
        nothing can be measured, one line says why."""
        if not self.evaluate:
            return Measurement(None, math.nan)
        measurement = self.measure(trainer, pl_module, name)
        if measurement.reason is not None and not self._said_unmeasured:
            self._said_unmeasured = True
            self.lightning.rank_zero_info(
                f"{type(self).__name__}: refinements are not measured ({measurement.reason}); refining anyway (choose "
                "what to measure with monitor= or metric=, or pass evaluate=False)"
            )
        return measurement

    @staticmethod
    def _rewrap_ddp(trainer: Any) -> None:
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()

    @staticmethod
    def _check_optimizers(trainer: Any, pl_module: Any, changes: Sequence[ParameterChange] = ()) -> None:
        stale = stale_parameters(trainer.optimizers, pl_module)
        if stale:
            raise RuntimeError(
                f"{len(stale)} tensors held by the optimizer are not parameters of {type(pl_module).__name__} "
                f"(shapes {[tuple(p.shape) for p in stale[:4]]}): the optimizer was built from another model, or "
                "before a checkpoint was loaded; build it in configure_optimizers()"
            )
        if changes and trainer.optimizers:
            held = optimized_parameters(trainer.optimizers)
            missing = [new for change in changes for new in change.new if new.requires_grad and id(new) not in held]
            if missing:
                raise RuntimeError(f"{len(missing)} refined parameters are not held by any optimizer")

    def _report(self, pl_module: Any, entry: dict[str, Any]) -> None:
        def steps(per_net: list[list[float]]) -> str:
            return ", ".join("-".join(f"{n:g}" for n in net) for net in per_net)

        metric = entry["metric"]
        measured = [f"{metric}_before", f"{metric}_after"] if metric is not None else []
        if self.verbose:
            change = (f", {metric} {entry[measured[0]]:.4f} -> {entry[measured[1]]:.4f}" if measured else "")
            self.lightning.rank_zero_info(
                f"Depth refinement at epoch {entry['epoch']}: n_steps {steps(entry['n_steps_before'])} -> "
                f"{steps(entry['n_steps_after'])} (T {steps(entry['T'])}, step size T/N {steps(entry['step_size'])}), "
                f"parameters {entry['parameters_before']:,} -> {entry['parameters_after']:,}{change} "
                f"({1000 * entry['seconds']:.1f} ms)"
            )
        for key in ("epoch", "parameters_after", *measured, "seconds"):
            if not math.isnan(entry[key]):
                name = "parameters" if key == "parameters_after" else key
                pl_module.log(f"refinement/{name}", float(entry[key]), on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("refinement/n_steps", float(max(max(n) for n in entry["n_steps_after"])),
                      on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("refinement/T", float(max(max(t) for t in entry["T"])), on_step=False, on_epoch=True,
                      sync_dist=True)
        pl_module.log("refinement/step_size", float(min(min(h) for h in entry["step_size"])), on_step=False,
                      on_epoch=True, sync_dist=True)


__all__ = ["DepthRefinementMixin", "is_refinable", "refinable_modules"]
