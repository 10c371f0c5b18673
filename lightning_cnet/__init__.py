"""lightning-cnet: continuous-in-depth neural networks (ContinuousNet) for PyTorch and Lightning.

The model layer (:mod:`bases`, :mod:`integrators`, :mod:`layers`, :mod:`units`, :mod:`ode_block`, :mod:`models`)
is plain PyTorch; Lightning is imported only by the task, data and callback modules.

timm finds the model builders after ``import lightning_cnet`` (:mod:`lightning_cnet.timm_support`); timm itself is
imported only by whoever imports it.
"""

from importlib import metadata as _metadata

from lightning_cnet.adaptive import AdaptiveRK, odeint_adaptive
from lightning_cnet.bases import Basis, get_basis, list_bases, register_basis
from lightning_cnet.integrators import (
    ButcherTableau,
    FixedStepRK,
    Integrator,
    get_scheme,
    list_schemes,
    odeint_fixed,
    register_scheme,
    rk_step,
)
from lightning_cnet.legendre import LegendreBasis
from lightning_cnet.models import (
    ContinuousNet,
    ResolutionChange,
    cnet_cifar,
    cnet_cifar_wide,
    cnet_digits,
    get_model,
    list_models,
    register_model,
)
from lightning_cnet.ode_block import ODEBlock
from lightning_cnet.resolution import StageResolution
from lightning_cnet.recalibration import recalibrate_bn
from lightning_cnet.units import BottleneckUnit, MLPUnit, PreActBasicUnit, ResidualUnit, get_unit, list_units, register_unit

from lightning_cnet.timm_support import install_timm_registration

try:
    __version__ = _metadata.version("lightning-cnet")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

install_timm_registration()

__all__ = [
    "AdaptiveRK",
    "Basis",
    "BottleneckUnit",
    "ButcherTableau",
    "ContinuousNet",
    "FixedStepRK",
    "Integrator",
    "LegendreBasis",
    "MLPUnit",
    "ODEBlock",
    "PreActBasicUnit",
    "ResidualUnit",
    "ResolutionChange",
    "StageResolution",
    "cnet_cifar",
    "cnet_cifar_wide",
    "cnet_digits",
    "get_basis",
    "get_model",
    "get_scheme",
    "get_unit",
    "list_bases",
    "list_models",
    "list_schemes",
    "list_units",
    "odeint_adaptive",
    "odeint_fixed",
    "recalibrate_bn",
    "register_basis",
    "register_model",
    "register_scheme",
    "register_unit",
    "rk_step",
]
