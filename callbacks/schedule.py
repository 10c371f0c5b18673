"""When to refine: a schedule of epochs, or a plateau of a monitored metric, turned into a target level per epoch.

The level is the number of refinements the model should have received by the *start* of an epoch.
Comparing it with the level the model actually has (read from its resolution) makes resuming from any
checkpoint neither repeat nor skip a refinement. :class:`RefinementSchedule` holds epochs given in advance;
:class:`PlateauSchedule` decides them during training from a validation metric.

Example:
    >>> schedule = RefinementSchedule([2, 0.5])
    >>> schedule.resolve(max_epochs=10)
    >>> [schedule.target_level(epoch) for epoch in range(7)]
    [0, 0, 1, 1, 1, 2, 2]
    >>> RefinementSchedule(lambda epoch: epoch in (1, 3), max_refinements=1).target_level(5)
    1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from lightning_cnet._validation import check_integer

RefineAt = int | float | Sequence[int | float] | Callable[[int], bool]
"""An epoch, a fraction of ``max_epochs``, a list of them, or a callable ``epoch -> bool``."""


def _check_entry(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"refine_at entry {value!r} is not an epoch: expected an int >= 0 or a float in (0, 1)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"refine_at entry {value} is negative: epochs are counted from 0")
        return value
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"refine_at entry {value!r} is not an integer epoch: a float must be a fraction of max_epochs in (0, 1)"
        )
    return value


class RefinementSchedule:
    """A validated refinement schedule with optional caps.

    Args:
        refine_at: epochs (0-based ints, strictly increasing), fractions of ``max_epochs`` (floats in
            ``(0, 1)``, resolved to ``int(fraction * max_epochs)`` by :meth:`resolve`), or a callable
            ``epoch -> bool`` asked once per epoch.
        max_refinements: stop after this many refinements (``None``: no cap).

    Raises:
        ValueError: a negative, non-integer, duplicated or unsorted epoch, or a negative cap.
    """

    def __init__(self, refine_at: RefineAt, *, max_refinements: int | None = None) -> None:
        check_integer("max_refinements", max_refinements, minimum=0, optional=True)
        self.max_refinements = max_refinements
        self._callable: Callable[[int], bool] | None = None
        self._entries: list[int | float] = []
        self._epochs: list[int] | None = None
        if callable(refine_at):
            self._callable = refine_at
            return
        if not isinstance(refine_at, (int, float, list, tuple)):
            raise ValueError(
                f"refine_at={refine_at!r} is not a schedule: expected an epoch, a fraction of max_epochs, a list of "
                "them, or a callable epoch -> bool"
            )
        entries = [refine_at] if isinstance(refine_at, (int, float)) else list(refine_at)
        self._entries = [_check_entry(value) for value in entries]
        epochs = [value for value in self._entries if isinstance(value, int)]
        if len(epochs) == len(self._entries):
            self._epochs = self._checked_order(epochs)

    @staticmethod
    def _checked_order(epochs: list[int], source: Sequence[int | float] | None = None) -> list[int]:
        for previous, current in zip(epochs, epochs[1:]):
            if current <= previous:
                shown = f" (resolved from {list(source)})" if source is not None else ""
                raise ValueError(
                    f"refine_at={epochs}{shown} is not strictly increasing: list each refinement epoch once, in order"
                )
        return list(epochs)

    @property
    def needs_max_epochs(self) -> bool:
        """Whether fractions of ``max_epochs`` still have to be resolved."""
        return self._epochs is None and self._callable is None

    def resolve(self, max_epochs: int | None, error: type[Exception] = ValueError) -> None:
        """Turn fractions into epochs.

        Args:
            max_epochs: the Trainer's ``max_epochs``.
            error: the exception class raised when fractions meet no finite ``max_epochs`` (a callback passes its
                Lightning namespace's ``MisconfigurationException``).

        Raises:
            error: fractions with no finite ``max_epochs``.
            ValueError: the resolved epochs are not strictly increasing.
        """
        if not self.needs_max_epochs:
            return
        if max_epochs is None or max_epochs < 1:
            raise error(
                f"refine_at={self._entries} holds fractions of max_epochs but the Trainer has max_epochs={max_epochs}; "
                "set Trainer(max_epochs=...) or give refine_at as epochs"
            )
        resolved = [value if isinstance(value, int) else int(value * max_epochs) for value in self._entries]
        self._epochs = self._checked_order(resolved, self._entries)

    @property
    def epochs(self) -> list[int] | None:
        """The resolved refinement epochs (``None`` for a callable schedule)."""
        return None if self._epochs is None else list(self._epochs)

    def scheduled_count(self, epoch: int) -> int:
        """Refinements scheduled at or before ``epoch``, before any cap."""
        if self._callable is not None:
            return sum(1 for past in range(epoch + 1) if self._callable(past))
        if self._epochs is None:
            raise RuntimeError("the schedule holds fractions of max_epochs: call resolve(max_epochs) first")
        return sum(1 for scheduled in self._epochs if scheduled <= epoch)

    def target_level(self, epoch: int, cap: float = math.inf) -> int:
        """Refinements the model should have at the start of ``epoch``, after ``max_refinements`` and ``cap``."""
        limit = min(cap, math.inf if self.max_refinements is None else self.max_refinements)
        return int(min(self.scheduled_count(epoch), limit))

    def __repr__(self) -> str:
        shown = self._callable if self._callable is not None else (self._epochs or self._entries)
        return f"RefinementSchedule({shown!r}, max_refinements={self.max_refinements})"



class PlateauSchedule:
    """A schedule that decides for itself: refine when a monitored metric has stopped improving.

    :class:`~lightning_cnet.callbacks.DepthRefinementCallback` hands it the metric ``monitor`` from
    ``trainer.callback_metrics`` after every validation run (not the sanity check), as Lightning's ``EarlyStopping``
    reads it. A value better than the best one seen by more than ``min_delta`` is an improvement. After ``patience``
    validation runs in a row without one, the schedule decides to refine at the start of the next epoch; it then
    ignores ``cooldown`` further validation runs (the refined model settles) and counts anew, keeping the best value
    seen. The decisions are epochs, saved with the callback's state, so a resumed run refines where the uninterrupted
    one did; under DDP, rank 0's state is broadcast to every rank after each validation, so all ranks refine
    together.

    Args:
        monitor: the logged metric, e.g. ``"val_acc"`` or ``"val_loss"``.
        mode: ``"max"`` (higher is better) or ``"min"``.
        patience: validation runs without improvement that trigger a refinement (>= 1).
        min_delta: the smallest change that counts as an improvement (>= 0, in the metric's units).
        cooldown: validation runs ignored after each refinement (>= 0).
        max_refinements: decide at most this many refinements (``None``: no cap besides the callback's
            ``max_n_steps``).

    Raises:
        ValueError: a bad argument.

    Example:
        >>> schedule = PlateauSchedule("val_acc", patience=2, min_delta=0.01)
        >>> [schedule.observe(epoch, acc) for epoch, acc in enumerate([0.80, 0.85, 0.855, 0.858, 0.90])]
        [False, False, False, True, False]
        >>> schedule.epochs, [schedule.target_level(epoch) for epoch in range(6)]
        ([4], [0, 0, 0, 0, 1, 1])
    """

    def __init__(
        self,
        monitor: str = "val_acc",
        *,
        mode: str = "max",
        patience: int = 1,
        min_delta: float = 0.0,
        cooldown: int = 0,
        max_refinements: int | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} must be the name of a logged metric")
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} is not known: expected 'max' or 'min'")
        check_integer("patience", patience, minimum=1)
        check_integer("cooldown", cooldown, minimum=0)
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ValueError(f"min_delta={min_delta!r} must be a number >= 0")
        check_integer("max_refinements", max_refinements, minimum=0, optional=True)
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.cooldown = cooldown
        self.max_refinements = max_refinements
        self.best: float | None = None
        self.wait = 0
        self.cooling = 0
        self.decisions: list[int] = []

    # ------------------------------------------------------------------ the schedule's interface
    needs_max_epochs = False

    def resolve(self, max_epochs: int | None, error: type[Exception] = ValueError) -> None:
        """Nothing to resolve: the epochs are decided during training."""

    @property
    def epochs(self) -> list[int]:
        """The epochs at whose start a refinement was decided so far."""
        return list(self.decisions)

    def target_level(self, epoch: int, cap: float = math.inf) -> int:
        """Refinements decided for the start of ``epoch`` or earlier, at most ``cap``."""
        return int(min(sum(1 for decided in self.decisions if decided <= epoch), cap))

    # ------------------------------------------------------------------ decisions
    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def observe(self, epoch: int, value: float) -> bool:
        """Take the metric of a validation run during ``epoch``; return whether a refinement was decided for the start
        of ``epoch + 1``.

        A run during an epoch that already waits for a decided refinement, or beyond ``max_refinements``, changes
        nothing; a NaN never improves.
        """
        if (self.decisions and self.decisions[-1] > epoch) or (
                self.max_refinements is not None and len(self.decisions) >= self.max_refinements):
            return False
        value = float(value)
        improved = value == value and self._improved(value)  # NaN != NaN: never an improvement
        if improved:
            self.best = value
        if self.cooling:
            self.cooling -= 1
            return False
        if improved:
            self.wait = 0
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        self.decisions.append(epoch + 1)
        self.wait, self.cooling = 0, self.cooldown
        return True

    def update(self, trainer: Any) -> None:
        """Observe ``trainer.callback_metrics[monitor]`` after a validation run, then take rank 0's state on every rank.

        Raises:
            RuntimeError: the validation logged no ``monitor``.
        """
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise RuntimeError(f"PlateauSchedule monitors {self.monitor!r}, which validation did not log; logged: "
                               f"{', '.join(sorted(metrics)) or 'nothing'}")
        self.observe(trainer.current_epoch, float(metrics[self.monitor]))
        self.load_state_dict(trainer.strategy.broadcast(self.state_dict(), src=0))

    def check_trainer(self, trainer: Any, error: type[Exception]) -> None:
        """Raise ``error`` if the Trainer never validates (a plateau schedule would never refine)."""
        if trainer.limit_val_batches == 0:
            raise error(f"PlateauSchedule({self.monitor!r}) decides after validation runs, but the Trainer has "
                        "limit_val_batches=0: validate, or give refine_at as epochs")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The decisions and the counters they depend on."""
        return {"best": self.best, "wait": self.wait, "cooling": self.cooling, "decisions": list(self.decisions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.best = state["best"]
        self.wait, self.cooling = int(state["wait"]), int(state["cooling"])
        self.decisions = [int(epoch) for epoch in state["decisions"]]

    def __repr__(self) -> str:
        return (f"PlateauSchedule({self.monitor!r}, mode={self.mode!r}, patience={self.patience}, "
                f"min_delta={self.min_delta}, cooldown={self.cooldown}, max_refinements={self.max_refinements}, "
                f"decisions={self.decisions})")
