"""Time bases against hand definitions: evaluation, refinement, Gram matrices and L2 projection."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_cnet.bases import Basis, get_basis, list_bases

CONSTANT = get_basis("piecewise_constant")
LINEAR = get_basis("piecewise_linear")

# Midpoints of a uniform grid whose cell count is divisible by every K - 1 and K used below, so every cell
# lies inside one piece and the midpoint rule's error is that of a smooth (at most quadratic) integrand.
N_SAMPLES = 20160
SAMPLE_TIMES = (np.arange(N_SAMPLES) + 0.5) / N_SAMPLES


def constant_functions(n_basis: int, t: np.ndarray) -> np.ndarray:
    """Indicator of ``[k/K, (k+1)/K)`` for each k (the last piece holds t = 1): ``[len(t), K]``."""
    pieces = np.minimum(np.floor(t * n_basis).astype(int), n_basis - 1)
    return (pieces[:, None] == np.arange(n_basis)[None, :]).astype(float)


def hat_functions(n_basis: int, t: np.ndarray) -> np.ndarray:
    """Hat function of node ``k/(K-1)`` for each k: ``[len(t), K]``."""
    return np.maximum(0.0, 1.0 - np.abs(t[:, None] * (n_basis - 1) - np.arange(n_basis)[None, :]))


FUNCTIONS = {"piecewise_constant": constant_functions, "piecewise_linear": hat_functions}


def test_registry() -> None:
    assert list_bases() == ["legendre", "piecewise_constant", "piecewise_linear"]
    assert get_basis(LINEAR) is LINEAR
    with pytest.raises(ValueError,
                       match=r"basis='chebyshev' is not known: expected one of \['legendre', 'piecewise_constant'"):
        get_basis("chebyshev")


@pytest.mark.parametrize("basis", [CONSTANT, LINEAR], ids=lambda b: b.name)
@pytest.mark.parametrize("n_basis", [2, 3, 5, 8])
def test_evaluate_matches_the_hand_definition(basis: Basis, n_basis: int) -> None:
    coeffs = torch.randn(n_basis, 3, dtype=torch.float64)
    breakpoints = [k / n_basis for k in range(n_basis + 1)] + [k / (n_basis - 1) for k in range(n_basis)]
    times = np.concatenate([np.linspace(0.0, 1.0, 101), breakpoints, [0.0, 1.0]])
    for t in times:
        if basis is CONSTANT:  # exact piece of the float t (k/K is rarely a float, so compare exactly)
            expected = coeffs[min(math.floor(Fraction(float(t)) * n_basis), n_basis - 1)]
        else:
            expected = torch.from_numpy(hat_functions(n_basis, np.array([t]))[0]) @ coeffs
        torch.testing.assert_close(basis.evaluate(coeffs, float(t)), expected, atol=1e-14, rtol=0)


def test_evaluate_rejects_times_outside_the_interval() -> None:
    with pytest.raises(ValueError, match=r"t=1.5 must lie in \[0, 1\]"):
        CONSTANT.evaluate(torch.zeros(2), 1.5)


def test_left_limit_reads_the_piece_before_a_jump() -> None:
    assert CONSTANT.node_weights(4, Fraction(1, 2)) == ((2, 1.0),)
    assert CONSTANT.node_weights(4, Fraction(1, 2), left_limit=True) == ((1, 1.0),)
    assert CONSTANT.node_weights(4, Fraction(1), left_limit=True) == ((3, 1.0),)
    assert CONSTANT.node_weights(4, Fraction(0), left_limit=True) == ((0, 1.0),)
    # theta is continuous for the linear basis: the left limit is the value.
    assert LINEAR.node_weights(3, Fraction(1, 2), left_limit=True) == ((1, 1.0),)
    assert LINEAR.node_weights(3, Fraction(1, 4)) == ((0, 0.5), (1, 0.5))


@pytest.mark.parametrize("basis", [CONSTANT, LINEAR], ids=lambda b: b.name)
@pytest.mark.parametrize("n_basis", [2, 3, 4, 7])
def test_refinement_leaves_theta_unchanged(basis: Basis, n_basis: int) -> None:
    coeffs = torch.randn(n_basis, 2, 3, dtype=torch.float64)
    refined = basis.apply(basis.refinement_matrix(n_basis), coeffs)
    assert refined.shape == (basis.refined_size(n_basis), 2, 3)
    fine = refined.shape[0]
    times = list(np.random.default_rng(0).uniform(0, 1, 200)) + [k / (2 * n_basis) for k in range(2 * n_basis + 1)]
    times += [k / (fine - 1) for k in range(fine)]
    for t in times:
        torch.testing.assert_close(basis.evaluate(refined, t), basis.evaluate(coeffs, t), atol=1e-13, rtol=0)


@pytest.mark.parametrize("n_basis", [1, 2, 5])
def test_piecewise_constant_refinement_duplicates_each_piece(n_basis: int) -> None:
    coeffs = torch.randn(n_basis, 4, dtype=torch.float64)
    refined = CONSTANT.apply(CONSTANT.refinement_matrix(n_basis), coeffs)
    assert CONSTANT.refined_size(n_basis) == 2 * n_basis
    torch.testing.assert_close(refined, coeffs.repeat_interleave(2, dim=0), atol=1e-15, rtol=0)


@pytest.mark.parametrize("n_basis", [2, 3, 6])
def test_piecewise_linear_refinement_inserts_midpoints(n_basis: int) -> None:
    coeffs = torch.randn(n_basis, 4, dtype=torch.float64)
    refined = LINEAR.apply(LINEAR.refinement_matrix(n_basis), coeffs)
    expected = []
    for k in range(n_basis - 1):
        expected += [coeffs[k], (coeffs[k] + coeffs[k + 1]) / 2]
    expected.append(coeffs[-1])
    assert LINEAR.refined_size(n_basis) == 2 * n_basis - 1
    torch.testing.assert_close(refined, torch.stack(expected), atol=1e-15, rtol=0)


@pytest.mark.parametrize("n_basis", [1, 3, 6])
def test_piecewise_constant_mass_matrix(n_basis: int) -> None:
    torch.testing.assert_close(CONSTANT.mass_matrix(n_basis), torch.eye(n_basis, dtype=torch.float64) / n_basis)


@pytest.mark.parametrize("n_basis", [2, 3, 6])
def test_piecewise_linear_mass_matrix(n_basis: int) -> None:
    h = 1.0 / (n_basis - 1)
    expected = np.diag(np.full(n_basis, 2 * h / 3)) + np.diag(np.full(n_basis - 1, h / 6), 1)
    expected += np.diag(np.full(n_basis - 1, h / 6), -1)
    expected[0, 0] = expected[-1, -1] = h / 3
    torch.testing.assert_close(LINEAR.mass_matrix(n_basis), torch.from_numpy(expected), atol=1e-15, rtol=0)


PROJECTIONS = [
    ("piecewise_constant", 8, 4),
    ("piecewise_constant", 6, 4),
    ("piecewise_constant", 5, 3),
    ("piecewise_constant", 7, 2),
    ("piecewise_constant", 4, 1),
    ("piecewise_constant", 3, 3),
    ("piecewise_linear", 9, 5),
    ("piecewise_linear", 6, 4),
    ("piecewise_linear", 5, 3),
    ("piecewise_linear", 7, 5),
    ("piecewise_linear", 4, 3),
    ("piecewise_linear", 8, 2),
]


@pytest.mark.parametrize(("name", "n_from", "n_to"), PROJECTIONS)
def test_projection_is_the_least_squares_fit(name: str, n_from: int, n_to: int) -> None:
    """Brute force: fit the coarse basis to theta sampled on 20160 points; the midpoint rule is exact for the
    piecewise-constant integrands and O(1/N^2) ~ 1e-9 for the piecewise-quadratic ones."""
    basis, functions = get_basis(name), FUNCTIONS[name]
    coeffs = torch.randn(n_from, 3, dtype=torch.float64)
    theta = functions(n_from, SAMPLE_TIMES) @ coeffs.numpy()
    fitted, *_ = np.linalg.lstsq(functions(n_to, SAMPLE_TIMES), theta, rcond=None)
    projected = basis.apply(basis.projection_matrix(n_from, n_to), coeffs)
    tolerance = 1e-10 if name == "piecewise_constant" else 1e-7
    torch.testing.assert_close(projected, torch.from_numpy(fitted), atol=tolerance, rtol=0)


NESTED = [
    ("piecewise_constant", 8, 4),
    ("piecewise_constant", 6, 3),
    ("piecewise_constant", 7, 1),
    ("piecewise_constant", 4, 4),
    ("piecewise_linear", 9, 5),
    ("piecewise_linear", 5, 3),
    ("piecewise_linear", 7, 4),
    ("piecewise_linear", 7, 2),
    ("piecewise_linear", 4, 4),
]


@pytest.mark.parametrize(("name", "n_from", "n_to"), NESTED)
def test_projection_returns_a_function_of_the_coarse_space_exactly(name: str, n_from: int, n_to: int) -> None:
    """Write a coarse function in the finer basis (its values at the fine piece midpoints or nodes) and
    project it back: the coarse coefficients come out."""
    basis, functions = get_basis(name), FUNCTIONS[name]
    coarse = torch.randn(n_to, 2, dtype=torch.float64)
    if name == "piecewise_constant":
        fine_points = (np.arange(n_from) + 0.5) / n_from
    else:
        fine_points = np.arange(n_from) / (n_from - 1)
    fine = torch.from_numpy(functions(n_to, fine_points)) @ coarse
    projected = basis.apply(basis.projection_matrix(n_from, n_to), fine)
    torch.testing.assert_close(projected, coarse, atol=1e-13, rtol=0)


@pytest.mark.parametrize("n_basis", [2, 4, 8])
def test_piecewise_constant_halving_is_block_averaging(n_basis: int) -> None:
    coeffs = torch.randn(n_basis, 3, 2, dtype=torch.float64)
    projected = CONSTANT.apply(CONSTANT.projection_matrix(n_basis, n_basis // 2), coeffs)
    expected = coeffs.reshape(n_basis // 2, 2, 3, 2).mean(dim=1)
    torch.testing.assert_close(projected, expected, atol=1e-15, rtol=0)


def test_projection_refuses_finer_and_invalid_sizes() -> None:
    with pytest.raises(ValueError, match=r"finer one of 5: expected n_to in \[1, 3\]"):
        CONSTANT.projection_matrix(3, 5)
    with pytest.raises(ValueError,
                       match="n_to=1 is not valid for the 'piecewise_linear' basis: expected an integer >= 2"):
        LINEAR.projection_matrix(3, 1)
    with pytest.raises(ValueError, match="n_basis=0 is not valid"):
        CONSTANT.refinement_matrix(0)
    with pytest.raises(ValueError, match="n_from=2.5 is not valid"):
        CONSTANT.projection_matrix(2.5, 1)


def test_apply_maps_dimension_zero_and_keeps_dtype() -> None:
    coeffs = torch.randn(3, 2, 5)
    matrix = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    mapped = Basis.apply(matrix, coeffs)
    assert mapped.dtype == torch.float32 and mapped.shape == (2, 2, 5)
    torch.testing.assert_close(mapped, torch.stack([coeffs[0], (coeffs[0] + coeffs[1]) / 2]))


def test_returned_matrices_are_copies() -> None:
    matrix = CONSTANT.refinement_matrix(2)
    matrix.zero_()
    assert CONSTANT.refinement_matrix(2).sum().item() == 4.0
