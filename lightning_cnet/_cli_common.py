"""What the two command lines (``lightning-cnet`` and ``lightning-cnet-analyze``) share: the error for bad input, its
one-line report, and reading a checkpoint file safely.

Both commands promise that a mistake in their input ends with one line ``<prog>: error: ...`` on stderr and exit
status 2. :class:`UsageError` is that mistake, :func:`error_line` its line, and :func:`load_checkpoint_file` turns
every way a checkpoint file can be wrong (a folder, a missing, truncated or foreign file) into one.

Example:
    >>> error_line("lightning-cnet", UsageError("n_steps=0 is not valid:\\n  expected an integer >= 1"))
    'lightning-cnet: error: n_steps=0 is not valid: expected an integer >= 1'
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class UsageError(Exception):
    """A mistake in the command line, the config or the files it names; reported as one line."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """The message of ``error`` on one line of at most ``limit`` characters (its lines joined; the exception's type
    name when it has no message).

    Example:
        >>> one_line(ValueError("first\\n   second"), limit=12)
        'first sec...'
    """
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(prog: str, error: BaseException | str, width: int = 200) -> str:
    """``<prog>: error: <message>`` for an exception or a message, at most ``width`` characters."""
    prefix = f"{prog}: error: "
    return prefix + one_line(error if isinstance(error, BaseException) else UsageError(error), width - len(prefix))


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from, as a traceback shows them (an explicit ``__cause__``, else an
    unsuppressed ``__context__``).

    Example:
        >>> try:
        ...     try:
        ...         raise KeyError("inner")
        ...     except KeyError as inner:
        ...         raise ValueError("outer") from inner
        ... except ValueError as outer:
        ...     [type(e).__name__ for e in exception_chain(outer)]
        ['ValueError', 'KeyError']
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The contents of a Lightning checkpoint file, loaded on the CPU with ``weights_only=True`` (no code runs) and
    memory-mapped (only the tensors read are read from disk).

    Raises:
        UsageError: ``path`` is a folder (naming the ``last.ckpt`` inside it when there is one), is missing, cannot
            be read by torch (a truncated or corrupt file), or is not a Lightning checkpoint (no ``state_dict``).
    """
    file = Path(path)
    if file.is_dir():
        found = [c for c in (file / "checkpoints" / "last.ckpt", file / "last.ckpt") if c.is_file()]
        hint = f"did you mean {found[0]}?" if found else "a run keeps them in checkpoints/, e.g. checkpoints/last.ckpt"
        raise UsageError(f"{path}: is a folder, not a checkpoint file ({hint})")
    if not file.is_file():
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - whatever torch cannot read is not a checkpoint
        raise UsageError(f"{path}: not a readable checkpoint ({one_line(error, 120)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UsageError(f"{path}: not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


__all__ = ["UsageError", "error_line", "exception_chain", "load_checkpoint_file", "one_line"]
