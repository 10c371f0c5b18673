"""Read one logged scalar back from a run: Lightning's ``metrics.csv`` (CSVLogger) or TensorBoard event files.

:func:`read_scalars` returns the series of one tag, keyed by epoch when the log holds at most one value of it per
epoch (epoch-level metrics such as ``val_acc``) and by global step otherwise (step-level metrics such as
``train_loss_step``, or validation run several times per epoch). Lightning records the epoch next to every
logged value (the ``epoch`` column of ``metrics.csv``, the ``epoch`` scalar of TensorBoard at the same step).

Example:
    >>> read_scalars("lightning_logs/digits/version_0", "val_acc")  # doctest: +SKIP
    [(0, 0.71), (1, 0.86), (2, 0.9)]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

__all__ = ["read_scalars"]

CSV_NAME = "metrics.csv"
EVENT_FILE_MARK = "tfevents"


def read_scalars(run_dir_or_file: str | Path, tag: str) -> list[tuple[int, float]]:
    """The values logged under ``tag``, as ``(epoch_or_step, value)`` sorted by the first entry.

    Args:
        run_dir_or_file: a run directory (``metrics.csv`` is read if present, else its TensorBoard event files),
            a ``metrics.csv`` file or one event file (``events.out.tfevents.*``).
        tag: the metric's name, e.g. ``"val_acc"``.

    Returns:
        ``(epoch, value)`` pairs when the log holds at most one value of ``tag`` per epoch, else
        ``(global_step, value)`` pairs; where the same key was written twice (a resumed run), the later value.

    Raises:
        FileNotFoundError: the path does not exist or holds neither ``metrics.csv`` nor event files.
        ValueError: ``tag`` is not in the log (the message lists the tags that are).
        ImportError: event files need the ``tensorboard`` package.
    """
    path = Path(run_dir_or_file)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: expected a run directory, a {CSV_NAME} or an event file")
    if path.is_dir():
        if (path / CSV_NAME).is_file():
            path = path / CSV_NAME
        elif not any(EVENT_FILE_MARK in child.name for child in path.iterdir()):
            raise FileNotFoundError(f"{path} holds neither {CSV_NAME} nor TensorBoard event files (*tfevents*)")
    rows = _csv_rows(path, tag) if path.suffix == ".csv" else _event_rows(path, tag)
    return _keyed(rows)


def _csv_rows(path: Path, tag: str) -> list[tuple[int | None, int, float]]:
    """``(epoch, step, value)`` of every row of a CSVLogger file where ``tag`` has a value, in file order."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if tag not in fields:
            raise ValueError(f"{path} has no column {tag!r}: expected one of "
                             f"{sorted(f for f in fields if f not in ('epoch', 'step'))}")
        rows = []
        for line, row in enumerate(reader):
            if row.get(tag) in (None, ""):
                continue
            epoch = row.get("epoch")
            step = row.get("step")
            rows.append((None if epoch in (None, "") else int(float(epoch)),
                         line if step in (None, "") else int(float(step)), float(row[tag])))
    return rows


def _event_rows(path: Path, tag: str) -> list[tuple[int | None, int, float]]:
    """``(epoch, step, value)`` of every scalar ``tag`` in one event file or the event files of a directory."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError as error:
        raise ImportError(f"reading TensorBoard event files ({path}) needs tensorboard (pip install tensorboard)"
                          ) from error
    accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    accumulator.Reload()
    tags = accumulator.Tags().get("scalars", [])
    if tag not in tags:
        raise ValueError(f"{path} has no scalar {tag!r}: expected one of {sorted(t for t in tags if t != 'epoch')}")
    epochs = accumulator.Scalars("epoch") if "epoch" in tags else []
    epoch_at = {event.step: int(round(event.value)) for event in epochs}
    return [(epoch_at.get(event.step), event.step, float(event.value)) for event in accumulator.Scalars(tag)]


def _keyed(rows: Iterable[tuple[int | None, int, float]]) -> list[tuple[int, float]]:
    rows = [row for row in rows if not math.isnan(row[2])]
    epochs = [epoch for epoch, _, _ in rows]
    by_epoch = all(epoch is not None for epoch in epochs) and len(set(epochs)) == len(epochs)
    series: dict[int, float] = {}
    for epoch, step, value in rows:
        series[epoch if by_epoch and epoch is not None else step] = value
    return sorted(series.items())
