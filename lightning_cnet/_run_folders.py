"""The folders a ``lightning-cnet`` run writes to: created and locked before the run, refused when another run uses
them, and removed again (only what the run created itself) when it fails on bad input.

:func:`claim` creates a run's missing folders and takes an advisory lock on each, so that a second run into the same
folder is refused in one line instead of mixing its checkpoints in; :func:`remove_unfinished` removes what a failed
run created and nothing else; :func:`refuse_used_checkpoint_folders` keeps a fresh fit out of a folder holding another
run's checkpoints.

Example:
    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp()) / "logs" / "version_0"
    >>> held = claim([run])
    >>> [path.name for path in held.created]
    ['logs', 'version_0']
    >>> remove_unfinished(held.created, held.folders); held.release(); run.parent.exists()
    False
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_cnet._atomic import is_local
from lightning_cnet._cli_common import UsageError

if TYPE_CHECKING:
    import pytorch_lightning as pl


class Claim:
    """The folders a run writes to, those of them (and above them) it created, and its locks on them."""

    def __init__(self, folders: list[Path], created: list[Path], locks: list[int]) -> None:
        self.folders = folders
        self.created = created
        self.locks = locks

    def release(self) -> None:
        """Release the locks (closing a descriptor releases its lock)."""
        for descriptor in self.locks:
            os.close(descriptor)
        self.locks = []


def checkpoint_folder(callback: Any, trainer: pl.Trainer) -> str:
    """Where a ModelCheckpoint writes: its ``dirpath``, or the folder Lightning derives from the first logger (as
    ``ModelCheckpoint`` does at setup); a string, so that a URL keeps its ``//``. ``callback``: a checkpoint callback
    with a ``dirpath`` (a ``ModelCheckpoint`` of either Lightning namespace)."""
    if callback.dirpath is not None:
        return str(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(str(save_dir), str(logger.name), version, "checkpoints")
    return os.path.join(str(trainer.default_root_dir), "checkpoints")


def run_folders(trainer: pl.Trainer, *, fit: bool) -> list[Path]:
    """The local folders a run writes into: its log folder, and in ``fit`` its checkpoint folders (remote ones, such
    as ``s3://...``, are neither created nor locked)."""
    folders = [trainer.log_dir] if trainer.log_dir else []
    if fit:
        folders += [checkpoint_folder(cb, trainer) for cb in trainer.checkpoint_callbacks]
    return list(dict.fromkeys(Path(folder).absolute() for folder in folders if is_local(folder)))


def _directories_to_be_created(folders: Sequence[Path]) -> list[Path]:
    """The folders among ``folders`` and above them that do not exist yet, parents first."""
    missing: list[Path] = []
    for folder in folders:
        path, chain = Path(folder).absolute(), []
        while not path.exists() and path not in missing and path not in chain:
            chain.append(path)
            path = path.parent
        missing += reversed(chain)
    return missing


def claim(folders: list[Path]) -> Claim:
    """Create the run's missing folders (what this call creates is the run's own: another process creating the same
    folder first makes it not ours) and lock each folder; a folder locked by another run is refused.

    Raises:
        UsageError: a folder cannot be created, or another lightning-cnet run is writing to one of them (of what this
            call created, only folders still empty are removed then).
    """
    created: list[Path] = []
    for directory in _directories_to_be_created(folders):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            remove_unfinished(created, [])
            raise UsageError(f"{shown(directory)}: cannot create the run's folder ({error.strerror})") from None
        created.append(directory)
    held = Claim(folders, created, [])
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        return held
    for folder in folders:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            held.release()
            for directory in reversed(created):  # only if still empty: the other run may be about to use them
                try:
                    directory.rmdir()
                except OSError:
                    pass
            raise UsageError(f"{shown(folder)} is in use by another lightning-cnet run: wait for it to end, or give "
                             "this run its own folder (--trainer.logger.init_args.version, --checkpoint.dirpath)"
                             ) from None
        held.locks.append(descriptor)
    return held


def slurm_resume_path(trainer: pl.Trainer) -> str | None:
    """The checkpoint Lightning resumes a SLURM job from (``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``), if any.

    Lightning keeps this lookup private (``_CheckpointConnector._hpc_resume_path``, used by ``fit`` when no
    ``ckpt_path`` is given under SLURM) and offers no public equivalent; this is its one adapter here. Should the
    name go away, a fit is no longer let into a folder holding checkpoints on that ground alone, and
    ``tests/test_lightning_private_names.py`` fails.
    """
    connector = getattr(trainer, "_checkpoint_connector", None)
    return getattr(connector, "_hpc_resume_path", None)


def refuse_used_checkpoint_folders(trainer: pl.Trainer, ckpt_path: str | None) -> None:
    """A fit that does not resume must not write into a checkpoint folder that holds another run's checkpoints
    (``last.ckpt`` would be replaced, best checkpoints mixed).

    Raises:
        UsageError: such a folder, unless the fit resumes (``--ckpt_path``, or Lightning's SLURM ``hpc_ckpt``).
    """
    if ckpt_path or slurm_resume_path(trainer):
        return
    for callback in trainer.checkpoint_callbacks:
        if not is_local(checkpoint_folder(callback, trainer)):
            continue
        folder = Path(checkpoint_folder(callback, trainer))
        found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        if found:
            resume = folder / "last.ckpt" if (folder / "last.ckpt").is_file() else found[-1]
            raise UsageError(f"{shown(folder)} already holds checkpoints of another run: resume it with --ckpt_path "
                             f"{shown(resume)}, or give this run its own folder (--checkpoint.dirpath)")


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it (shorter messages), else absolute."""
    relative = os.path.relpath(Path(path).absolute())
    return str(Path(path).absolute()) if relative.startswith("..") else relative


def remove_unfinished(created: Sequence[Path], folders: Sequence[Path]) -> None:
    """After a failure on bad input, remove what the run created and nothing else: its own run folders (unless it
    saved a checkpoint there), then the folders it created above them if they are empty (another run may have put
    its own folder inside)."""
    run_folders = {Path(folder).absolute() for folder in folders}
    for directory in reversed(list(created)):
        if not directory.is_dir():
            continue
        if directory in run_folders:
            if not any(directory.rglob("*.ckpt")):
                shutil.rmtree(directory, ignore_errors=True)
        else:
            try:
                directory.rmdir()
            except OSError:  # not empty: someone else's files are inside
                pass


__all__ = ["Claim", "checkpoint_folder", "claim", "refuse_used_checkpoint_folders", "remove_unfinished",
           "run_folders", "shown", "slurm_resume_path"]
