"""Stop, or roll back, training as soon as the loss, a gradient, a parameter, a buffer or the optimizer state
stops being finite, and never write a checkpoint from such a state.

:class:`NonFiniteGuardMixin` holds all the logic using only torch types and duck typing, so the same code
serves ``pytorch_lightning`` (``lightning_cnet.callbacks.NonFiniteGuard``) and ``lightning.pytorch``
(``lightning_cnet.lightning.NonFiniteGuard``). The pieces it is built from are usable on their own:

* :func:`all_finite`: one fused reduction per device and dtype, no host synchronisation;
* :func:`nonfinite_names`: the exact, tensor-by-tensor answer (one synchronisation), for the failure path;
* :class:`TrainingStateSnapshot`: a copy of a module's parameters and buffers and of its optimizers' state,
  restored in place;
* :func:`scale_learning_rates`: scale the learning rate so that it sticks with the LR schedulers;
* :func:`describe_resolution` and :func:`describe_last_refinement`: what the stop message reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from lightning_cnet._validation import check_integer
from lightning_cnet.callbacks._instances import adopt_saved_state, others_of_kind, settings_state_key

if TYPE_CHECKING:
    from lightning_cnet._namespace import Namespace

OnNonFinite = Literal["stop", "rollback"]

#: What a check looks at, in the order the messages name them.
CATEGORIES = ("loss", "gradients", "parameters", "buffers", "optimizer state")
#: Strategy classes (and their subclasses) under which a rollback is supported: the parameters and the optimizer
#: state are whole tensors on each rank. Other strategies shard them; there the guard can only stop.
ROLLBACK_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
#: Names listed per category in a message.
SHOWN_NAMES = 3

_HALF_TYPES = (torch.float16, torch.bfloat16)


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


# ---------------------------------------------------------------------- finiteness
def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-d bool tensor on ``device`` (no host sync).

    One fused ``torch._foreach_norm`` per device and dtype: a NaN or an infinity in any element makes its
    tensor's 2-norm non-finite. A finite tensor whose 2-norm overflows reads as non-finite too, so a ``False``
    must be confirmed with :func:`nonfinite_names`; a ``True`` is exact.

    Args:
        tensors: floating-point tensors, on any devices.
        device: where the answer lives.

    Example:
        >>> all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])], torch.device("cpu"))
        tensor(False)
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    flags = []
    for (_, dtype), group in groups.items():
        norms = torch._foreach_norm(group, 2, dtype=torch.float32 if dtype in _HALF_TYPES else None)
        flags.append(torch.stack(norms).isfinite().all().to(device))
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def nonfinite_names(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity, checked element by element (one host sync).

    Example:
        >>> nonfinite_names([("a", torch.ones(2)), ("b", torch.tensor([float("nan")]))])
        ['b']
    """
    if not named_tensors:
        return []
    flags = torch.stack([tensor.isfinite().all().cpu() for _, tensor in named_tensors]).tolist()
    return [name for (name, _), finite in zip(named_tensors, flags) if not finite]


#: What a failed check found: category -> (names of the non-finite tensors on this rank, tensors checked).
Findings = Mapping[str, tuple[list[str], int]]


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_sparse


def _optimizer_params(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]


class _WatchedTensors:
    """A module's floating-point parameters and buffers, gathered by a walk over its submodules and re-gathered only
    when asked or when the optimizers' parameters change (a depth refinement replaces them): the walk costs more
    than the check itself."""

    def __init__(self) -> None:
        self.parameters: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self._optimizers: list[torch.optim.Optimizer] | None = None
        self._held: list[torch.Tensor] = []

    def update(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer], force: bool = False) -> bool:
        """Re-gather if ``force``, on the first call or if the optimizers or their parameters changed; return
        whether it did."""
        held = _optimizer_params(optimizers)
        if (not force and self._optimizers is not None and _same_objects(optimizers, self._optimizers)
                and _same_objects(held, self._held)):
            return False
        self.parameters = [p for p in module.parameters() if p.is_floating_point()]
        self.buffers = [b for b in module.buffers() if _is_float_tensor(b)]
        self._optimizers, self._held = list(optimizers), held
        return True


def _checked_tensors(watched: _WatchedTensors, optimizers: Sequence[torch.optim.Optimizer],
                     gradients: bool) -> list[torch.Tensor]:
    """The floating-point tensors of every checked category but the loss (the per-step path: no names)."""
    tensors = [p.grad for p in watched.parameters if _is_float_tensor(p.grad)] if gradients else []
    tensors.extend(p.detach() for p in watched.parameters)
    tensors.extend(watched.buffers)
    tensors.extend(value for optimizer in optimizers for state in optimizer.state.values()
                   for value in state.values() if _is_float_tensor(value))
    return tensors


def _named_checked_tensors(pl_module: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                           gradients: bool) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The checked tensors by category, with names, for the messages (the failure path)."""
    params = [(name, p) for name, p in pl_module.named_parameters() if p.is_floating_point()]
    return {
        "gradients": [(f"{name}.grad", p.grad) for name, p in params if _is_float_tensor(p.grad)] if gradients else [],
        "parameters": [(name, p.detach()) for name, p in params],
        "buffers": [(name, b) for name, b in pl_module.named_buffers() if _is_float_tensor(b)],
        "optimizer state": _named_state(optimizers, {id(p): name for name, p in params}),
    }


def _named_state(optimizers: Sequence[torch.optim.Optimizer],
                 names: Mapping[int, str]) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor of the optimizers' state, named ``<parameter>[<key>]``."""
    named = []
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if _is_float_tensor(value):
                    named.append((f"{names.get(id(param), 'unnamed parameter')}[{key}]", value))
    return named


# ---------------------------------------------------------------------- snapshot
class TrainingStateSnapshot:
    """A copy of a module's parameters and buffers and of its optimizers' per-parameter state.

    :meth:`restore` writes the copies back *in place*: the parameter, buffer and state tensors keep their
    identity, so optimizers, LR schedulers, gradient scalers and ``DistributedDataParallel`` keep working on the
    same objects. :meth:`refresh` copies the current values into the existing copies without allocating. The
    snapshot holds one copy of every parameter, buffer and optimizer state tensor.

    A snapshot belongs to the tensors it was taken from: when a refinement replaces the parameters by new
    (larger) ones, :meth:`matches` turns ``False`` and a new snapshot must be taken.

    Args:
        module: the module whose parameters and buffers are copied.
        optimizers: optimizers whose state is copied (their param groups must hold the module's parameters).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> sgd = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> snapshot = TrainingStateSnapshot(layer, [sgd])
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(float("nan"))
        >>> snapshot.restore()
        >>> bool(layer.weight.isfinite().all())
        True
    """

    def __init__(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self._tensors = [*module.parameters(), *module.buffers()]
        self._held = _optimizer_params(self.optimizers)
        with torch.no_grad():
            self._copies = [tensor.detach().clone() for tensor in self._tensors]
        self._states: list[dict[torch.Tensor, dict[str, Any]]] = [
            {param: _cloned(optimizer.state[param]) for param in _optimizer_params([optimizer])
             if optimizer.state.get(param)}
            for optimizer in self.optimizers
        ]

    def matches(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Whether ``module`` and ``optimizers`` still hold exactly the tensors and objects of this snapshot."""
        return (_same_objects([*module.parameters(), *module.buffers()], self._tensors)
                and _same_objects(optimizers, self.optimizers)
                and _same_objects(_optimizer_params(optimizers), self._held))

    def refresh(self) -> None:
        """Copy the current values into this snapshot (the objects must still :meth:`match`)."""
        with torch.no_grad():
            torch._foreach_copy_(self._copies, [tensor.detach() for tensor in self._tensors])
            for optimizer, saved in zip(self.optimizers, self._states):
                targets, sources = [], []
                for param in _optimizer_params([optimizer]):
                    live = optimizer.state.get(param)
                    if not live:
                        saved.pop(param, None)
                    elif _same_layout(saved.get(param), live):
                        for key, value in live.items():
                            if isinstance(value, torch.Tensor):
                                targets.append(saved[param][key])
                                sources.append(value)
                            else:
                                saved[param][key] = value
                    else:
                        saved[param] = _cloned(live)
                if targets:
                    torch._foreach_copy_(targets, sources)

    def restore(self) -> None:
        """Write the copies back in place: parameters, buffers and optimizer state as they were at the last
        :meth:`refresh` (or construction); optimizer state created since is dropped."""
        with torch.no_grad():
            torch._foreach_copy_([tensor.detach() for tensor in self._tensors], self._copies)
            for optimizer, saved in zip(self.optimizers, self._states):
                targets, sources = [], []
                for param in _optimizer_params([optimizer]):
                    kept = saved.get(param)
                    live = optimizer.state.get(param)
                    if not kept:
                        optimizer.state.pop(param, None)
                    elif _same_layout(kept, live):
                        for key, value in kept.items():
                            if isinstance(value, torch.Tensor):
                                targets.append(live[key])
                                sources.append(value)
                            else:
                                live[key] = value
                    else:
                        optimizer.state[param] = _cloned(kept)
                if targets:
                    torch._foreach_copy_(targets, sources)


def _cloned(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value.detach().clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def _same_layout(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two per-parameter states have the same keys, with tensors of the same shape, dtype and device."""
    if a is None or b is None or a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor) != isinstance(other, torch.Tensor):
            return False
        if isinstance(value, torch.Tensor) and (
            value.shape != other.shape or value.dtype != other.dtype or value.device != other.device
        ):
            return False
    return True


def _same_objects(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


# ---------------------------------------------------------------------- learning rate
def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.mul_(factor)
    return value * factor


def scale_learning_rates(optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any], factor: float) -> None:
    """Multiply the learning rate by ``factor`` so that it sticks with the LR schedulers.

    Every param group's ``lr`` and ``initial_lr`` is scaled, and every scheduler's ``base_lrs`` and ``_last_lr``
    (the values ``LRScheduler`` subclasses recompute the rate from, and report), in place. Chainable schedules
    (``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``CosineAnnealingLR`` with ``eta_min=0``) and closed-form
    ones (``LambdaLR``, ``OneCycleLR``, ``CosineAnnealingLR``) then continue from the scaled rate;
    ``ReduceLROnPlateau``'s ``min_lrs`` floor is left as it is.

    Example:
        >>> sgd = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.4)
        >>> cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=4)
        >>> scale_learning_rates([sgd], [cosine], 0.5)
        >>> sgd.param_groups[0]["lr"], cosine.base_lrs
        (0.2, [0.2])
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] = _scaled(group[key], factor)
    for scheduler in schedulers:
        for name in ("base_lrs", "_last_lr"):
            values = getattr(scheduler, name, None)
            if isinstance(values, list):
                values[:] = [_scaled(value, factor) for value in values]


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


def describe_resolution(module: nn.Module) -> str:
    """Per-stage ``n_steps``/``n_basis``/``scheme`` of the outermost submodules having a ``resolution``
    (duck-typed: StageResolution-like objects, such as :attr:`lightning_cnet.models.ContinuousNet.resolution`).

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
        described = ", ".join(f"n_steps={s.n_steps} n_basis={s.n_basis} {s.scheme}" for s in stages)
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
class NonFiniteGuardMixin:
    """Stop training, or roll it back, when the loss, a gradient, a parameter, a buffer or the optimizer state is
    not finite; never let a checkpoint be written from such a state.

    ``lightning_cnet.callbacks.NonFiniteGuard`` (``pytorch_lightning``) and ``lightning_cnet.lightning.NonFiniteGuard``
    (``lightning.pytorch``) are this logic mixed with each namespace's ``Callback``.

    Without it, a NaN trains on silently: every later step, refinement and evaluation runs on the NaN model
    (whose argmax predictions all fall in class 0), and ``ModelCheckpoint`` may keep a "best" checkpoint holding
    infinite BatchNorm statistics.

    What is checked, and when:

    * after every ``check_every_n_steps``-th training batch (``on_train_batch_end``): the loss, every gradient,
      every parameter, every floating-point buffer (BatchNorm running statistics) and every floating-point
      optimizer state tensor. The losses of the batches in between are folded into the next check on the device,
      so no batch's loss goes unseen. Gradients are skipped under a gradient scaler (``precision="16-mixed"``),
      which itself skips steps with non-finite gradients;
    * before every validation run during fit and at the end of every training epoch, the points at which
      ``ModelCheckpoint`` saves (Lightning runs checkpoint callbacks after all others);
    * in ``on_save_checkpoint``: every floating-point tensor of the checkpoint about to be written (model
      ``state_dict`` and optimizer states); a non-finite one raises :class:`NonFiniteError` in both modes, before
      anything is written. Lightning does not call this hook for ``ModelCheckpoint(save_weights_only=True)``, where
      only the two previous points protect the file.

    A check costs one fused reduction per device and dtype and one host synchronisation (under DDP one
    all-reduce of two numbers, so that every rank decides alike); the exact, tensor-by-tensor scan that names the
    culprits runs only when something is wrong. The check runs after the optimizer step, so by then a NaN loss
    has usually spread to the gradients, the parameters and the optimizer state; the message says how many
    tensors of each kind are affected. The parameters and buffers to check are gathered by a walk over the module
    (which costs more than the check) at the first batch of every epoch, at the epoch-level checks and whenever
    the optimizers' parameters change, as at a depth refinement; a tensor swapped in by other means in the middle
    of an epoch is watched from the next of these points on (``on_save_checkpoint`` always sees it).

    On a non-finite state:

    * ``on_nonfinite="stop"`` (default): raise :class:`NonFiniteError` (a ``RuntimeError``) with one message
      naming the epoch, the global step, what was non-finite (the first tensors by name), the model's resolution
      per stage (``n_steps``, ``n_basis``, scheme; read from any submodule with a ``resolution``) and the last depth
      refinement (read from a callback with a ``history``, such as ``DepthRefinementCallback``). The exception
      propagates out of ``trainer.fit``; Lightning calls the ``on_exception`` hooks, finalises the loggers as
      failed and tears the strategy down, and no checkpoint is written from the bad state (the check runs before
      ``ModelCheckpoint``'s hooks). Setting ``trainer.should_stop`` instead would let the epoch's validation and
      checkpoint run on the bad model and would be ignored before ``min_epochs``.
    * ``on_nonfinite="rollback"``: restore the last state that passed a check (parameters, buffers and optimizer
      state, copied back in place so the optimizer, the LR schedulers and DDP keep their objects), multiply the
      learning rate by ``lr_factor`` (each param group's ``lr`` and ``initial_lr`` and each scheduler's
      ``base_lrs``/``_last_lr``, so the schedule continues from the lower rate), drop the gradients and carry on
      with the next batch: the bad batch is skipped. After ``max_rollbacks`` rollbacks the next one stops as
      above, after restoring the last good state (the module and optimizer in memory are finite, for whoever
      catches the error). The rollbacks are kept in :attr:`rollbacks` and in checkpoints. Values the bad batch
      logged (its ``train_loss``) stay in the epoch's aggregates. Only single-device and DDP strategies are supported.

    Rollback memory: the guard keeps a snapshot, one copy of the model's parameters and buffers and of the
    optimizer state (with SGD and momentum about twice the parameter memory, with Adam three times), refreshed
    after every check that passes. A depth refinement replaces the parameters by new tensors, so a snapshot
    taken before it cannot be restored after it: the guard notices that the tensors changed and snapshots the
    refined state (after checking it) before the next step. ``on_nonfinite="stop"`` keeps no snapshot.

    Lightning's own tools, and how this differs:

    * ``Trainer(detect_anomaly=True)`` runs autograd's anomaly mode: it raises in the backward pass naming the
      operation that produced a NaN, at a large cost per step (it records a traceback for every operation: 1.6 to
      2.5 times the step time of ``cnet_cifar``/``cnet_digits`` on CPU in ``benchmarks/guard_overhead.py``, where
      the guard's hooks take 0.4-3% of a step), and it sees neither parameters nor BatchNorm statistics (which
      the forward pass updates). Use it to debug a divergence; the guard is cheap enough to leave on.
    * ``Trainer(gradient_clip_val=...)`` bounds the size of an update but does not detect anything: a NaN
      gradient stays NaN after clipping, and a run with a very large learning rate can still fill BatchNorm
      running statistics with infinities.
    * ``EarlyStopping(monitor=..., check_finite=True)`` looks at one logged metric when it is computed (at the
      end of an epoch or a validation run) and sets ``trainer.should_stop``: the epoch finishes on the bad model,
      whose checkpoint ``ModelCheckpoint`` may still write. It looks at neither parameters nor statistics and
      cannot roll back.

    Args:
        on_nonfinite: ``"stop"`` (raise :class:`NonFiniteError`) or ``"rollback"``.
        max_rollbacks: roll back at most this many times in a run (``on_nonfinite="rollback"``), then stop.
        check_every_n_steps: check gradients, parameters, buffers and optimizer state after every n-th training
            batch (the loss of every batch is checked at the next check).
        lr_factor: multiply the learning rate by this at each rollback, in ``(0, 1]``.
        verbose: warn (rank zero) at each rollback.

    One per Trainer: every guard watches the same loss and tensors, so a second one would act again on a batch the
    first has handled (stop on the loss of a batch a rollback skipped, or roll back and lower the learning rate a
    second time); it is refused at ``setup`` (two guards with the same settings, already by Lightning when the
    Trainer is built, as their :attr:`state_key` is the same). The guard resumes with the state a checkpoint saved
    under another key (written by lightning-cnet 0.2.0, or with other settings).

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
        self._watched = _WatchedTensors()
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
        self._watched = _WatchedTensors()
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
                 if _is_float_tensor(value)]
        for index, optimizer_state in enumerate(checkpoint.get("optimizer_states", [])):
            for param_id, state in optimizer_state.get("state", {}).items():
                named.extend((f"optimizer_states[{index}].state[{param_id}][{key}]", value)
                             for key, value in state.items() if _is_float_tensor(value))
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
        tensors = _checked_tensors(self._watched, trainer.optimizers, gradients)
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
        named = _named_checked_tensors(pl_module, trainer.optimizers, gradients)
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
    return trainer.strategy.reduce(values.reshape(-1), reduce_op="sum")


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
