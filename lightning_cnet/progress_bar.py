"""Progress bars of ``lightning-cnet``: counts as integers, and the rich bar readable in an 80-column terminal.

Lightning formats every progress-bar metric as a float (``n_steps: 8.000``, ``nfe: 48.00``) and its rich bar needs
about 85 columns before the first metric, so at 80 columns the metrics wrap over eight lines. These bars show:

* whole numbers as integers (``n_steps: 8``, ``nfe: 48``), other numbers with three decimals;
* a metric logged both per step and per epoch once, under its plain name, with its latest step value
  (``train_loss``), and without Lightning's ``v_num`` (the run directory names the version);
* (rich) a 10-character bar and the elapsed and remaining time as ``01:23<00:45``, which leaves the metrics about 38
  columns at 80: the main job's five metrics take two lines.

Example:
    >>> from pytorch_lightning import Trainer
    >>> trainer = Trainer(callbacks=[CompactRichProgressBar()])  # doctest: +SKIP
    >>> compact_metrics({"v_num": 0, "n_steps": 8.0, "train_loss_step": 0.41, "train_loss_epoch": 0.45})
    {'n_steps': '8', 'train_loss': 0.41}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

#: Width of the rich bar itself, in characters.
BAR_WIDTH = 10


def compact_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics as the bars of this module show them (see the module's docstring).

    Args:
        metrics: what Lightning's ``get_metrics`` gives (numbers, tensors already turned into numbers).
    """
    shown: dict[str, Any] = {}
    for name, value in metrics.items():
        if name == "v_num" or (name.endswith("_epoch") and f"{name[:-6]}_step" in metrics):
            continue
        if name.endswith("_step") and f"{name[:-5]}_epoch" in metrics:
            name = name[:-5]
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = str(int(value))
        shown[name] = value
    return shown


class CompactTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the metrics of :func:`compact_metrics`.

    Args:
        *args, **kwargs: those of :class:`~pytorch_lightning.callbacks.TQDMProgressBar`.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return compact_metrics(super().get_metrics(trainer, pl_module))


class CompactRichProgressBar(RichProgressBar):
    """Lightning's rich bar with the metrics of :func:`compact_metrics` and narrower columns (see the module).

    Args:
        *args, **kwargs: those of :class:`~pytorch_lightning.callbacks.RichProgressBar`.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return compact_metrics(super().get_metrics(trainer, pl_module))

    def configure_columns(self, trainer: pl.Trainer) -> list[Any]:
        from pytorch_lightning.callbacks.progress.rich_progress import BatchesProcessedColumn, CustomBarColumn
        from rich.progress import TextColumn

        return [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(bar_width=BAR_WIDTH, complete_style=self.theme.progress_bar,
                            finished_style=self.theme.progress_bar_finished,
                            pulse_style=self.theme.progress_bar_pulse),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            _elapsed_remaining_column()(style=self.theme.time),
        ]


def _clock(seconds: float | None) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour on); ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}" if hours else f"{minute:02d}:{second:02d}"


@functools.cache
def _elapsed_remaining_column() -> type:
    """The rich column class (made on first use: rich is an optional dependency)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ElapsedRemainingColumn(ProgressColumn):
        """Elapsed and remaining time of a task as ``01:23<00:45``."""

        max_refresh = 0.5  # as Lightning's time column: no jitter

        def __init__(self, style: Any) -> None:
            self.style = style
            super().__init__()

        def render(self, task: Any) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            return Text(f"{_clock(elapsed)}<{_clock(task.time_remaining)}", style=self.style)

    return ElapsedRemainingColumn
