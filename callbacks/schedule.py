"""When to refine: a schedule of epochs turned into a target refinement level per epoch.

The level is the number of refinements the model should have received by the *start* of an epoch.
Comparing it with the level the model actually has (read from its resolution) makes resuming from any
checkpoint neither repeat nor skip a refinement.

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
        if max_refinements is not None and (
            isinstance(max_refinements, bool) or not isinstance(max_refinements, int) or max_refinements < 0
        ):
            raise ValueError(f"max_refinements={max_refinements!r} must be None or an integer >= 0")
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
        if all(isinstance(value, int) for value in self._entries):
            self._epochs = self._checked_order(self._entries)

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

