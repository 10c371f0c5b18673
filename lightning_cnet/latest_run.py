"""``lightning_logs/<name>/latest``: a link to the newest training run, so that fixed paths name it on every run.

Each ``lightning-cnet fit`` writes to a new ``version_<n>`` folder; paths such as
``lightning_logs/hard_digits/version_0/checkpoints/last.ckpt`` name the first run only.
:class:`LatestRunLink` points ``latest`` beside the version folders at the run that is training (a relative
symbolic link, replaced atomically when training starts, after a checkpoint given to ``fit`` was read), so
``lightning_logs/hard_digits/latest/checkpoints/last.ckpt`` is the newest run's, on a second run too.

Example:
    >>> trainer = pl.Trainer(callbacks=[LatestRunLink()])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

#: Name of the link, beside the ``version_<n>`` folders.
LINK_NAME = "latest"


def point_latest_at(run: Path) -> Path | None:
    """Make ``run.parent / "latest"`` a link to ``run`` (relative, replaced atomically).

    Returns:
        The link, or ``None`` where there is none to make: ``run`` is itself called ``latest``, or ``latest`` is a
        real folder or file (left alone).

    Raises:
        OSError: the platform or the file system refuses symbolic links.
    """
    link = run.parent / LINK_NAME
    if run.name == LINK_NAME or (link.exists() and not link.is_symlink()):
        return None
    run.parent.mkdir(parents=True, exist_ok=True)
    temporary = run.parent / f".{LINK_NAME}.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run.name, target_is_directory=True)
    os.replace(temporary, link)
    return link


class LatestRunLink(pl.Callback):
    """Point ``<save_dir>/<name>/latest`` at the log directory of the run when its training starts.

    Nothing happens without a logger, on ranks other than 0, or where symbolic links are refused (one warning).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.logger is None or trainer.log_dir is None:
            return
        try:
            point_latest_at(Path(trainer.log_dir))
        except OSError as error:
            rank_zero_warn(f"could not link {Path(trainer.log_dir).parent / LINK_NAME} to the run: {error}")
