"""What the namespace-free logic needs from a Lightning namespace (``pytorch_lightning`` or ``lightning.pytorch``).

The two namespaces ship the same library under two import names that do not share classes: a Trainer of one
rejects a LightningModule of the other, LightningCLI rejects foreign callbacks and each raises its own
``MisconfigurationException``. Every Lightning-facing class of this package is therefore written once as a mixin
that imports no Lightning namespace, and made concrete twice: for ``pytorch_lightning`` (``lightning_cnet.module``,
``lightning_cnet.callbacks``, ``lightning_cnet.data``) and for ``lightning.pytorch`` (``lightning_cnet.lightning``).
A mixin reaches its namespace through the class attribute ``lightning`` (a :class:`Namespace`) that the concrete
class sets.

Example:
    >>> namespace = pytorch_lightning_namespace()
    >>> namespace.name
    'pytorch_lightning'
    >>> issubclass(namespace.MisconfigurationException, Exception)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any


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


@lru_cache(maxsize=None)
def pytorch_lightning_namespace() -> Namespace:
    """The ``pytorch_lightning`` namespace."""
    import pytorch_lightning
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    return Namespace("pytorch_lightning", pytorch_lightning, MisconfigurationException, rank_zero_info, rank_zero_warn)


@lru_cache(maxsize=None)
def lightning_namespace() -> Namespace:
    """The ``lightning.pytorch`` namespace (needs the ``lightning`` package).

    Raises:
        ImportError: ``lightning`` is not installed; the message says what to install or import instead.
    """
    try:
        import lightning.pytorch as lightning_pytorch
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
        from lightning.pytorch.utilities.exceptions import MisconfigurationException
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lightning_cnet.lightning needs the `lightning` package (pip install lightning); with pytorch_lightning "
            "use lightning_cnet.module, lightning_cnet.callbacks and lightning_cnet.data"
        ) from error
    return Namespace("lightning.pytorch", lightning_pytorch, MisconfigurationException, rank_zero_info, rank_zero_warn)
