"""Checkpoints that are complete or absent: Lightning's ``CheckpointIO`` plugin, writing every local checkpoint to a
temporary in its own folder, flushing it to disk and renaming it into place.

Lightning's ``TorchCheckpointIO`` (2.6) writes through an ``fsspec`` transaction whose temporary lies in ``$TMPDIR``;
when that is another file system, the commit *copies* into the final name, so a full disk leaves a truncated
``last.ckpt`` or ``best-...ckpt`` where the previous complete one was. :class:`AtomicCheckpointIO` writes beside the
final name instead (:func:`~lightning_cnet._atomic.replace_atomically`): a failed write raises and leaves the previous
file intact and no temporary behind; temporaries of writers killed mid-write (SIGKILL, a power cut) are removed the
next time a checkpoint is written to that folder. Remote paths (``s3://``, ``gs://``, ...) keep Lightning's own
behaviour.

``lightning-cnet`` uses it by default (its trainer defaults' ``plugins``). With your own Trainer::

    from lightning_cnet.checkpoint_io import AtomicCheckpointIO
    trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], ...)

(``lightning_cnet.lightning.AtomicCheckpointIO`` for ``lightning.pytorch``.)

Example:
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(2)}, f"{folder}/last.ckpt")
    >>> torch.load(f"{folder}/last.ckpt", weights_only=True)["weights"]
    tensor([1., 1.])
"""

from __future__ import annotations

from lightning_cnet._atomic import AtomicCheckpointIOMixin, is_local, save_atomically
from lightning_cnet._namespace import module_getattr, registered_names

#: ``AtomicCheckpointIO``, made concrete on first access (:mod:`lightning_cnet._namespace`).
__getattr__ = module_getattr(__name__)

__all__ = [*registered_names(__name__), "AtomicCheckpointIOMixin", "is_local", "save_atomically"]
