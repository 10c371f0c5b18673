"""One registry pattern for every named choice of the package: models, schemes, bases and residual units.

Example:
    >>> colours = Registry("colour")
    >>> colours.register("red", 0xFF0000)
    16711680
    >>> colours.names()
    ['red']
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    ValueError: colour='blue' is not known: expected one of ['red']
"""

from __future__ import annotations

import fnmatch
from typing import Generic, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Named entries of one kind.

    Args:
        kind: what the entries are, as users name the argument that selects one (``"scheme"``, ``"model"``, ...);
            used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def check_name(self, name: str, *, overwrite: bool = False) -> None:
        """Raise ``ValueError`` unless :meth:`register` would accept ``name`` (checked before building an entry)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")

    def register(self, name: str, entry: Entry, *, overwrite: bool = False) -> Entry:
        """Add ``entry`` under ``name`` and return it.

        Raises:
            ValueError: ``name`` is not a non-empty string, or is taken and ``overwrite`` is false.
        """
        self.check_name(name, overwrite=overwrite)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry registered as ``name``.

        Raises:
            ValueError: unknown name; the message lists the registered ones.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.kind}={name!r} is not known: expected one of {self.names()}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(name for name in self._entries if fnmatch.fnmatch(name, pattern))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
