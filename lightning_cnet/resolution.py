"""The state of one ODE stage: how ``theta(t)`` is represented (basis, number of pieces), how the stage is integrated
(scheme, step count, tolerances of adaptive steps) and its physical depth ``T``.

:class:`StageResolution` is immutable and owns what concerns it alone: its validation (one message per bad value,
nothing half-applied), the :class:`~lightning_cnet.integrators.Integrator` it describes, and its checkpoint encoding,
the tensors ``<stage>.resolution.{n_basis, n_steps, T, scheme, basis}`` (plus ``rtol`` and ``atol`` for adaptive
steps) that travel in the state dict next to the stage's pieces. An :class:`~lightning_cnet.ode_block.ODEBlock` holds
one, with the integration plan derived from it; a change of resolution replaces both.

Example:
    >>> resolution = StageResolution(2, 4, "rk4", "piecewise_constant", 2.0)
    >>> resolution.integrator
    FixedStepRK('rk4', n_steps=4)
    >>> sorted(resolution.to_state_dict("stages.0."))[:2]
    ['stages.0.resolution.T', 'stages.0.resolution.basis']
    >>> StageResolution.from_state_dict(resolution.to_state_dict("stages.0."), "stages.0.") == resolution
    True
    >>> resolution.replace(n_steps=0)
    Traceback (most recent call last):
    ...
    ValueError: n_steps=0 is not valid: expected an integer >= 1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_cnet._validation import check_integer
from lightning_cnet.adaptive import AdaptiveRK
from lightning_cnet.bases import Basis, get_basis
from lightning_cnet.cost import check_depth, check_piece_count, check_step_count
from lightning_cnet.integrators import SCHEMES, ButcherTableau, FixedStepRK, Integrator, get_scheme

RESOLUTION_PREFIX = "resolution."
"""State-dict keys of a stage's resolution: ``<stage>.resolution.<name>``."""
RESOLUTION_KEYS = ("n_basis", "n_steps", "T", "scheme", "basis")
"""The names every stored resolution has."""
TOLERANCE_KEYS = ("rtol", "atol")
"""The names a resolution of adaptive steps adds."""

#: Longest scheme or basis name a checkpoint may store (registered names are a few characters).
MAX_NAME_BYTES = 64


@dataclass(frozen=True, init=False, repr=False)
class StageResolution:
    """How one ODE stage is represented (``n_basis``, ``basis``, ``T``) and integrated (``n_steps``, ``scheme`` and,
    for adaptive steps, ``rtol`` and ``atol``).

    Args:
        n_basis: pieces (coefficients) of every time-dependent tensor.
        n_steps: integration steps (adaptive steps: the first step is ``1 / n_steps``).
        scheme: a registered scheme name or a :class:`~lightning_cnet.integrators.ButcherTableau` (its name is kept).
        basis: a registered basis name or a :class:`~lightning_cnet.bases.Basis` (its name is kept).
        T: physical depth.
        rtol: relative tolerance of adaptive steps; ``None`` (with ``atol``) for fixed steps.
        atol: absolute tolerance of adaptive steps.

    Attributes:
        tableau: the scheme's tableau.
        basis_family: the basis.

    Raises:
        ValueError: an unknown scheme or basis, a number of pieces the basis does not take, a step count or a depth
            out of range (:mod:`lightning_cnet.cost`), tolerances without each other or for a scheme without an
            embedded error estimate.
    """

    n_basis: int
    n_steps: int
    scheme: str
    basis: str
    T: float
    rtol: float | None
    atol: float | None
    tableau: ButcherTableau = field(compare=False)
    basis_family: Basis = field(compare=False)

    def __init__(
        self,
        n_basis: int,
        n_steps: int,
        scheme: str | ButcherTableau,
        basis: str | Basis,
        T: float,
        rtol: float | None = None,
        atol: float | None = None,
    ) -> None:
        tableau, family = get_scheme(scheme), get_basis(basis)
        family.validate_size(n_basis)
        check_piece_count(n_basis)
        check_integer("n_steps", n_steps)
        check_step_count(n_steps)
        depth = check_depth(T)
        if (rtol is None) != (atol is None):
            raise ValueError(f"rtol={rtol!r}, atol={atol!r}: adaptive steps need both tolerances, fixed steps neither")
        if rtol is not None and atol is not None:
            AdaptiveRK(tableau, rtol=rtol, atol=atol)  # checks the tolerances and that the scheme is an embedded pair
            rtol, atol = float(rtol), float(atol)
        for name, value in (("n_basis", n_basis), ("n_steps", n_steps), ("scheme", tableau.name),
                            ("basis", family.name), ("T", depth), ("rtol", rtol), ("atol", atol),
                            ("tableau", tableau), ("basis_family", family)):
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ views
    @property
    def adaptive(self) -> bool:
        """Whether the steps are chosen by an error estimate (``rtol``, ``atol``) rather than fixed."""
        return self.rtol is not None

    @property
    def integrator(self) -> Integrator[Any]:
        """The integrator these settings describe."""
        if self.rtol is not None and self.atol is not None:
            return AdaptiveRK(self.tableau, rtol=self.rtol, atol=self.atol, n_steps=self.n_steps)
        return FixedStepRK(self.tableau, self.n_steps)

    def describe(self) -> str:
        """One phrase, e.g. ``'n_steps=2 n_basis=2 rk4'`` or ``'n_steps=2 n_basis=2 dopri5 rtol=0.001 atol=1e-06'``."""
        tolerances = ""
        if self.rtol is not None and self.atol is not None:
            tolerances = f" rtol={self.rtol:g} atol={self.atol:g}"
        return f"n_steps={self.n_steps} n_basis={self.n_basis} {self.scheme}{tolerances}"

    def __repr__(self) -> str:
        tolerances = f", rtol={self.rtol!r}, atol={self.atol!r}" if self.adaptive else ""
        return (f"StageResolution(n_basis={self.n_basis!r}, n_steps={self.n_steps!r}, scheme={self.scheme!r}, "
                f"basis={self.basis!r}, T={self.T!r}{tolerances})")

    # ------------------------------------------------------------------ changes
    def replace(self, **changes: Any) -> StageResolution:
        """A copy with ``changes`` (any argument of the constructor), validated; the tableau and basis objects are
        kept unless changed.

        Raises:
            ValueError: as the constructor, or an unknown field.
        """
        values: dict[str, Any] = {"n_basis": self.n_basis, "n_steps": self.n_steps, "scheme": self.tableau,
                                  "basis": self.basis_family, "T": self.T, "rtol": self.rtol, "atol": self.atol}
        if unknown := sorted(changes.keys() - values.keys()):
            raise ValueError(f"{', '.join(unknown)}: not a field of StageResolution, expected one of {sorted(values)}")
        return StageResolution(**{**values, **changes})

    def with_manifestation(
        self,
        *,
        scheme: str | ButcherTableau | None = None,
        n_steps: int | None = None,
        integrator: Integrator[Any] | None = None,
    ) -> StageResolution:
        """The resolution integrated another way, representation and depth unchanged.

        Args:
            scheme: fixed steps of this scheme (``None``: keep the scheme, and adaptive steps if they are).
            n_steps: steps (``None``: keep them, or take the integrator's).
            integrator: a :class:`~lightning_cnet.integrators.FixedStepRK` or
                :class:`~lightning_cnet.adaptive.AdaptiveRK`, instead of ``scheme``; its ``n_steps`` (if any) is the
                step count.

        Raises:
            ValueError: an invalid value, ``scheme`` and ``integrator`` together, two different step counts, or an
                integrator of another kind.
        """
        if integrator is None:
            changes: dict[str, Any] = {} if scheme is None else {"scheme": scheme, "rtol": None, "atol": None}
            return self.replace(**changes, **({} if n_steps is None else {"n_steps": n_steps}))
        if not isinstance(integrator, (FixedStepRK, AdaptiveRK)):
            raise ValueError(f"integrator={integrator!r} is not valid: expected a FixedStepRK or an AdaptiveRK, whose "
                             "settings a stage can store in its checkpoint")
        if scheme is not None:
            raise ValueError(f"scheme={scheme!r} and integrator={integrator!r}: give one of them (the integrator "
                             "names its scheme)")
        if n_steps is not None and integrator.n_steps is not None and n_steps != integrator.n_steps:
            raise ValueError(f"n_steps={n_steps!r} and integrator={integrator!r} ask for two step counts: give one")
        steps = next(n for n in (n_steps, integrator.n_steps, self.n_steps) if n is not None)
        if isinstance(integrator, AdaptiveRK):
            return self.replace(scheme=integrator.tableau, n_steps=steps, rtol=integrator.rtol, atol=integrator.atol)
        return self.replace(scheme=integrator.tableau, n_steps=steps, rtol=None, atol=None)

    # ------------------------------------------------------------------ checkpoints
    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors that store this resolution in a state dict, under ``<prefix>resolution.<name>``."""
        key = prefix + RESOLUTION_PREFIX
        state = {
            key + "n_basis": torch.tensor(self.n_basis, dtype=torch.int64),
            key + "n_steps": torch.tensor(self.n_steps, dtype=torch.int64),
            key + "T": torch.tensor(self.T, dtype=torch.float64),
            key + "scheme": _encode_name(self.scheme),
            key + "basis": _encode_name(self.basis),
        }
        if self.rtol is not None and self.atol is not None:
            state[key + "rtol"] = torch.tensor(self.rtol, dtype=torch.float64)
            state[key + "atol"] = torch.tensor(self.atol, dtype=torch.float64)
        return state

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Any],
        prefix: str = "",
        *,
        basis: Basis | None = None,
        check_pieces: Callable[[int, str], None] | None = None,
    ) -> StageResolution | None:
        """The resolution a state dict stores under ``prefix``, checked; ``None`` if it stores none.

        Only the resolution's own tensors are read and nothing larger than them is built, so a tampered or foreign
        file is refused in milliseconds; a claimed ``n_basis`` is checked by ``check_pieces`` (the stage compares it
        with the pieces the state dict holds) before anything is sized by it.

        Args:
            state_dict: the state dict.
            prefix: the stage's prefix (``"stages.1."``).
            basis: the basis the stage uses: another stored basis is refused (``None``: any registered one).
            check_pieces: ``check_pieces(n_basis, where)`` raises ``ValueError`` if the claim does not match.

        Raises:
            ValueError: an entry is missing, malformed or out of range, an unregistered scheme, another basis.
        """
        keys = {name: prefix + RESOLUTION_PREFIX + name for name in RESOLUTION_KEYS + TOLERANCE_KEYS}
        present = {name: state_dict[key] for name, key in keys.items() if key in state_dict}
        if not present:
            return None
        where = f"the checkpoint's stage {prefix.rstrip('.') or '(root)'}"
        if missing := sorted(set(RESOLUTION_KEYS) - present.keys()):
            raise ValueError(f"{where} lacks {', '.join(keys[name] for name in missing)}")
        if len(tolerances := [name for name in TOLERANCE_KEYS if name in present]) == 1:
            raise ValueError(f"{where} stores {keys[tolerances[0]]} alone: adaptive steps store rtol and atol")
        basis_name, scheme = (_decode_name(present[name], keys[name]) for name in ("basis", "scheme"))
        n_basis, n_steps = (_integer(present[name], keys[name]) for name in ("n_basis", "n_steps"))
        depth = _real(present["T"], keys["T"])
        rtol, atol = (_real(present[name], keys[name]) if name in present else None for name in TOLERANCE_KEYS)
        if basis is not None and basis_name != basis.name:
            raise ValueError(
                f"{where} uses basis={basis_name!r} but this model uses {basis.name!r}; build the model with "
                f"basis={basis_name!r}"
            )
        if scheme not in SCHEMES:
            raise ValueError(f"{where} uses scheme={scheme!r}, which is not registered: expected one of "
                             f"{SCHEMES.names()}")
        if n_steps < 1:
            raise ValueError(f"{where} has n_steps={n_steps}: expected an integer >= 1")
        check_step_count(n_steps, f"{where}: n_steps")
        if not (math.isfinite(depth) and depth > 0):
            raise ValueError(f"{where} has T={depth}: expected a finite positive physical depth")
        check_depth(depth, f"{where}: T")
        if check_pieces is not None:
            check_pieces(n_basis, where)
        try:
            return cls(n_basis, n_steps, scheme, basis if basis is not None else basis_name, depth, rtol, atol)
        except ValueError as error:
            raise type(error)(f"{where}: {error}") from None

    @classmethod
    def pop_state_dict(cls, state_dict: dict[str, Any], prefix: str = "") -> None:
        """Remove the resolution's tensors from a state dict (after they were read)."""
        for name in RESOLUTION_KEYS + TOLERANCE_KEYS:
            state_dict.pop(prefix + RESOLUTION_PREFIX + name, None)


def _encode_name(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("utf-8")), dtype=torch.uint8)


def _decode_name(value: Any, key: str) -> str:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"{key} must be a 1-D uint8 tensor holding a name, got {_describe(value)}")
    if value.numel() > MAX_NAME_BYTES:
        raise ValueError(f"{key} holds {value.numel()} bytes: expected a name of at most {MAX_NAME_BYTES}")
    try:
        return bytes(value.tolist()).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{key} does not hold a UTF-8 name") from None


def _integer(value: Any, key: str) -> int:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dtype.is_floating_point or value.is_complex():
        raise ValueError(f"{key} must be a one-element integer tensor, got {_describe(value)}")
    return int(value.item())


def _real(value: Any, key: str) -> float:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"{key} must be a one-element tensor, got {_describe(value)}")
    return float(value.item())


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


__all__ = ["MAX_NAME_BYTES", "RESOLUTION_KEYS", "RESOLUTION_PREFIX", "StageResolution", "TOLERANCE_KEYS"]
