"""The two Lightning namespaces (``pytorch_lightning`` and ``lightning.pytorch``) served from one list.

The two namespaces ship the same library under two import names that do not share classes: a Trainer of one
rejects a LightningModule of the other, LightningCLI rejects foreign callbacks and each raises its own
``MisconfigurationException``. Every Lightning-facing class of this package is therefore written once, as a mixin that
imports no Lightning namespace, and registered here with :func:`lightning_class`: the name of the class it becomes and
the Lightning base class it is mixed with. :func:`concrete_class` makes it concrete for a namespace on first access
(and then always returns the same class, so pickling, ``ddp_spawn`` and LightningCLI's ``class_path`` find it):

* for ``pytorch_lightning``, in the module the registration names as its home (``lightning_cnet.module``,
  ``lightning_cnet.callbacks``, ``lightning_cnet.data``, ``lightning_cnet.checkpoint_io``);
* for ``lightning.pytorch``, in ``lightning_cnet.lightning``, which imports nothing of ``pytorch_lightning``.

Those modules answer the names with :func:`module_getattr`. A new DataModule or callback is therefore one file: its
mixin, registered with :func:`lightning_class`, in ``lightning_cnet/data/`` or ``callbacks/`` (both packages import
their modules on import). A mixin reaches its namespace through the class attribute ``lightning`` (a
:class:`Namespace`) that the concrete class sets.

Example:
    A DataModule in ``lightning_cnet/data/svhn.py`` is one class, registered once::

        @lightning_class("SVHNDataModule", base="LightningDataModule")
        class SVHNDataMixin(SplitDataMixin):
            ...

    after which ``lightning_cnet.data.SVHNDataModule`` and ``lightning_cnet.lightning.SVHNDataModule`` exist:

    >>> import lightning_cnet.callbacks
    >>> guard = concrete_class("NonFiniteGuard", pytorch_lightning_namespace())
    >>> guard.__module__, guard.__mro__[1].__name__, guard.lightning.name
    ('lightning_cnet.callbacks', 'NonFiniteGuardMixin', 'pytorch_lightning')
    >>> guard is lightning_cnet.callbacks.NonFiniteGuard
    True
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, reduce
from importlib import import_module
from pkgutil import iter_modules
from types import ModuleType
from typing import Any, TypeVar

#: Where the ``lightning.pytorch`` classes live.
LIGHTNING_HOME = "lightning_cnet.lightning"

Mixin = TypeVar("Mixin", bound=type)


@dataclass(frozen=True)
class Namespace:
    """The pieces of one Lightning namespace that mixins use.

    Attributes:
        name: ``"pytorch_lightning"`` or ``"lightning.pytorch"``.
        module: the namespace's top-level module (``pytorch_lightning`` or ``lightning.pytorch``).
        MisconfigurationException: the namespace's exception for a bad configuration.
        rank_zero_info: log an info message once per job.
        rank_zero_warn: warn once per job.
    """

    name: str
    module: ModuleType
    MisconfigurationException: type[Exception]
    rank_zero_info: Callable[..., Any]
    rank_zero_warn: Callable[..., Any]


@cache
def pytorch_lightning_namespace() -> Namespace:
    """The ``pytorch_lightning`` namespace."""
    import pytorch_lightning
    from lightning_fabric.utilities.exceptions import MisconfigurationException  # pytorch_lightning's, defined here
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

    return Namespace("pytorch_lightning", pytorch_lightning, MisconfigurationException, rank_zero_info, rank_zero_warn)


@cache
def lightning_namespace() -> Namespace:
    """The ``lightning.pytorch`` namespace (needs the ``lightning`` package).

    Raises:
        ImportError: ``lightning`` is not installed; the message says what to install or import instead.
    """
    try:
        import lightning.pytorch as lightning_pytorch
        from lightning.fabric.utilities.exceptions import MisconfigurationException  # lightning.pytorch's
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lightning_cnet.lightning needs the `lightning` package (pip install lightning); with pytorch_lightning "
            "use lightning_cnet.module, lightning_cnet.callbacks and lightning_cnet.data"
        ) from error
    return Namespace("lightning.pytorch", lightning_pytorch, MisconfigurationException, rank_zero_info, rank_zero_warn)


@dataclass(frozen=True)
class _Registration:
    mixin: type
    base: str
    home: str
    parent: str | None


#: Class name -> how to make it concrete.
_REGISTRY: dict[str, _Registration] = {}
#: (class name, namespace name) -> the concrete class.
_CONCRETE: dict[tuple[str, str], type] = {}


def lightning_class(name: str, *, base: str, home: str | None = None,
                    parent: str | None = None) -> Callable[[Mixin], Mixin]:
    """Class decorator: register a namespace-free mixin to be made into the Lightning class ``name``.

    Args:
        name: the concrete class's name, the same in both namespaces (``"NonFiniteGuard"``).
        base: the Lightning class it is mixed with, as an attribute path of the namespace's module
            (``"Callback"``, ``"LightningDataModule"``, ``"LightningModule"``, ``"plugins.TorchCheckpointIO"``).
        home: the module of the ``pytorch_lightning`` class (default: the package of the mixin's module, e.g.
            ``lightning_cnet.data`` for ``lightning_cnet.data.digits``).
        parent: a registered class to subclass instead of ``base`` (``HardDigitsDataModule`` is a
            ``DigitsDataModule``).

    Raises:
        ValueError: ``name`` is registered for another mixin.
    """

    def register(mixin: Mixin) -> Mixin:
        known = _REGISTRY.get(name)
        if known is not None and known.mixin is not mixin:
            raise ValueError(f"{name!r} is registered for {known.mixin.__qualname__} already")
        _REGISTRY[name] = _Registration(mixin, base, home or mixin.__module__.rpartition(".")[0], parent)
        return mixin

    return register


def registered_names(home: str | None = None) -> list[str]:
    """The registered class names (those whose ``pytorch_lightning`` class lives in ``home``), sorted."""
    return sorted(name for name, entry in _REGISTRY.items() if home is None or entry.home == home)


def concrete_class(name: str, namespace: Namespace) -> type:
    """The registered class ``name`` made concrete for ``namespace``: built on first access, then the same object.

    Raises:
        AttributeError: nothing is registered as ``name``.
    """
    key = (name, namespace.name)
    if key in _CONCRETE:
        return _CONCRETE[key]
    if name not in _REGISTRY:
        raise AttributeError(f"no Lightning class named {name!r} is registered")
    entry = _REGISTRY[name]
    parent = (concrete_class(entry.parent, namespace) if entry.parent is not None
              else reduce(getattr, entry.base.split("."), namespace.module))
    attributes = {
        "__module__": entry.home if namespace.name == "pytorch_lightning" else LIGHTNING_HOME,
        "__qualname__": name,
        "__doc__": entry.mixin.__doc__,
        "lightning": namespace,
    }
    _CONCRETE[key] = types.new_class(name, (entry.mixin, parent), exec_body=lambda body: body.update(attributes))
    return _CONCRETE[key]


def module_getattr(home: str, namespace: Callable[[], Namespace] = pytorch_lightning_namespace,
                   everything: bool = False) -> Callable[[str], type]:
    """A module ``__getattr__`` (PEP 562) answering the registered class names of ``home`` (all of them with
    ``everything``) with their concrete classes for ``namespace``."""

    def __getattr__(name: str) -> type:
        if name in _REGISTRY and (everything or _REGISTRY[name].home == home):
            return concrete_class(name, namespace())
        raise AttributeError(f"module {home!r} has no attribute {name!r}")

    return __getattr__


def import_submodules(package: str, path: Any) -> None:
    """Import every public module of ``package`` (``path``: its ``__path__``), so that the mixins in them register."""
    for module in iter_modules(path):
        if not module.name.startswith("_"):
            import_module(f"{package}.{module.name}")


__all__ = ["LIGHTNING_HOME", "Namespace", "concrete_class", "import_submodules", "lightning_class",
           "lightning_namespace", "module_getattr", "pytorch_lightning_namespace", "registered_names"]
