"""Runge-Kutta tableaux and the fixed-step integrator against analytic solutions and hand-written steps."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightning_cnet.integrators import get_scheme, list_schemes, odeint_fixed, register_scheme, rk_step

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "ralston": 2, "rk3": 3, "rk4": 4, "rk4_38": 4}

# Problems with a closed-form solution: (f(t, x), x0, t0, t1, exact x(t1)).
PROBLEMS = {
    "decay": (lambda t, x: -x, 1.0, 0.0, 1.0, math.exp(-1.0)),
    "logistic": (lambda t, x: x * (1 - x), 0.1, 0.0, 2.0, 1.0 / (1.0 + 9.0 * math.exp(-2.0))),
    # Non-autonomous, so a stage evaluated at the wrong time c_j loses the order: x = 1 / (1/x0 - t^2/2).
    "t_x_squared": (lambda t, x: t * x * x, 0.5, 0.0, 1.0, 1.0 / (2.0 - 0.5)),
}


@pytest.fixture
def schemes(isolated_schemes: dict) -> dict:
    """The built-in schemes plus Ralston's second-order method registered by the user."""
    register_scheme("ralston", a=[[0, 0], [Fraction(2, 3), 0]], b=[Fraction(1, 4), Fraction(3, 4)], order=2)
    return isolated_schemes


def _solve(scheme: str, problem: str, n_steps: int) -> float:
    func, x0, t0, t1, _ = PROBLEMS[problem]
    return odeint_fixed(func, torch.tensor([x0], dtype=torch.float64), t0, t1, n_steps, scheme).item()


def test_builtin_schemes_are_listed(isolated_schemes: dict) -> None:
    assert list_schemes() == sorted(["euler", "midpoint", "heun", "rk3", "rk4", "rk4_38"])
    assert {name: get_scheme(name).order for name in list_schemes()} == {
        name: order for name, order in ORDERS.items() if name != "ralston"
    }


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("scheme", sorted(ORDERS))
def test_scheme_converges_at_its_order(schemes: dict, scheme: str, problem: str) -> None:
    exact = PROBLEMS[problem][-1]
    step_counts = [8, 16, 32, 64]
    errors = [abs(_solve(scheme, problem, n) - exact) for n in step_counts]
    assert min(errors) > 1e-13, "step sizes must stay above round-off for the fit to mean anything"
    slope = np.polyfit(np.log([1.0 / n for n in step_counts]), np.log(errors), 1)[0]
    assert abs(slope - ORDERS[scheme]) < 0.2, f"{scheme} on {problem}: observed order {slope:.3f}"


def _classic_rk4_step(f, t: float, x: float, h: float) -> float:
    k1 = f(t, x)
    k2 = f(t + h / 2, x + h / 2 * k1)
    k3 = f(t + h / 2, x + h / 2 * k2)
    k4 = f(t + h, x + h * k3)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _three_eighths_step(f, t: float, x: float, h: float) -> float:
    k1 = f(t, x)
    k2 = f(t + h / 3, x + h / 3 * k1)
    k3 = f(t + 2 * h / 3, x + h * (-k1 / 3 + k2))
    k4 = f(t + h, x + h * (k1 - k2 + k3))
    return x + h / 8 * (k1 + 3 * k2 + 3 * k3 + k4)


@pytest.mark.parametrize(("scheme", "hand_step"), [("rk4", _classic_rk4_step), ("rk4_38", _three_eighths_step)])
def test_fourth_order_schemes_match_their_textbook_formulas(scheme: str, hand_step) -> None:
    f = PROBLEMS["t_x_squared"][0]
    x, t, h = 0.5, 0.2, 0.3
    expected = hand_step(f, t, x, h)
    got = rk_step(f, torch.tensor([x], dtype=torch.float64), t, h, scheme).item()
    assert got == pytest.approx(expected, abs=1e-15)


def test_classic_rk4_is_not_the_three_eighths_rule() -> None:
    # Both have the same stability polynomial, so a linear problem cannot tell them apart; a non-linear one can.
    f, x0, t0, t1, _ = PROBLEMS["logistic"]
    x = torch.tensor([x0], dtype=torch.float64)
    classic = odeint_fixed(f, x, t0, t1, 2, "rk4").item()
    three_eighths = odeint_fixed(f, x, t0, t1, 2, "rk4_38").item()
    assert abs(classic - three_eighths) > 1e-6
    assert get_scheme("rk4").b == (1 / 6, 1 / 3, 1 / 3, 1 / 6)


@pytest.mark.parametrize("n_steps", [1, 3, 7])
@pytest.mark.parametrize("scheme", sorted(ORDERS))
def test_quadrature_of_t_is_exact_for_consistent_nodes(schemes: dict, scheme: str, n_steps: int) -> None:
    """x' = t from 0 to 1 gives 1/2 exactly for every scheme of order >= 2 (it needs sum b_j c_j = 1/2 and
    the stages at the right times); Euler is a left Riemann sum, (N - 1) / (2N)."""
    x1 = odeint_fixed(lambda t, x: torch.full_like(x, t), torch.zeros(1, dtype=torch.float64), 0.0, 1.0, n_steps,
                      scheme)
    expected = 0.5 if ORDERS[scheme] >= 2 else (n_steps - 1) / (2 * n_steps)
    assert x1.item() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("scheme", ["midpoint", "rk3", "rk4", "rk4_38"])
def test_integration_respects_the_start_time(scheme: str) -> None:
    # x' = t on [1, 3]: x(3) - x(1) = (9 - 1) / 2 = 4, exact for order >= 2.
    x1 = odeint_fixed(lambda t, x: torch.full_like(x, t), torch.zeros(1, dtype=torch.float64), 1.0, 3.0, 3, scheme)
    assert x1.item() == pytest.approx(4.0, abs=1e-14)


def test_integration_keeps_batch_shape_and_dtype() -> None:
    x0 = torch.randn(3, 2, dtype=torch.float64)
    x1 = odeint_fixed(lambda t, x: -x, x0, 0.0, 1.0, 16, "rk4")
    assert x1.shape == x0.shape and x1.dtype == torch.float64
    torch.testing.assert_close(x1, x0 * math.exp(-1.0), atol=0, rtol=3e-7)


def test_registered_scheme_computes_nodes_from_a(isolated_schemes: dict) -> None:
    tableau = register_scheme("ralston", a=[[0, 0], [2 / 3, 0]], b=[1 / 4, 3 / 4], order=2)
    assert tableau.c == (Fraction(0), Fraction(2, 3))
    assert get_scheme("ralston") is tableau
    assert "ralston" in list_schemes()


INVALID_TABLEAUX = {
    "above the diagonal": (dict(a=[[0, 1], [0.5, 0]], b=[0.5, 0.5]), "strictly lower triangular"),
    "on the diagonal": (dict(a=[[0.5, 0], [0.5, 0]], b=[0.5, 0.5]), "strictly lower triangular"),
    "inconsistent c": (dict(a=[[0, 0], [0.5, 0]], b=[0, 1], c=[0, 0.7]), "c[1]"),
    "b not summing to one": (dict(a=[[0, 0], [0.5, 0]], b=[0.5, 0.4]), "sum to 1"),
    "b longer than a": (dict(a=[[0, 0], [0.5, 0]], b=[0.2, 0.3, 0.5]), "3x3 matrix"),
    "a not square": (dict(a=[[0, 0], [0.5]], b=[0, 1]), "2x2 matrix"),
    "c of the wrong length": (dict(a=[[0, 0], [0.5, 0]], b=[0, 1], c=[0, 0.5, 1]), "c must hold 2 nodes"),
    "no stages": (dict(a=[], b=[]), "at least one weight"),
    "order zero": (dict(a=[[0]], b=[1], order=0), "order must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(INVALID_TABLEAUX))
def test_invalid_tableau_is_rejected_and_not_registered(isolated_schemes: dict, case: str) -> None:
    kwargs, message = INVALID_TABLEAUX[case]
    before = dict(isolated_schemes)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        register_scheme("broken", **kwargs)
    assert "broken" not in list_schemes()
    assert isolated_schemes == before


def test_duplicate_name_is_rejected_unless_overwriting(isolated_schemes: dict) -> None:
    classic = get_scheme("rk4")
    with pytest.raises(ValueError, match="'rk4' is already registered.*overwrite=True"):
        register_scheme("rk4", a=[[0]], b=[1])
    assert get_scheme("rk4") is classic
    replaced = register_scheme("rk4", a=[[0]], b=[1], overwrite=True)
    assert get_scheme("rk4") is replaced


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"scheme='rk5' is not known: expected one of \[.*'rk4_38'.*\]"):
        get_scheme("rk5")


@pytest.mark.parametrize("n_steps", [0, -1, 2.0, True, "4"])
def test_invalid_step_count_is_rejected(n_steps) -> None:
    with pytest.raises(ValueError, match="n_steps=.* expected an integer >= 1"):
        odeint_fixed(lambda t, x: x, torch.ones(1), 0.0, 1.0, n_steps, "euler")


# ---------------------------------------------------------------------- times given as tensors
def test_one_element_tensor_times_give_the_same_result_as_numbers() -> None:
    x0 = torch.tensor([0.3, -1.2], dtype=torch.float64)
    func = PROBLEMS["t_x_squared"][0]
    expected = odeint_fixed(func, x0, 0.5, 1.5, 4, "rk4")
    for t0, t1 in ((torch.tensor(0.5), torch.tensor(1.5)), (torch.tensor([0.5]), 1.5),
                   (0.5, torch.tensor(1.5, dtype=torch.float64))):
        torch.testing.assert_close(odeint_fixed(func, x0, t0, t1, 4, "rk4"), expected, rtol=0, atol=0)
    torch.testing.assert_close(rk_step(func, x0, torch.tensor(0.5), torch.tensor(1.0)), rk_step(func, x0, 0.5, 1.0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("argument", ["t0", "t1"])
@pytest.mark.parametrize(("value", "message"), [
    (torch.tensor([0.0, 1.0]), "expected a number or a one-element real tensor"),
    (torch.tensor(1.0, requires_grad=True), r"requires a gradient: .*pass t\d.detach\(\) or a number"),
    (torch.tensor(True), "expected a number or a one-element real tensor"),
    (float("nan"), "expected a finite real number"),
    ("1", "expected a finite real number"),
])
def test_invalid_times_are_refused_naming_the_argument(argument: str, value, message: str) -> None:
    times = {"t0": 0.0, "t1": 1.0, argument: value}
    with pytest.raises(ValueError, match=f"^{argument}=.*{message}"):
        odeint_fixed(lambda t, x: -x, torch.ones(1), times["t0"], times["t1"], 2, "rk4")


# ---------------------------------------------------------------------- under torch.func transforms
def _out_of_place_solution(func, x0: torch.Tensor, t0: float, t1: float, n_steps: int, scheme: str) -> torch.Tensor:
    """The Runge-Kutta recurrence written out from the tableau, one out-of-place tensor per term."""
    tableau = get_scheme(scheme)
    h = (t1 - t0) / n_steps
    x = x0
    for step in range(n_steps):
        slopes = []
        for row, node in zip(tableau.a, tableau.c):
            stage = x
            for a_jl, k_l in zip(row, slopes):
                if a_jl:
                    stage = stage + (h * a_jl) * k_l
            slopes.append(func(t0 + (step + float(node)) * h, stage))
        for b_j, k_j in zip(tableau.b, slopes):
            if b_j:
                x = x + (h * b_j) * k_j
    return x


def _field(rate: torch.Tensor, t0: float):
    """``x' = -x`` at ``t0`` (a slope that ignores ``rate``), ``x' = -rate * x * t`` after."""
    return lambda t, x: -x if t == t0 else -rate * x * t


@pytest.mark.parametrize("scheme", sorted(ORDERS.keys() - {"ralston"}))
def test_vmap_over_a_parameter_equals_the_out_of_place_sum(scheme: str) -> None:
    # x0 is not mapped and the first slope does not read the mapped rate: the first terms of every combination of
    # the first step are plain tensors, the later ones batched.
    rates = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mapped = torch.func.vmap(lambda rate: odeint_fixed(_field(rate, 0.0), x0, 0.0, 1.0, 3, scheme))(rates)
    expected = torch.stack([_out_of_place_solution(_field(rate, 0.0), x0, 0.0, 1.0, 3, scheme) for rate in rates])
    torch.testing.assert_close(mapped, expected, rtol=1e-14, atol=0)
    assert not torch.equal(expected[0], expected[2])  # the mapped rate matters


@pytest.mark.parametrize("scheme", sorted(ORDERS.keys() - {"ralston"}))
def test_vmap_over_the_initial_state_and_grad_equal_the_out_of_place_sum(scheme: str) -> None:
    x0 = torch.tensor([[1.0, -2.0], [0.5, 3.0], [0.0, 1.0]], dtype=torch.float64)
    rate = torch.tensor(1.5, dtype=torch.float64)
    mapped = torch.func.vmap(lambda x: odeint_fixed(_field(rate, 0.0), x, 0.0, 1.0, 3, scheme))(x0)
    expected = _out_of_place_solution(_field(rate, 0.0), x0, 0.0, 1.0, 3, scheme)
    torch.testing.assert_close(mapped, expected, rtol=1e-14, atol=0)

    def final_sum(r: torch.Tensor, solve) -> torch.Tensor:
        return solve(_field(r, 0.0), x0[0], 0.0, 1.0, 3, scheme).sum()

    gradient = torch.func.grad(final_sum)(rate, odeint_fixed)
    reference_rate = rate.clone().requires_grad_()
    (by_hand,) = torch.autograd.grad(final_sum(reference_rate, _out_of_place_solution), reference_rate)
    torch.testing.assert_close(gradient, by_hand, rtol=1e-13, atol=0)
