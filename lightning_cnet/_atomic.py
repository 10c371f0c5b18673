"""Files replaced atomically: written to a temporary beside the final name, flushed to disk, then renamed.

A reader (or a resumed run) sees either the previous complete file or the new complete file, never a partial one:
the temporary lies in the same folder (a rename across file systems would be a copy), its data reaches the disk
before the rename (``fsync``), and the folder entry after it. A failure (a full disk, a write error, an interrupt)
removes the temporary and leaves the previous file untouched. A process killed mid-write cannot remove its
temporary; the name holds the writer's host and process id, so :func:`remove_stale_temporaries` can tell a dead
writer's leftovers from a live one's.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> replace_atomically(folder / "a.txt", lambda temporary: temporary.write_text("done")).read_text()
    'done'
    >>> [path.name for path in folder.iterdir()]
    ['a.txt']
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_cnet._namespace import lightning_class

#: ``.<final name>.<host>.<pid>.<random>.tmp``: a temporary of :func:`replace_atomically`.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[\w-]*)\.(?P<pid>\d+)\.\w+\.tmp$")


def _host() -> str:
    return re.sub(r"[^\w-]", "-", socket.gethostname())[:32]


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` and put the result at ``path`` atomically; parent folders are created.

    The file gets the permissions of a file opened as usual (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.

    Raises:
        whatever ``write`` or the file system raises (``OSError`` for a full disk); the temporary is removed and a
        previous file at ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        _fsync_file(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (not every platform or file system can open a folder: best effort)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_temporaries(folder: str | Path) -> list[Path]:
    """The temporaries of :func:`replace_atomically` in ``folder`` whose writer, on this host, no longer runs."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = _host()
    stale = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and match["host"] == host and not _alive(int(match["pid"])) and entry.is_file():
            stale.append(entry)
    return sorted(stale)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove what :func:`stale_temporaries` finds in ``folder``; return the removed paths."""
    removed = []
    for path in stale_temporaries(folder):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


# ---------------------------------------------------------------------- checkpoints
def is_local(path: Any) -> bool:
    """Whether ``path`` names a file on a local file system (no URL scheme other than ``file://``)."""
    text = str(path)
    return "://" not in text or text.startswith("file://")


def save_atomically(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """``torch.save(checkpoint, path)``, all or nothing (see the module docstring); stale temporaries of dead writers
    in the folder are removed first.

    Raises:
        OSError: the write failed (a full disk, no permission); ``path`` is as it was before.
    """
    path = Path(str(path).removeprefix("file://"))
    remove_stale_temporaries(path.parent)

    def write(temporary: Path) -> None:
        try:
            with temporary.open("wb") as handle:
                torch.save(checkpoint, handle)
        except RuntimeError as error:  # torch's zip writer reports a failed write as a RuntimeError
            cause = os_error_in(error)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from error

    return replace_atomically(path, write)


def os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error`` (its cause or context chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@lightning_class("AtomicCheckpointIO", base="plugins.TorchCheckpointIO", home="lightning_cnet.checkpoint_io")
class AtomicCheckpointIOMixin:
    """Lightning's ``TorchCheckpointIO`` whose local writes are atomic (see :mod:`lightning_cnet.checkpoint_io`):
    ``lightning_cnet.checkpoint_io.AtomicCheckpointIO`` for ``pytorch_lightning`` and ``lightning_fabric``,
    ``lightning_cnet.lightning.AtomicCheckpointIO`` for ``lightning.pytorch``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (remote paths: Lightning's own writer).

        Raises:
            TypeError: ``storage_options`` given (as Lightning's ``TorchCheckpointIO``).
            OSError: the write failed; the previous file at ``path`` is intact.
        """
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # type: ignore[misc]
            return
        save_atomically(checkpoint, path)
