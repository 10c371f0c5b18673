"""lightning-cnet: continuous-in-depth neural networks (ContinuousNet) for PyTorch and Lightning.

The model layer (:mod:`bases`, :mod:`integrators`, :mod:`layers`, :mod:`units`, :mod:`ode_block`, :mod:`models`)
is plain PyTorch; Lightning is imported only by the task, data and callback modules.

``import lightning_cnet`` itself imports neither torch nor Lightning: the public names below (and the submodules)
are imported on first access, so that the command-line entry points answer ``--help`` and ``--version`` at once.

timm finds the model builders after ``import lightning_cnet`` (:mod:`lightning_cnet.timm_support`); timm itself is
imported only by whoever imports it.

Example:
    >>> import lightning_cnet
    >>> lightning_cnet.list_schemes()[:3]
    ['bosh3', 'dopri5', 'euler']
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib import import_module
from types import ModuleType
from typing import Any

#: Public name -> the module that defines it (imported on first access).
_EXPORTS = {
    "AdaptiveRK": "adaptive",
    "odeint_adaptive": "adaptive",
    "Basis": "bases",
    "get_basis": "bases",
    "list_bases": "bases",
    "register_basis": "bases",
    "ButcherTableau": "integrators",
    "FixedStepRK": "integrators",
    "Integrator": "integrators",
    "get_scheme": "integrators",
    "list_schemes": "integrators",
    "odeint_fixed": "integrators",
    "register_scheme": "integrators",
    "rk_step": "integrators",
    "LegendreBasis": "legendre",
    "ContinuousNet": "models",
    "ResolutionChange": "models",
    "cnet_cifar": "models",
    "cnet_cifar_wide": "models",
    "cnet_digits": "models",
    "get_model": "models",
    "list_models": "models",
    "register_model": "models",
    "ODEBlock": "ode_block",
    "StageResolution": "resolution",
    "recalibrate_bn": "recalibration",
    "BottleneckUnit": "units",
    "MLPUnit": "units",
    "PreActBasicUnit": "units",
    "ResidualUnit": "units",
    "get_unit": "units",
    "list_units": "units",
    "register_unit": "units",
}


def __getattr__(name: str) -> Any:
    """Import a public name, ``__version__`` or a submodule on first access (PEP 562)."""
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name == "__version__":
        value = _installed_version()
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "__version__"})


def _installed_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lightning-cnet")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


# ---------------------------------------------------------------------- timm
class _TimmRegistrationOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is about to be imported it loads :mod:`lightning_cnet.timm_support` (and
    with it torch, which timm imports anyway), lets it install its registration and hands the search for ``timm``
    to what it installed; then it leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        before = list(sys.meta_path)
        from lightning_cnet.timm_support import install_timm_registration

        install_timm_registration()
        for finder in [f for f in sys.meta_path if f not in before]:
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None


def _register_with_timm() -> None:
    """:func:`~lightning_cnet.timm_support.install_timm_registration` without importing torch before timm needs it:
    at once when timm is already imported, when timm is imported if it is installed, never if it is absent."""
    if "timm" in sys.modules:
        if sys.modules["timm"] is not None:
            from lightning_cnet.timm_support import install_timm_registration

            install_timm_registration()
        return
    if any(isinstance(finder, _TimmRegistrationOnImport) for finder in sys.meta_path):
        return
    if importlib.util.find_spec("timm") is not None:
        sys.meta_path.insert(0, _TimmRegistrationOnImport())


_register_with_timm()

__all__ = sorted(_EXPORTS)
