"""Time bases: how a parameter ``theta(t)`` on depth-time ``t in [0, 1]`` is built from ``K`` coefficients.

A parameter of an ODE block is stored as a tensor whose leading dimension holds ``K`` coefficients,
``theta(t) = sum_k phi_k(t) theta_k``. A :class:`Basis` knows three things about its family:

* which coefficients (and with which weights) make up ``theta`` at a given time,
* how to refine (``K -> K'``) without changing ``theta(t)`` as a function,
* how to L2-project onto another member of the family (compression).

Refinement and projection are both linear maps on the coefficient axis, returned as small float64
matrices ``[K_to, K_from]``. They are computed exactly: the integrals of products of basis functions are
summed over the common refinement of both grids, where each product is a polynomial of degree <= 2 and
Simpson's rule is exact. Refining is projecting onto a finer nested space, which is exact interpolation.

Time arguments are :class:`fractions.Fraction` so that piece lookups are exact for every ``K`` and every
step count; nothing here touches tensors on a device or syncs with one.

Example:
    >>> import torch
    >>> basis = get_basis("piecewise_constant")
    >>> coeffs = torch.tensor([1.0, 2.0])
    >>> basis.evaluate(coeffs, 0.75)
    tensor(2.)
    >>> basis.apply(basis.refinement_matrix(2), coeffs)
    tensor([1., 1., 2., 2.])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from fractions import Fraction
from functools import lru_cache

import torch

from lightning_cnet.registry import Registry

NodeWeights = tuple[tuple[int, float], ...]
"""Which coefficients make up ``theta(t)``: ``((index, weight), ...)``, weights summing to one."""


class Basis(ABC):
    """A family of time bases indexed by the number of coefficients ``K``.

    Subclasses define :meth:`breakpoints`, :meth:`node_weights`, :meth:`refined_size` and ``min_size``.
    """

    name: str
    min_size: int

    def validate_size(self, n_basis: int, argument: str = "n_basis") -> None:
        """Raise ``ValueError`` unless ``n_basis`` is a valid number of coefficients for this family."""
        if isinstance(n_basis, bool) or not isinstance(n_basis, int) or n_basis < self.min_size:
            raise ValueError(
                f"{argument}={n_basis!r} is not valid for the {self.name!r} basis: "
                f"expected an integer >= {self.min_size}"
            )

    @abstractmethod
    def breakpoints(self, n_basis: int) -> list[Fraction]:
        """The points of ``[0, 1]`` where the basis functions are not smooth, ends included."""

    @abstractmethod
    def node_weights(self, n_basis: int, t: Fraction, left_limit: bool = False) -> NodeWeights:
        """The coefficients and weights that make up ``theta(t)``.

        Args:
            n_basis: number of coefficients ``K``.
            t: time in ``[0, 1]``, exact.
            left_limit: take the limit from the left (``t - 0``) where ``theta`` jumps at ``t``. Runge-Kutta
                stages at the end of a step use it, so they read the piece of their own step.
        """

    @abstractmethod
    def refined_size(self, n_basis: int) -> int:
        """Number of coefficients after one refinement of a ``K``-coefficient basis."""

    def evaluate(self, coeffs: torch.Tensor, t: float) -> torch.Tensor:
        """Evaluate ``theta(t)`` from coefficients stacked on dimension 0.

        Args:
            coeffs: tensor ``[K, ...]``.
            t: time in ``[0, 1]``.
        """
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t={t!r} must lie in [0, 1]")
        weights = self.node_weights(coeffs.shape[0], Fraction(t))
        return sum(coeffs[index] * weight for index, weight in weights)

    @abstractmethod
    def interpolation_points(self, n_basis: int) -> list[Fraction]:
        """Times at which the value of ``theta`` is coefficient ``k`` (a piece's centre, or a node)."""

    def refinement_matrix(self, n_basis: int) -> torch.Tensor:
        """The matrix ``[K', K]`` of one refinement; ``theta(t)`` is unchanged by it.

        The refined space contains the coarse one, so each new coefficient is the coarse ``theta`` at the
        new coefficient's interpolation point: the entries are exact (0, 1/2, 1).
        """
        self.validate_size(n_basis)
        points = self.interpolation_points(self.refined_size(n_basis))
        matrix = torch.zeros(len(points), n_basis, dtype=torch.float64)
        for row, t in enumerate(points):
            for index, weight in self.node_weights(n_basis, t):
                matrix[row, index] = weight
        return matrix

    def projection_matrix(self, n_from: int, n_to: int) -> torch.Tensor:
        """The L2 projection ``[n_to, n_from]`` onto a basis of ``n_to <= n_from`` coefficients."""
        self.validate_size(n_from, "n_from")
        self.validate_size(n_to, "n_to")
        if n_to > n_from:
            raise ValueError(
                f"cannot project a {self.name!r} basis of {n_from} coefficients onto a finer one of {n_to}: "
                f"expected n_to in [{self.min_size}, {n_from}] (use refinement to go finer)"
            )
        return self.transfer_matrix(n_from, n_to)

    def transfer_matrix(self, n_from: int, n_to: int) -> torch.Tensor:
        """L2 projection between any two members of the family (exact interpolation when nested)."""
        return _transfer_matrix(self, n_from, n_to).clone()

    @staticmethod
    def apply(matrix: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Apply a coefficient map ``[K_to, K_from]`` along dimension 0 of ``coeffs`` ``[K_from, ...]``."""
        flat = coeffs.reshape(coeffs.shape[0], -1)
        mapped = matrix.to(device=coeffs.device, dtype=torch.float64) @ flat.to(torch.float64)
        return mapped.to(coeffs.dtype).reshape((matrix.shape[0],) + tuple(coeffs.shape[1:]))

    def mass_matrix(self, n_basis: int) -> torch.Tensor:
        """Gram matrix ``M[i, j] = integral_0^1 phi_i(t) phi_j(t) dt``, exact."""
        return _gram(self, n_basis, n_basis).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PiecewiseConstantBasis(Basis):
    """``theta(t) = theta_k`` on ``[k/K, (k+1)/K)``; the last piece also holds ``t = 1``.

    Refinement duplicates each piece (``K -> 2K``); projection onto fewer pieces averages over overlaps.
    """

    name = "piecewise_constant"
    min_size = 1

    def breakpoints(self, n_basis: int) -> list[Fraction]:
        return [Fraction(k, n_basis) for k in range(n_basis + 1)]

    def node_weights(self, n_basis: int, t: Fraction, left_limit: bool = False) -> NodeWeights:
        scaled = n_basis * t
        index = math.floor(scaled)
        if left_limit and scaled == index and index > 0:
            index -= 1
        return ((min(max(index, 0), n_basis - 1), 1.0),)

    def refined_size(self, n_basis: int) -> int:
        return 2 * n_basis

    def interpolation_points(self, n_basis: int) -> list[Fraction]:
        return [Fraction(2 * k + 1, 2 * n_basis) for k in range(n_basis)]


class PiecewiseLinearBasis(Basis):
    """Continuous piecewise linear ("hat") functions on ``K >= 2`` equally spaced nodes ``j/(K-1)``.

    ``theta_k`` is the value at node ``k``. Refinement inserts the midpoints (``K -> 2K - 1``).
    """

    name = "piecewise_linear"
    min_size = 2

    def breakpoints(self, n_basis: int) -> list[Fraction]:
        return [Fraction(k, n_basis - 1) for k in range(n_basis)]

    def node_weights(self, n_basis: int, t: Fraction, left_limit: bool = False) -> NodeWeights:
        scaled = (n_basis - 1) * t
        index = min(max(math.floor(scaled), 0), n_basis - 2)
        fraction = scaled - index
        pairs = ((index, float(1 - fraction)), (index + 1, float(fraction)))
        return tuple(pair for pair in pairs if pair[1] != 0.0)

    def refined_size(self, n_basis: int) -> int:
        return 2 * n_basis - 1

    def interpolation_points(self, n_basis: int) -> list[Fraction]:
        return self.breakpoints(n_basis)


BASES: Registry[Basis] = Registry("basis")
"""The registered families of time bases."""


def register_basis(basis: Basis, *, overwrite: bool = False) -> Basis:
    """Register a :class:`Basis` instance under its ``name``.

    Raises:
        ValueError: the name is taken (unless ``overwrite``) or ``basis`` is not a :class:`Basis`.
    """
    if not isinstance(basis, Basis):
        raise ValueError(f"expected a Basis instance, got {type(basis).__name__}")
    return BASES.register(basis.name, basis, overwrite=overwrite)


register_basis(PiecewiseConstantBasis())
register_basis(PiecewiseLinearBasis())


def list_bases() -> list[str]:
    """Names accepted by :func:`get_basis`."""
    return BASES.names()


def get_basis(name: str | Basis) -> Basis:
    """Look a basis up by name (an instance is returned as is).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if isinstance(name, Basis):
        return name
    return BASES.get(name)


def _values_on_interval(basis: Basis, n_basis: int, left: Fraction, right: Fraction) -> torch.Tensor:
    """Basis function values ``[3, K]`` at the left end, middle and right end of an interval, taken
    from inside it (one-sided at the ends)."""
    values = torch.zeros(3, n_basis, dtype=torch.float64)
    points = ((left, False), ((left + right) / 2, False), (right, True))
    for row, (t, left_limit) in enumerate(points):
        for index, weight in basis.node_weights(n_basis, t, left_limit):
            values[row, index] = weight
    return values


@lru_cache(maxsize=256)
def _gram(basis: Basis, n_rows: int, n_cols: int) -> torch.Tensor:
    """``G[i, j] = integral phi_i^(n_rows) phi_j^(n_cols)``, summed exactly over the merged grid."""
    points = sorted(set(basis.breakpoints(n_rows)) | set(basis.breakpoints(n_cols)))
    gram = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    simpson = torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64) / 6.0
    for left, right in zip(points[:-1], points[1:]):
        rows = _values_on_interval(basis, n_rows, left, right)
        cols = _values_on_interval(basis, n_cols, left, right)
        gram += float(right - left) * (rows.T * simpson) @ cols
    return gram


@lru_cache(maxsize=256)
def _transfer_matrix(basis: Basis, n_from: int, n_to: int) -> torch.Tensor:
    if n_from == n_to:
        return torch.eye(n_to, dtype=torch.float64)
    return torch.linalg.solve(_gram(basis, n_to, n_to), _gram(basis, n_to, n_from))
