"""Several callbacks of one kind in a Trainer: state keys that tell them apart, finding the others of a kind, and
loading a state saved under an earlier key.

Lightning stores a callback's ``state_dict`` under its ``state_key`` and refuses, when the Trainer is built, two
stateful callbacks with the same key. Its own callbacks put the settings that distinguish two instances into the
key (``ModelCheckpoint{'monitor': 'val_acc', ...}``); :func:`settings_state_key` does the same with the settings
that differ from their defaults, so that a callback on its defaults keeps the plain class name, the key lightning-cnet
0.2.0 wrote for every instance.

Example:
    >>> class Guard:
    ...     pass
    >>> settings_state_key(Guard(), {"mode": "stop", "every": 1}, defaults={"mode": "stop", "every": 1})
    'Guard'
    >>> settings_state_key(Guard(), {"mode": "rollback", "every": 1}, defaults={"mode": "stop", "every": 1})
    "Guard{'mode': 'rollback'}"
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

_NO_DEFAULT = object()


def settings_state_key(callback: Any, settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """The class name of ``callback`` followed by the entries of ``settings`` that differ from ``defaults`` (all of
    those without a default), written as Lightning's ``Callback._generate_state_key`` writes them; the class name
    alone when there are none.

    Args:
        callback: the callback.
        settings: the values that tell two instances apart; they must have a ``repr`` that is the same in every run.
        defaults: the default of each setting that has one.
    """
    differing = {name: value for name, value in settings.items() if defaults.get(name, _NO_DEFAULT) != value}
    name = type(callback).__qualname__
    return f"{name}{differing!r}" if differing else name


def stable_description(value: Any) -> Any:
    """``value`` as it can appear in a state key: numbers, strings, ``None`` and lists or tuples of them as they are
    (as a list), a function or class by its qualified name, anything else by its type's name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [stable_description(item) for item in value]
    if isinstance(value, Callable) and hasattr(value, "__qualname__"):  # type: ignore[arg-type]
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    return type(value).__qualname__


def others_of_kind(callback: Any, callbacks: Any, kind: type) -> list[Any]:
    """The callbacks in ``callbacks`` other than ``callback`` that are instances of ``kind``."""
    return [other for other in callbacks if isinstance(other, kind) and other is not callback]


def adopt_saved_state(callback: Any, callbacks: Any, kind: type, checkpoint: Mapping[str, Any]) -> str | None:
    """Load into ``callback`` the state a checkpoint saved under another key of its class, when that is unambiguous.

    Lightning loads a callback's state from ``checkpoint["callbacks"][callback.state_key]``. A state saved under
    another key of the same class (the plain class name lightning-cnet 0.2.0 wrote, or a key of other settings when
    a run is resumed with a changed schedule) is loaded when ``callback`` is the only instance of ``kind`` in
    ``callbacks`` and the checkpoint holds exactly one such state; call it from ``on_load_checkpoint``, which
    Lightning runs before it looks the key up.

    Returns:
        The key the state was loaded from, or ``None``.
    """
    states = checkpoint.get("callbacks") or {}
    if callback.state_key in states or others_of_kind(callback, callbacks, kind):
        return None
    name = type(callback).__qualname__
    saved = [key for key in states if isinstance(key, str) and (key == name or key.startswith(name + "{"))]
    if len(saved) != 1:
        return None
    callback.load_state_dict(states[saved[0]])
    return saved[0]


__all__ = ["adopt_saved_state", "others_of_kind", "settings_state_key", "stable_description"]
