"""Time bases: how a parameter ``theta(t)`` on depth-time ``t in [0, 1]`` is built from ``K`` coefficients.

A parameter of an ODE block is stored as a tensor whose leading dimension holds ``K`` coefficients,
``theta(t) = sum_k phi_k(t) theta_k``. A :class:`Basis` knows three things about its family:

* which coefficients (and with which weights) make up ``theta`` at a given time,
* how to refine (``K -> K'``) without changing ``theta(t)`` as a function,
* how to L2-project onto another member of the family (compression).

and declares what the rest of the package may assume of it: whether its node weights form a partition of unity
(non-negative, summing to one at every time: BatchNorm running statistics can then be mixed with them), its
polynomial degree between breakpoints (the Gram matrices are exact for it) and which part of depth each
coefficient describes (:meth:`Basis.coefficient_spans`, for profiles and plots).

Refinement and projection are both linear maps on the coefficient axis, returned as small float64
matrices ``[K_to, K_from]``. Projections are computed exactly: the integrals of products of basis functions are
summed over the common refinement of both grids with Gauss-Legendre quadrature of enough points for the declared
degrees. Refinement is each family's own map (:class:`NodalBasis` derives it by interpolation); the built-in
families are nested, so it leaves ``theta(t)`` unchanged.

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

import numpy as np
import torch

from lightning_cnet.registry import Registry

NodeWeights = tuple[tuple[int, float], ...]
"""Which coefficients make up ``theta(t)``: ``((index, weight), ...)``, weights summing to one."""


class Basis(ABC):
    """A family of time bases indexed by the number of coefficients ``K``.

    Subclasses define :meth:`breakpoints`, :meth:`degree`, :meth:`node_weights`, :meth:`refined_size`,
    :meth:`refinement_matrix`, :meth:`coefficient_spans`, ``name``, ``min_size`` and ``partition_of_unity``.

    Attributes:
        name: registry name.
        min_size: the smallest ``K``.
        partition_of_unity: the node weights are non-negative and sum to one at every time, so that ``theta(t)`` is
            a convex combination of coefficients (layers that mix BatchNorm running statistics need it).
    """

    name: str
    min_size: int
    partition_of_unity: bool

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
    def degree(self, n_basis: int) -> int:
        """The polynomial degree of the basis functions between two breakpoints."""

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

    @abstractmethod
    def refinement_matrix(self, n_basis: int) -> torch.Tensor:
        """The matrix ``[K', K]`` of one refinement (``K' = refined_size(K)``); ``theta(t)`` is unchanged by it."""

    @abstractmethod
    def coefficient_spans(self, n_basis: int) -> list[tuple[Fraction, Fraction]]:
        """The part of ``[0, 1]`` each coefficient describes: its piece for a piecewise-constant basis, its node
        (``start == end``) where a nodal coefficient is the value of ``theta``, all of ``[0, 1]`` for a global mode."""

    def evaluate(self, coeffs: torch.Tensor, t: float) -> torch.Tensor:
        """Evaluate ``theta(t)`` from coefficients stacked on dimension 0.

        Args:
            coeffs: tensor ``[K, ...]``.
            t: time in ``[0, 1]``.
        """
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t={t!r} must lie in [0, 1]")
        weights = self.node_weights(coeffs.shape[0], Fraction(t))
        return sum((coeffs[index] * weight for index, weight in weights), torch.zeros_like(coeffs[0]))

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
        """Gram matrix ``M[i, j] = integral_0^1 phi_i(t) phi_j(t) dt``, exact for the declared :meth:`degree`."""
        return _gram(self, n_basis, n_basis).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NodalBasis(Basis):
    """A basis whose coefficient ``k`` is the value of ``theta`` at an interpolation point (a piece's centre or a
    node): refinement is interpolation at the refined basis' points.

    Subclasses define :meth:`interpolation_points` besides what :class:`Basis` asks.
    """

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


class PiecewiseConstantBasis(NodalBasis):
    """``theta(t) = theta_k`` on ``[k/K, (k+1)/K)``; the last piece also holds ``t = 1``.

    Refinement duplicates each piece (``K -> 2K``); projection onto fewer pieces averages over overlaps.
    """

    name = "piecewise_constant"
    min_size = 1
    partition_of_unity = True

    def breakpoints(self, n_basis: int) -> list[Fraction]:
        return [Fraction(k, n_basis) for k in range(n_basis + 1)]

    def degree(self, n_basis: int) -> int:
        return 0

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

    def coefficient_spans(self, n_basis: int) -> list[tuple[Fraction, Fraction]]:
        return [(Fraction(k, n_basis), Fraction(k + 1, n_basis)) for k in range(n_basis)]


class PiecewiseLinearBasis(NodalBasis):
    """Continuous piecewise linear ("hat") functions on ``K >= 2`` equally spaced nodes ``j/(K-1)``.

    ``theta_k`` is the value at node ``k``. Refinement inserts the midpoints (``K -> 2K - 1``).
    """

    name = "piecewise_linear"
    min_size = 2
    partition_of_unity = True

    def breakpoints(self, n_basis: int) -> list[Fraction]:
        return [Fraction(k, n_basis - 1) for k in range(n_basis)]

    def degree(self, n_basis: int) -> int:
        return 1

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

    def coefficient_spans(self, n_basis: int) -> list[tuple[Fraction, Fraction]]:
        return [(node, node) for node in self.breakpoints(n_basis)]


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


def gauss_legendre(n_points: int) -> tuple[list[float], list[float]]:
    """Gauss-Legendre nodes and weights on ``[0, 1]``: exact for polynomials of degree ``<= 2 n_points - 1``.

    Example:
        >>> nodes, weights = gauss_legendre(2)
        >>> round(sum(w * t**3 for t, w in zip(nodes, weights)), 15)  # the integral of t^3 on [0, 1]
        0.25
    """
    nodes, weights = np.polynomial.legendre.leggauss(n_points)
    return [float((1.0 + x) / 2.0) for x in nodes], [float(w / 2.0) for w in weights]


def _values_at(basis: Basis, n_basis: int, times: list[Fraction]) -> torch.Tensor:
    """Basis function values ``[len(times), K]``."""
    values = torch.zeros(len(times), n_basis, dtype=torch.float64)
    for row, t in enumerate(times):
        for index, weight in basis.node_weights(n_basis, t):
            values[row, index] = weight
    return values


@lru_cache(maxsize=256)
def _gram(basis: Basis, n_rows: int, n_cols: int) -> torch.Tensor:
    """``G[i, j] = integral phi_i^(n_rows) phi_j^(n_cols)``, summed over the merged grid with Gauss-Legendre
    quadrature exact for the product of the two declared degrees."""
    points = sorted(set(basis.breakpoints(n_rows)) | set(basis.breakpoints(n_cols)))
    nodes, weights = gauss_legendre((basis.degree(n_rows) + basis.degree(n_cols)) // 2 + 1)
    fractions = [Fraction(node) for node in nodes]
    quadrature = torch.tensor(weights, dtype=torch.float64)
    gram = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    for left, right in zip(points[:-1], points[1:]):
        times = [left + (right - left) * node for node in fractions]  # inside the interval: no jump is read
        rows = _values_at(basis, n_rows, times)
        cols = _values_at(basis, n_cols, times)
        gram += float(right - left) * (rows.T * quadrature) @ cols
    return gram


@lru_cache(maxsize=256)
def _transfer_matrix(basis: Basis, n_from: int, n_to: int) -> torch.Tensor:
    if n_from == n_to:
        return torch.eye(n_to, dtype=torch.float64)
    transfer: torch.Tensor = torch.linalg.solve(_gram(basis, n_to, n_to), _gram(basis, n_to, n_from))
    return transfer


# Built-in families defined in modules of their own register themselves there; importing them here makes them known
# wherever bases are looked up (whichever of the two modules is imported first).
import lightning_cnet.legendre  # noqa: E402, F401
