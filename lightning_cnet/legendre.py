"""A spectral time basis: shifted Legendre polynomials on ``[0, 1]``.

``theta(t) = sum_k theta_k P_k(2t - 1)`` for ``k < K``, where ``P_k`` is the Legendre polynomial of degree ``k``
(``P_k(1) = 1``): one polynomial of degree ``K - 1`` across the whole depth, as in the follow-up paper on stateful
ODE-Nets. The polynomials are orthogonal on ``[0, 1]`` (``integral P_i P_j = delta_ij / (2i + 1)``), so

* refinement raises the degree (``K -> 2K``): the coefficients are kept and the new ones start at zero, which leaves
  ``theta(t)`` unchanged;
* compression is truncation: the L2 projection onto ``K' < K`` coefficients keeps the first ``K'``.

It is registered as ``"legendre"`` when :mod:`lightning_cnet.bases` is imported.

Every coefficient acts at every time and the node weights take both signs: they are not a partition of unity, so
layers that mix BatchNorm running statistics refuse this basis (a running variance mixed with negative weights is
not a variance). Use it with units without BatchNorm (``unit="mlp"``, or a unit of your own).

Each coefficient of a new layer is initialised like a ResNet layer, so ``theta(t)`` of a model built with ``K > 1``
is a sum of ``K`` random kernels; build with ``n_basis=1`` and refine to start from a ResNet-like constant.

Example:
    >>> import torch
    >>> from lightning_cnet.bases import get_basis
    >>> basis = get_basis("legendre")
    >>> coeffs = torch.tensor([1.0, 2.0])  # theta(t) = 1 + 2 (2t - 1)
    >>> basis.evaluate(coeffs, 0.75)
    tensor(2.)
    >>> basis.apply(basis.refinement_matrix(2), coeffs)
    tensor([1., 2., 0., 0.])
    >>> basis.apply(basis.projection_matrix(2, 1), coeffs)  # the mean of theta over [0, 1]
    tensor([1.])
"""

from __future__ import annotations

from fractions import Fraction

import torch

from lightning_cnet.bases import Basis, NodeWeights, register_basis


def shifted_legendre(n_basis: int, t: Fraction | float) -> list[float]:
    """``[P_0(2t - 1), ..., P_{K-1}(2t - 1)]`` by Bonnet's recurrence ``(k+1) P_{k+1} = (2k+1) x P_k - k P_{k-1}``.

    Example:
        >>> shifted_legendre(3, 1.0), shifted_legendre(3, 0.0)
        ([1.0, 1.0, 1.0], [1.0, -1.0, 1.0])
    """
    x = 2.0 * float(t) - 1.0
    values = [1.0, x][:n_basis]
    for k in range(1, n_basis - 1):
        values.append(((2 * k + 1) * x * values[k] - k * values[k - 1]) / (k + 1))
    return values


class LegendreBasis(Basis):
    """Shifted Legendre polynomials ``P_k(2t - 1)``, ``k < K``: a polynomial of degree ``K - 1`` in depth.

    Refinement doubles the number of coefficients (``K -> 2K``, new ones zero); projection truncates.
    """

    name = "legendre"
    min_size = 1
    partition_of_unity = False

    def breakpoints(self, n_basis: int) -> list[Fraction]:
        return [Fraction(0), Fraction(1)]

    def degree(self, n_basis: int) -> int:
        return n_basis - 1

    def node_weights(self, n_basis: int, t: Fraction, left_limit: bool = False) -> NodeWeights:
        """Every coefficient with a non-zero value of its polynomial at ``t`` (``theta`` is continuous:
        ``left_limit`` changes nothing)."""
        return tuple((k, value) for k, value in enumerate(shifted_legendre(n_basis, t)) if value != 0.0)

    def refined_size(self, n_basis: int) -> int:
        return 2 * n_basis

    def refinement_matrix(self, n_basis: int) -> torch.Tensor:
        """``[2K, K]``: the identity on the first ``K`` coefficients, zeros for the new higher degrees."""
        self.validate_size(n_basis)
        return torch.eye(self.refined_size(n_basis), n_basis, dtype=torch.float64)

    def coefficient_spans(self, n_basis: int) -> list[tuple[Fraction, Fraction]]:
        return [(Fraction(0), Fraction(1))] * n_basis


register_basis(LegendreBasis())
