"""A progress bar of the studies that counts work, not items: residual evaluations times images ("FE").

A fine reference costs as much as dozens of coarse rows; counting rows made the bar's estimate wrong from the start.
Each forward pass adds ``function_evaluations x images`` (at least one per image, for the stages-off baseline).

Example:
    >>> bar = work_bar(10, "demo", enabled=False)
    >>> add_work(bar, 5)
    >>> bar.total
    15
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def work_bar(total: float, desc: str, *, enabled: bool) -> Any:
    """A tqdm bar over ``total`` units of work, shown as ``1.2M/4.5M FE``.

    Args:
        total: the work planned so far (:func:`add_work` adds more, e.g. a reference chosen on the way).
        desc: what is being done.
        enabled: show it.
    """
    return tqdm(total=total, desc=desc, unit="FE", unit_scale=True, disable=not enabled, dynamic_ncols=True)


def add_work(bar: Any, amount: float) -> None:
    """Add ``amount`` to the bar's total (work decided after the bar was made)."""
    bar.total += amount
    bar.refresh()


def pass_work(model: Any, images: int) -> int:
    """The work of one forward pass of ``images`` images through ``model`` at its current manifestation."""
    return max(1, int(getattr(model, "function_evaluations", 1))) * images
