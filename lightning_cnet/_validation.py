"""Range checks for values that torch or Lightning accept at construction and reject only mid-run (a negative
learning rate fails when the optimizer is built, a label smoothing of 2 at the first step), so that a mistake is one
line before anything is written.

Each check is keyed by the argument's name, so the classifier and the command line share one table.

Example:
    >>> check_ranges(TRAINING_RANGES, {"lr": 0.1, "label_smoothing": 0.0})
    >>> check_ranges(TRAINING_RANGES, {"lr": -1})
    Traceback (most recent call last):
    ...
    ValueError: lr=-1 is not valid: expected a finite number >= 0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

#: name -> (test, what is expected)
Ranges = Mapping[str, tuple[Callable[[Any], bool], str]]


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


#: Hyperparameters of the classifier (and LightningCLI's model section).
TRAINING_RANGES: Ranges = {
    "lr": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "momentum": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "gamma": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "milestones": (lambda v: v is None or (isinstance(v, (list, tuple)) and all(_integer(m) and m >= 0 for m in v)),
                   "a list of epochs >= 0"),
}

#: Trainer arguments Lightning 2.6 accepts at construction and fails on (or silently misreads) during the run; the
#: others it checks itself when the Trainer is built.
TRAINER_RANGES: Ranges = {
    "min_epochs": (lambda v: v is None or (_integer(v) and v >= 0), "None or an integer >= 0"),
    "min_steps": (lambda v: v is None or (_integer(v) and v >= 0), "None or an integer >= 0"),
    "check_val_every_n_epoch": (lambda v: v is None or (_integer(v) and v >= 1), "None or an integer >= 1"),
    "accumulate_grad_batches": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "log_every_n_steps": (lambda v: v is None or (_integer(v) and v >= 1), "None or an integer >= 1"),
    "num_sanity_val_steps": (lambda v: v is None or (_integer(v) and v >= -1), "None, -1 (all) or an integer >= 0"),
    "gradient_clip_val": (lambda v: v is None or (_number(v) and v >= 0), "None or a finite number >= 0"),
    "val_check_interval": (lambda v: v is None or (_integer(v) and v >= 1) or (_number(v) and 0 < v <= 1),
                           "None, an integer >= 1 (batches) or a fraction in (0, 1]"),
}


def check_ranges(ranges: Ranges, values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first value of ``values`` outside its range in ``ranges``.

    Args:
        ranges: the table (e.g. :data:`TRAINING_RANGES`).
        values: argument name -> value; names the table does not know are not checked.
        prefix: put before the name in the message (e.g. ``"trainer."``).
    """
    for name, value in values.items():
        if name in ranges:
            valid, expected = ranges[name]
            if not valid(value):
                raise ValueError(f"{prefix}{name}={value!r} is not valid: expected {expected}")


def check_integer(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (``bool`` is not) ``>= minimum``, or ``None`` when
    ``optional``; the one wording of every integer check of the package.

    Args:
        name: the argument's name, as the caller spells it (``"n_steps"``, ``"trainer.max_epochs"``).
        value: the value given.
        minimum: the smallest value accepted.
        optional: accept ``None`` too.

    Example:
        >>> check_integer("n_steps", 4)
        >>> check_integer("n_steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: n_steps=0 is not valid: expected an integer >= 1
        >>> check_integer("seed", None, minimum=0, optional=True)
    """
    if optional and value is None:
        return
    if not (_integer(value) and value >= minimum):
        expected = f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} is not valid: expected {'None or ' if optional else ''}{expected}")
