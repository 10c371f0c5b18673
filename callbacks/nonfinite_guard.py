"""Stop, or roll back, training as soon as the loss, a gradient, a parameter, a buffer or the optimizer state
stops being finite, and never write a checkpoint from such a state.

:class:`NonFiniteGuardMixin` holds the callback's logic using only torch types and duck typing, so the same code
serves ``pytorch_lightning`` (``lightning_cnet.callbacks.NonFiniteGuard``) and ``lightning.pytorch``
(``lightning_cnet.lightning.NonFiniteGuard``). It is built from :mod:`~lightning_cnet.callbacks.finite` (the checks)
and :mod:`~lightning_cnet.callbacks.snapshot` (the copy of the training state a rollback restores, and the learning
rate scaling), whose pieces are importable from here too; :func:`describe_resolution` and
:func:`describe_last_refinement` say what the stop message reports. ``docs/nonfinite_guard.md`` describes what is
checked when, what a rollback does and what the guard costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.callbacks._instances import adopt_saved_state, others_of_kind, settings_state_key
from lightning_cnet.callbacks.finite import (
    CATEGORIES,
    Findings,
    WatchedTensors,
    all_finite,
    checked_tensors,
    is_float_tensor,
    named_checked_tensors,
    nonfinite_names,
)
from lightning_cnet.callbacks.snapshot import TrainingStateSnapshot, scale_learning_rates
from lightning_cnet.resolution import StageResolution

if TYPE_CHECKING:
    from lightning_cnet._namespace import Namespace

OnNonFinite = Literal["stop", "rollback"]

#: Strategy classes (and their subclasses) under which a rollback is supported: the parameters and the optimizer
#: state are whole tensors on each rank. Other strategies shard them; there the guard can only stop.
ROLLBACK_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
#: Names listed per category in a message.
SHOWN_NAMES = 3


class NonFiniteError(RuntimeError):
    """Training reached a non-finite state that :class:`NonFiniteGuardMixin` was told not to, or could not, repair.

    The same class serves both Lightning namespaces.

    Attributes:
        epoch: the epoch at which the state was found.
        global_step: the trainer's ``global_step`` at that moment.
        found: what was non-finite: names from :data:`CATEGORIES`, or ``"checkpoint tensors"`` when a checkpoint
            about to be written held the non-finite values.
    """

    def __init__(self, message: str, *, epoch: int, global_step: int, found: Sequence[str]) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.global_step = global_step
        self.found = tuple(found)


# ---------------------------------------------------------------------- reporting
def _stage_resolutions(value: Any) -> list[Any] | None:
    """``value`` as a list of StageResolution-like objects (``n_steps``, ``n_basis``, ``scheme``), or ``None``."""
    def stage_like(item: Any) -> bool:
        return all(hasattr(item, name) for name in ("n_steps", "n_basis", "scheme"))

    if stage_like(value):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(stage_like(item) for item in value):
        return list(value)
    return None


def _describe_stage(stage: Any) -> str:
    """A stage's own description (:meth:`StageResolution.describe <lightning_cnet.resolution.StageResolution.describe>`,
    tolerances of adaptive steps included), or its ``n_steps``/``n_basis``/``scheme`` for a look-alike."""
    if isinstance(stage, StageResolution):
        return stage.describe()
    return f"n_steps={stage.n_steps} n_basis={stage.n_basis} {stage.scheme}"


def describe_resolution(module: nn.Module) -> str:
    """Per-stage resolution of the outermost submodules having a ``resolution``: a
    :class:`~lightning_cnet.resolution.StageResolution` or a sequence of them, such as
    :attr:`lightning_cnet.models.ContinuousNet.resolution` (duck-typed: objects with ``n_steps``, ``n_basis`` and
    ``scheme`` are described by those).

    Example:
        >>> from lightning_cnet.models import get_model
        >>> describe_resolution(nn.ModuleDict({"net": get_model("cnet_digits", scheme="rk4", n_steps=2)}))
        'net: [n_steps=2 n_basis=2 rk4, n_steps=2 n_basis=2 rk4, n_steps=2 n_basis=2 rk4]'
    """
    parts: list[str] = []
    inside: set[int] = set()
    for name, child in module.named_modules():
        if id(child) in inside:
            continue
        stages = _stage_resolutions(getattr(child, "resolution", None))
        if stages is None:
            continue
        inside.update(id(m) for m in child.modules())
        described = ", ".join(_describe_stage(stage) for stage in stages)
        parts.append(f"{name or type(child).__name__}: [{described}]")
    return "; ".join(parts) if parts else "unknown (no submodule has a resolution)"


def describe_last_refinement(callbacks: Iterable[Any]) -> str | None:
    """The last refinement recorded by a callback with a ``history`` list of dicts with an ``epoch`` key (duck-typed:
    :class:`~lightning_cnet.callbacks.DepthRefinementCallback`); ``None`` when no callback keeps such a history."""
    histories = [
        history for history in (getattr(callback, "history", None) for callback in callbacks)
        if isinstance(history, list) and all(isinstance(entry, Mapping) and "epoch" in entry for entry in history)
    ]
    if not histories:
        return None
    entries = [entry for history in histories for entry in history]
    if not entries:
        return "no refinement yet"
    last = max(entries, key=lambda entry: entry["epoch"])
    text = f"last refinement at epoch {last['epoch']}"
    if "n_steps_before" in last and "n_steps_after" in last:
        def steps(per_net: Any) -> str:
            return ", ".join("-".join(str(n) for n in net) for net in per_net)

        text += f" (n_steps {steps(last['n_steps_before'])} -> {steps(last['n_steps_after'])})"
    return text


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss a training step returned: a tensor, or the ``"loss"`` entry of a mapping."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs.detach() if isinstance(outputs, torch.Tensor) else None


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


# ---------------------------------------------------------------------- the callback
@lightning_class("NonFiniteGuard", base="Callback")
class NonFiniteGuardMixin:
    """Stop training, or roll it back, when the loss, a gradient, a parameter, a buffer or the optimizer state is
    not finite; never let a checkpoint be written from such a state.

    ``lightning_cnet.callbacks.NonFiniteGuard`` (``pytorch_lightning``) and ``lightning_cnet.lightning.NonFiniteGuard``
    (``lightning.pytorch``) are this logic mixed with each namespace's ``Callback``.

    The guard checks the loss, every gradient, parameter, floating-point buffer and optimizer state tensor after every
    ``check_every_n_steps``-th training batch (one fused reduction and one host synchronisation; the losses of the
    batches in between are folded in), again before every validation run and at the end of every epoch (where
    ``ModelCheckpoint`` saves), and every tensor of a checkpoint about to be written (``on_save_checkpoint``, in
    both modes). Then, on a non-finite state:

    * ``on_nonfinite="stop"`` (default): raise :class:`NonFiniteError` with one message naming the epoch, the global
      step, what was non-finite, the model's resolution per stage and the last depth refinement; no checkpoint is
      written from the bad state.
    * ``on_nonfinite="rollback"``: restore the last state that passed a check in place (a
      :class:`~lightning_cnet.callbacks.snapshot.TrainingStateSnapshot`, about twice the parameter memory with SGD
      and momentum), multiply the learning rate by ``lr_factor`` so that the schedule continues from it, skip the
      batch and go on; after ``max_rollbacks`` rollbacks, restore the last good state once more and stop as above.
      Single-device and DDP strategies only. The rollbacks are kept in :attr:`rollbacks` and in checkpoints.

    ``docs/nonfinite_guard.md`` gives the details, how the guard differs from ``Trainer(detect_anomaly=True)``,
    ``gradient_clip_val`` and ``EarlyStopping(check_finite=True)`` (all of which work alongside it), and its measured
    cost.

    One per Trainer: a second guard would act again on a batch the first has handled, so it is refused at ``setup``
    (two with the same settings already by Lightning, as their :attr:`state_key` is the same). The guard resumes
    with the state a checkpoint saved under another key (written by lightning-cnet 0.2.0, or with other settings).

    Args:
        on_nonfinite: ``"stop"`` (raise :class:`NonFiniteError`) or ``"rollback"``.
        max_rollbacks: roll back at most this many times in a run (``on_nonfinite="rollback"``), then stop.
        check_every_n_steps: check gradients, parameters, buffers and optimizer state after every n-th training
            batch (the loss of every batch is checked at the next check).
        lr_factor: multiply the learning rate by this at each rollback, in ``(0, 1]``.
        verbose: warn (rank zero) at each rollback.

    Raises:
        ValueError: an invalid argument (at construction).
        MisconfigurationException: ``on_nonfinite="rollback"`` under a strategy that shards parameters, or a second
            guard in the Trainer (at ``setup``).
        NonFiniteError: during fit, as described above.

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_cnet.callbacks import DepthRefinementCallback, NonFiniteGuard
        >>> guard = NonFiniteGuard(on_nonfinite="rollback", max_rollbacks=3)
        >>> trainer = pl.Trainer(max_epochs=8, callbacks=[DepthRefinementCallback([2, 4]), guard])  # doctest: +SKIP
        >>> trainer.fit(task, datamodule=...)  # doctest: +SKIP
        >>> [(entry["global_step"], entry["lr"]) for entry in guard.rollbacks]  # doctest: +SKIP
    """

    #: The Lightning namespace of the concrete class.
    lightning: ClassVar[Namespace]

    @property
    def state_key(self) -> str:
        """Where Lightning stores this guard's state: the class name, followed by the settings that differ from the
        defaults (``"NonFiniteGuard{'on_nonfinite': 'rollback'}"``); the class name alone for a default guard."""
        settings = {"on_nonfinite": self.on_nonfinite, "check_every_n_steps": self.check_every_n_steps,
                    "max_rollbacks": self.max_rollbacks, "lr_factor": self.lr_factor}
        defaults = {"on_nonfinite": "stop", "check_every_n_steps": 1, "max_rollbacks": 3, "lr_factor": 0.5}
        return settings_state_key(self, settings, defaults)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Take the guard state a checkpoint saved under another key (by lightning-cnet 0.2.0, or with other
        settings)."""
        if (key := adopt_saved_state(self, trainer.callbacks, NonFiniteGuardMixin, checkpoint)) is not None:
            self.lightning.rank_zero_info(f"{type(self).__name__}: restored the state saved under {key!r}")

    def __init__(
        self,
        on_nonfinite: OnNonFinite = "stop",
        *,
        max_rollbacks: int = 3,
        check_every_n_steps: int = 1,
        lr_factor: float = 0.5,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if on_nonfinite not in ("stop", "rollback"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not known: expected 'stop' or 'rollback'")
        check_integer("max_rollbacks", max_rollbacks)
        check_integer("check_every_n_steps", check_every_n_steps)
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, (int, float)) or not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor={lr_factor!r} must be a number in (0, 1] (0.5 halves the learning rate)")
        self.on_nonfinite = on_nonfinite
        self.max_rollbacks = max_rollbacks
        self.check_every_n_steps = check_every_n_steps
        self.lr_factor = float(lr_factor)
        self.verbose = verbose
        self.rollbacks: list[dict[str, Any]] = []
        self._snapshot: TrainingStateSnapshot | None = None
        self._snapshot_step = 0
        self._watched = WatchedTensors()
        self._batches = 0
        self._loss_finite: torch.Tensor | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse a second guard, and a rollback under a strategy that shards the parameters or the optimizer state."""
        if stage != "fit":
            return
        if others := others_of_kind(self, trainer.callbacks, NonFiniteGuardMixin):
            keys = ", ".join(guard.state_key for guard in [self, *others])
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__}: the Trainer has {len(others) + 1} guards ({keys}); each watches the same "
                "loss and tensors, so a second one acts again on a batch the first has handled (it stops on the loss "
                "of a batch a rollback skipped, or rolls back and lowers the learning rate a second time): keep one"
            )
        if self.on_nonfinite != "rollback":
            return
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if not names.intersection(ROLLBACK_STRATEGIES) or "FSDPStrategy" in names:
            raise self.lightning.MisconfigurationException(
                f"{type(self).__name__}(on_nonfinite='rollback') does not support strategy "
                f"{type(trainer.strategy).__name__}: it restores whole parameter and optimizer-state tensors, which "
                "sharding strategies split; use a single device or DDP, or on_nonfinite='stop'"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._snapshot = None
        self._watched = WatchedTensors()
        self._batches = 0
        self._loss_finite = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Before the first step and after a refinement replaced the tensors: snapshot the (checked) state."""
        if self.on_nonfinite != "rollback":
            return
        self._watch(trainer, pl_module, force=batch_idx == 0)
        if self._snapshot is not None:
            return
        found = self._nonfinite(trainer, pl_module, loss=None, gradients=False, folded_losses=False)
        if found:
            raise self._error(trainer, pl_module, found, f"before batch {batch_idx} of the epoch, with no earlier "
                              "state of these tensors to restore (start of training, or right after a refinement)")
        self._snapshot = TrainingStateSnapshot(pl_module, trainer.optimizers)
        self._snapshot_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Check the batch's loss and, every ``check_every_n_steps`` batches, the whole training state."""
        self._batches += 1
        loss = _loss_of(outputs)
        if self._batches % self.check_every_n_steps == 0:
            self._watch(trainer, pl_module, force=batch_idx == 0)
            self._check(trainer, pl_module, loss, f"after the optimizer step of batch {batch_idx} of the epoch")
        elif loss is not None:
            finite = loss.isfinite().all()
            self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Check before a validation run during fit (ModelCheckpoint saves at its end)."""
        if not getattr(trainer, "sanity_checking", False) and _fitting(trainer):
            self._watch(trainer, pl_module, force=True)
            self._check(trainer, pl_module, None, "before validation")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Check at the end of an epoch (ModelCheckpoint saves here when there is no validation)."""
        self._watch(trainer, pl_module, force=True)
        self._check(trainer, pl_module, None, "at the end of the epoch")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Refuse to let a checkpoint with a non-finite tensor be written (raises before the file is opened)."""
        named = [(f"state_dict.{key}", value) for key, value in checkpoint.get("state_dict", {}).items()
                 if is_float_tensor(value)]
        for index, optimizer_state in enumerate(checkpoint.get("optimizer_states", [])):
            for param_id, state in optimizer_state.get("state", {}).items():
                named.extend((f"optimizer_states[{index}].state[{param_id}][{key}]", value)
                             for key, value in state.items() if is_float_tensor(value))
        device = trainer.strategy.root_device
        bad = (~all_finite([tensor for _, tensor in named], device)).float()
        if not _reduced(trainer, bad).tolist()[0]:
            return
        names = nonfinite_names(named)
        if not _reduced(trainer, torch.tensor([float(bool(names))], device=device)).tolist()[0]:
            return  # the fused norm overflowed on finite tensors
        raise self._error(trainer, pl_module, {"checkpoint tensors": (names, len(named))},
                          "in the checkpoint about to be written, which was therefore not written; the state changed "
                          "after the last check (lower check_every_n_steps)", checkpoint=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The rollbacks done so far, so that ``max_rollbacks`` counts across a resume."""
        return {"rollbacks": [dict(entry) for entry in self.rollbacks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.rollbacks = [dict(entry) for entry in state_dict.get("rollbacks", [])]

    # ------------------------------------------------------------------ checking
    def _check(self, trainer: Any, pl_module: Any, loss: torch.Tensor | None, where: str) -> None:
        found = self._nonfinite(trainer, pl_module, loss, gradients=not _has_grad_scaler(trainer))
        if not found:
            if self.on_nonfinite == "rollback":
                self._keep(trainer, pl_module)
            return
        if self.on_nonfinite == "rollback" and len(self.rollbacks) < self.max_rollbacks and self._snapshot is not None:
            self._roll_back(trainer, pl_module, found, where)
            return
        restored = None
        if self.on_nonfinite == "rollback" and self._snapshot is not None:  # no rollback left: stop, but on good state
            self._snapshot.restore()
            for param in pl_module.parameters():
                param.grad = None
            restored = self._snapshot_step
        raise self._error(trainer, pl_module, found, where, restored_step=restored)

    def _watch(self, trainer: Any, pl_module: Any, force: bool) -> None:
        """Re-gather the watched tensors when needed; drop a snapshot that no longer matches the tensors."""
        gathered = self._watched.update(pl_module, trainer.optimizers, force=force)
        if gathered and self._snapshot is not None and not self._snapshot.matches(pl_module, trainer.optimizers):
            self._snapshot = None

    def _keep(self, trainer: Any, pl_module: Any) -> None:
        """Make the snapshot hold the state that just passed a check."""
        if self._snapshot is not None:
            self._snapshot.refresh()
        else:
            self._snapshot = TrainingStateSnapshot(pl_module, trainer.optimizers)
        self._snapshot_step = trainer.global_step

    def _nonfinite(self, trainer: Any, pl_module: Any, loss: torch.Tensor | None, gradients: bool,
                   folded_losses: bool = True) -> dict[str, tuple[list[str], int]]:
        """What is non-finite on any rank: category -> (the culprits' names on this rank, tensors checked);
        empty when everything is finite. ``folded_losses``: include (and reset) the losses of unchecked batches."""
        tensors = checked_tensors(self._watched, trainer.optimizers, gradients)
        device = tensors[0].device if tensors else trainer.strategy.root_device
        loss_finite = None
        if folded_losses:
            loss_finite, self._loss_finite = self._loss_finite, None
        if loss is not None:
            finite = loss.isfinite().all()
            loss_finite = finite if loss_finite is None else loss_finite & finite
        loss_finite = torch.ones((), dtype=torch.bool, device=device) if loss_finite is None else loss_finite.to(device)
        finite = torch.stack([loss_finite, all_finite(tensors, device)])
        if not _reduced(trainer, (~finite).float()).any().item():  # the one host sync of a passing check
            return {}
        # the fused norms may overflow on finite tensors: confirm exactly, tensor by tensor (failure path only)
        named = named_checked_tensors(pl_module, trainer.optimizers, gradients)
        local = {"loss": [] if bool(loss_finite) else ["loss"]}
        local.update((category, nonfinite_names(group)) for category, group in named.items())
        confirmed = _reduced(trainer, torch.tensor([float(bool(local[c])) for c in CATEGORIES], device=device))
        return {c: (local[c], len(named.get(c, [loss]))) for c, bad in zip(CATEGORIES, confirmed.tolist()) if bad}

    def _roll_back(self, trainer: Any, pl_module: Any, found: Findings, where: str) -> None:
        assert self._snapshot is not None
        self._snapshot.restore()
        for param in pl_module.parameters():
            param.grad = None
        before = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        schedulers = [config.scheduler for config in getattr(trainer, "lr_scheduler_configs", [])]
        scale_learning_rates(trainer.optimizers, schedulers, self.lr_factor)
        after = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        entry = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "found": list(found),
                 "restored_step": self._snapshot_step, "lr": [float(lr) for lr in after]}
        self.rollbacks.append(entry)
        if self.verbose:
            self.lightning.rank_zero_warn(
                f"{type(self).__name__}: {self._findings(found)} at epoch {entry['epoch']}, global step "
                f"{entry['global_step']} ({where}); restored the state of global step {entry['restored_step']}, "
                "skipped the batch "
                f"and scaled the learning rate {_lrs(before)} -> {_lrs(after)} (rollback {len(self.rollbacks)} of "
                f"{self.max_rollbacks})"
            )

    # ------------------------------------------------------------------ messages
    @staticmethod
    def _findings(found: Findings) -> str:
        def part(category: str, names: list[str], total: int) -> str:
            if category == "loss":
                return category
            if not names:
                return f"{category} (on another rank)"
            return f"{category} ({len(names)} of {total} tensors: {_listed(names)})"

        return "non-finite " + ", ".join(part(category, *found[category]) for category in found)

    def _error(self, trainer: Any, pl_module: Any, found: Findings, where: str, *,
               checkpoint: bool = False, restored_step: int | None = None) -> NonFiniteError:
        lines = [f"{type(self).__name__} stopped training at epoch {trainer.current_epoch}, global step "
                 f"{trainer.global_step} ({where}): {self._findings(found)}"]
        lines.append(f"resolution: {describe_resolution(pl_module)}")
        refinement = describe_last_refinement(trainer.callbacks)
        if refinement is not None:
            lines.append(refinement)
        if self.on_nonfinite == "rollback":
            lines.append(f"after {len(self.rollbacks)} rollbacks (max_rollbacks={self.max_rollbacks})")
        if restored_step is not None:
            lines.append(f"the model and optimizer hold the state of global step {restored_step} again (the last "
                         "that passed a check)")
        if not checkpoint:
            lines.append("no checkpoint was written from this state")
        remedies = ["lower the learning rate"]
        if not getattr(trainer, "gradient_clip_val", None):
            remedies.append("clip gradients (Trainer(gradient_clip_val=...))")
        if self.on_nonfinite == "stop":
            remedies.append(f"use {type(self).__name__}(on_nonfinite='rollback')")
        advice = remedies[0] if len(remedies) == 1 else ", ".join(remedies[:-1]) + " or " + remedies[-1]
        lines.append(advice + "; Trainer(detect_anomaly=True) names the operation that first produces a NaN in the "
                     "backward pass")
        return NonFiniteError("; ".join(lines), epoch=trainer.current_epoch, global_step=trainer.global_step,
                              found=list(found))


def _reduced(trainer: Any, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks (the identity on one device), as a 1-d tensor."""
    summed: torch.Tensor = trainer.strategy.reduce(values.reshape(-1), reduce_op="sum")
    return summed


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return getattr(fn, "value", fn) == "fit"


def _has_grad_scaler(trainer: Any) -> bool:
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None


def _lrs(values: Sequence[Any]) -> str:
    unique = list(dict.fromkeys(float(v) for v in values))
    return ", ".join(f"{v:.4g}" for v in unique)


__all__ = [
    "CATEGORIES",
    "NonFiniteError",
    "NonFiniteGuardMixin",
    "TrainingStateSnapshot",
    "all_finite",
    "describe_last_refinement",
    "describe_resolution",
    "nonfinite_names",
    "scale_learning_rates",
]
