"""Writing study outputs: never a half-written file, and a clear error for an unwritable folder before any work."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning_cnet._atomic import replace_atomically


def check_writable(directory: str | Path) -> Path:
    """Raise ``ValueError`` unless ``directory`` exists as a writable folder or could be created; nothing is made.

    Returns:
        The directory as a ``Path``.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{directory}: cannot write there, {existing} is a file, not a folder")
    try:  # the only reliable test (permissions, read-only or virtual file systems): make and remove a folder
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as error:
        raise ValueError(f"{directory}: cannot write there ({error.strerror})") from None
    return directory


class Written:
    """The files and folders a command created (:func:`recording`), so that a failure can remove them again."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self.folders: list[Path] = []

    def remove_all(self) -> None:
        """Remove the files, then the folders if they are empty (never anything that was there before)."""
        for path in reversed(self.files):
            path.unlink(missing_ok=True)
        for folder in reversed(self.folders):
            try:
                folder.rmdir()
            except OSError:
                pass
        self.files, self.folders = [], []


_recording: list[Written] = []


@contextmanager
def recording() -> Iterator[Written]:
    """Record what :func:`write_atomically` creates inside the block."""
    written = Written()
    _recording.append(written)
    try:
        yield written
    finally:
        _recording.remove(written)


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``, so a failure leaves no partial file.

    Parent folders are created. The temporary file lies in the same folder and is flushed to disk before the rename
    (:func:`lightning_cnet._atomic.replace_atomically`). Inside :func:`recording`, a new file and new folders are
    recorded.
    """
    path = Path(path)
    new_folders = [] if path.parent.exists() else _missing_folders(path.parent)
    existed = path.exists()
    for written in _recording:
        written.folders += new_folders
    replace_atomically(path, write)
    for written in _recording:
        if not existed:
            written.files.append(path)
    return path


def _missing_folders(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return list(reversed(missing))


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows to a CSV file atomically; the columns are the union of the rows' keys, in first-seen order.

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("no rows to write")
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    return write_atomically(path, write)
