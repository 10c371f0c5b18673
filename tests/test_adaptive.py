"""Adaptive steps of embedded pairs: the tableaux at their orders, known ODEs at their tolerances, the same field as
torchdiffeq, and how a stage and a model use (and refuse) them."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lightning_cnet import AdaptiveRK, FixedStepRK, ODEBlock, get_model, odeint_adaptive, recalibrate_bn
from lightning_cnet.bases import get_basis
from lightning_cnet.integrators import get_scheme, make_tableau, odeint_fixed
from lightning_cnet.layers import at_time

PAIRS = {"bosh3": (3, 2), "dopri5": (5, 4)}  # order of the solution, order of the embedded solution

# dx/dt = f(t, x) on [0, 1], x(0), exact x(1)
PROBLEMS = {
    "gaussian": (lambda t, x: -2.0 * t * x, 1.0, math.exp(-1.0)),
    "riccati": (lambda t, x: t * x * x, 0.5, 1.0 / (2.0 - 0.5)),
}


def rooted_trees(order: int) -> list[tuple]:
    """Butcher's rooted trees with ``order`` nodes, a tree being the sorted tuple of its subtrees."""
    if order == 1:
        return [()]
    trees: set[tuple] = set()

    def children(remaining: int, smallest: tuple) -> list[list[tuple]]:
        if remaining == 0:
            return [[]]
        found = []
        for size in range(1, remaining + 1):
            for tree in rooted_trees(size):
                if (size, tree) >= smallest:
                    found += [[tree] + rest for rest in children(remaining - size, (size, tree))]
        return found

    for subtrees in children(order - 1, (0, ())):
        trees.add(tuple(sorted(subtrees)))
    return sorted(trees)


def _size(tree: tuple) -> int:
    return 1 + sum(_size(child) for child in tree)


def _density(tree: tuple) -> int:
    return _size(tree) * math.prod(_density(child) for child in tree)


def order_conditions_hold(a, b, order: int) -> bool:
    """Whether ``sum_i b_i Phi_i(t) = 1 / gamma(t)`` for every rooted tree of at most ``order`` nodes."""
    stages = len(b)

    def phi(tree: tuple) -> list[float]:  # the internal elementary weights, one per stage
        values = [1.0] * stages
        for child in tree:
            inner = phi(child)
            values = [v * sum(a[i][j] * inner[j] for j in range(stages)) for i, v in enumerate(values)]
        return values

    return all(abs(sum(w * p for w, p in zip(b, phi(tree))) - 1 / _density(tree)) < 1e-12
               for n in range(1, order + 1) for tree in rooted_trees(n))


def test_rooted_trees_are_counted_as_butcher_counts_them() -> None:
    assert [len(rooted_trees(n)) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_both_solutions_of_a_pair_have_exactly_their_orders(name: str) -> None:
    """Butcher's order conditions, from the tableau's coefficients: each solution satisfies those of its order and
    fails one of the next."""
    tableau = get_scheme(name)
    high, low = PAIRS[name]
    embedded = [b - e for b, e in zip(tableau.b, tableau.error_weights)]  # b_embedded = b - (b - b_embedded)
    assert (tableau.order, tableau.embedded_order) == (high, low)
    assert order_conditions_hold(tableau.a, tableau.b, high) and not order_conditions_hold(tableau.a, tableau.b,
                                                                                            high + 1)
    assert order_conditions_hold(tableau.a, embedded, low) and not order_conditions_hold(tableau.a, embedded, low + 1)


@pytest.mark.parametrize("name", ["rk4", "rk4_38", "rk3", "midpoint"])
def test_the_order_conditions_agree_with_the_fixed_step_schemes(name: str) -> None:
    tableau = get_scheme(name)
    assert order_conditions_hold(tableau.a, tableau.b, tableau.order)
    assert not order_conditions_hold(tableau.a, tableau.b, tableau.order + 1)


def test_a_fixed_step_of_a_pair_skips_the_stage_only_its_error_estimate_reads() -> None:
    assert (get_scheme("bosh3").n_stages, len(get_scheme("bosh3").c)) == (3, 4)
    assert (get_scheme("dopri5").n_stages, len(get_scheme("dopri5").c)) == (6, 7)
    assert get_scheme("bosh3").first_same_as_last and not get_scheme("rk4").first_same_as_last
    calls = []
    odeint_fixed(lambda t, x: calls.append(t) or x, torch.ones(1), 0.0, 1.0, 2, "dopri5")
    assert len(calls) == 12


def test_a_pair_needs_a_consistent_embedded_row() -> None:
    with pytest.raises(ValueError, match="b_embedded must sum to 1"):
        make_tableau("bad", [[0, 0], [1, 0]], [0.5, 0.5], order=2, b_embedded=[1.0, 0.5], embedded_order=1)
    with pytest.raises(ValueError, match=r"embedded_order=2 is not valid: expected an integer in \[1, 1\]"):
        make_tableau("bad", [[0, 0], [1, 0]], [0.5, 0.5], order=2, b_embedded=[1.0, 0.0], embedded_order=2)
    with pytest.raises(ValueError, match="embedded_order=1 needs b_embedded"):
        make_tableau("bad", [[0, 0], [1, 0]], [0.5, 0.5], order=2, embedded_order=1)


# ---------------------------------------------------------------------- known ODEs at their tolerances
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_known_ode_is_solved_to_its_tolerance(name: str, problem: str) -> None:
    func, x0, exact = PROBLEMS[problem]
    evaluations = []
    for tolerance in (1e-4, 1e-6, 1e-8):
        x1, statistics = odeint_adaptive(func, torch.tensor([x0], dtype=torch.float64), 0.0, 1.0, scheme=name,
                                         rtol=tolerance, atol=tolerance)
        assert abs(x1.item() - exact) <= 5 * tolerance * (1 + abs(exact)), (tolerance, x1.item() - exact)
        evaluations.append(statistics.function_evaluations)
    assert evaluations == sorted(evaluations) and evaluations[0] < evaluations[-1]


def _theta_ode(basis_name: str, coeffs: torch.Tensor, depth: float):
    """dx/dt = depth * theta(t) * x: x(1) = x(0) * exp(depth * integral of theta), the integral by hand."""
    integral = {"piecewise_constant": coeffs.mean(),
                "piecewise_linear": (coeffs[1:] + coeffs[:-1]).mean() / 2,
                "legendre": coeffs[0]}[basis_name]  # integral of P_k(2t - 1) over [0, 1] is 1 for k = 0, else 0
    return (lambda nodes, x: at_time(list(coeffs), nodes) * x), math.exp(depth * float(integral))


@pytest.mark.parametrize(("basis_name", "n_basis"), [("piecewise_constant", 4), ("piecewise_linear", 5),
                                                      ("legendre", 4)])
def test_theta_of_every_basis_is_integrated_to_the_tolerance_through_the_protocol(basis_name: str,
                                                                                   n_basis: int) -> None:
    coeffs = torch.tensor([0.5, -1.5, 2.0, 1.0, -0.5][:n_basis], dtype=torch.float64)
    rate, exact = _theta_ode(basis_name, coeffs, depth=1.5)
    basis = get_basis(basis_name)
    for tolerance in (1e-5, 1e-8):
        integrator = AdaptiveRK("dopri5", rtol=tolerance, atol=tolerance)
        plan = integrator.plan(basis, n_basis)
        x1 = integrator.integrate(rate, torch.ones(1, dtype=torch.float64), 1.5, plan)
        assert abs(x1.item() - exact) <= 5 * tolerance * (1 + exact)
        assert integrator.function_evaluations(plan) > 0


def test_every_evaluation_reads_theta_at_its_own_time_and_no_step_crosses_a_breakpoint() -> None:
    """The state carries its own time (dt/ds = 1, integrated exactly by any Runge-Kutta scheme): every evaluation must
    read the piece its time lies in, from inside the interval it is integrating."""
    n_basis, depth = 5, 2.0
    basis = get_basis("piecewise_constant")
    seen = []

    def rate(nodes, state):
        (piece, weight), = nodes
        t = state[0].item()
        seen.append((piece, t))
        return torch.stack([torch.ones_like(state[0]) / depth, (piece - 2.0) * state[1]])

    integrator = AdaptiveRK("bosh3", rtol=1e-7, atol=1e-9)
    x1 = integrator.integrate(rate, torch.tensor([0.0, 1.0], dtype=torch.float64), depth,
                              integrator.plan(basis, n_basis))
    assert x1[0].item() == pytest.approx(1.0, abs=1e-12)
    for piece, t in seen:
        assert piece / n_basis - 1e-12 <= t <= (piece + 1) / n_basis + 1e-12, (piece, t)
    assert [piece for piece, _ in seen] == sorted(piece for piece, _ in seen)  # interval by interval
    assert x1[1].item() == pytest.approx(math.exp(depth * sum(k - 2.0 for k in range(n_basis)) / n_basis), rel=1e-6)


def test_adaptive_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="scheme='rk4' has no embedded error estimate"):
        AdaptiveRK("rk4")
    with pytest.raises(ValueError, match=r"rtol=-1 is not valid: expected a finite number >= 0"):
        AdaptiveRK("dopri5", rtol=-1)
    with pytest.raises(ValueError, match="rtol=0 and atol=0"):
        AdaptiveRK("dopri5", rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_steps=0 is not valid"):
        AdaptiveRK("dopri5", n_steps=0)
    with pytest.raises(RuntimeError, match="took 3 steps and reached only"):
        odeint_adaptive(lambda t, x: -50 * x, torch.ones(1), 0.0, 1.0, rtol=1e-10, atol=1e-12, max_steps=3)


# ---------------------------------------------------------------------- the same field as torchdiffeq
@pytest.mark.parametrize(("basis_name", "n_basis"), [("piecewise_constant", 4), ("piecewise_linear", 4),
                                                      ("legendre", 3)])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_a_stage_agrees_with_torchdiffeq_on_the_same_field(name: str, basis_name: str, n_basis: int) -> None:
    """torchdiffeq integrates the block's own right-hand side, stepping onto the breakpoints (``jump_t``) and onto
    t = 1 (``step_t``, so that it returns a step's end rather than an interpolant)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    block = ODEBlock(4, unit="mlp", unit_kwargs={"hidden": 16}, n_basis=n_basis, basis=basis_name, T=2.0,
                     skip_init=False).double().eval()
    x0 = torch.randn(5, 4, dtype=torch.float64)
    evaluations = [0]

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        evaluations[0] += 1
        return block.T * block._rate(block.basis.node_weights(n_basis, Fraction(min(max(float(t), 0.0), 1.0))), x)

    jumps = [float(point) for point in block.basis.breakpoints(n_basis)[1:-1]]
    options = {"step_t": torch.tensor([1.0], dtype=torch.float64)}
    if jumps:
        options["jump_t"] = torch.tensor(jumps, dtype=torch.float64)
    span = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        reference = torchdiffeq.odeint(field, x0, span, method="dopri5", rtol=1e-12, atol=1e-12, options=options)[-1]
        for tolerance in (1e-4, 1e-7):
            evaluations[0] = 0
            theirs = torchdiffeq.odeint(field, x0, span, method=name, rtol=tolerance, atol=tolerance,
                                        options=options)[-1]
            with block.manifestation(integrator=AdaptiveRK(name, rtol=tolerance, atol=tolerance)):
                ours = block(x0)
                ours_evaluations = block.function_evaluations
            bound = 10 * tolerance * (1 + reference.abs().max().item())
            assert (ours - reference).abs().max().item() <= bound
            assert (ours - theirs).abs().max().item() <= bound
            assert 0.5 <= ours_evaluations / evaluations[0] <= 2.0, (ours_evaluations, evaluations[0])


# ---------------------------------------------------------------------- in a stage and a model
def test_a_model_evaluated_with_adaptive_steps_approaches_the_limit_of_fixed_steps() -> None:
    """On a ReLU network RK4 converges at order ~2: RK4 at 512 steps stands for the ODE's solution; adaptive steps
    at a tight tolerance land nearer to it than RK4 at 64 steps."""
    model = get_model("cnet_digits", n_steps=2, T=2.0).double().eval()
    for stage in model.stages:
        for gate in stage.gate.gate:
            torch.nn.init.constant_(gate, 0.5)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        with model.manifestation(scheme="rk4", n_steps=512):
            limit = model(x)
        with model.manifestation(scheme="rk4", n_steps=64):
            coarse = model(x)
        with model.manifestation(integrator=AdaptiveRK("dopri5", rtol=1e-9, atol=1e-9)):
            adaptive = model(x)
            assert [r.adaptive for r in model.resolution] == [True] * 3 and model.function_evaluations > 0
    assert not model.resolution[0].adaptive and model.resolution[0] == model.stages[0].resolution
    assert (adaptive - limit).abs().max() < min(1e-6, (coarse - limit).abs().max().item() / 2)


def test_training_with_adaptive_steps_is_refused_in_one_line() -> None:
    model = get_model("cnet_digits", n_steps=2)
    model.set_manifestation(integrator=AdaptiveRK("bosh3"))
    with pytest.raises(RuntimeError) as error:
        model(torch.randn(2, 1, 8, 8))
    assert "is for evaluation, and this stage is in training mode" in str(error.value)
    assert "\n" not in str(error.value)
    before = [piece.running_mean.clone() for piece in model.stages[0].unit.norm1.pieces]
    with pytest.raises(ValueError, match=r"recalibrate_bn runs the model in training mode, where stage stages.0 "
                                         r"refuses AdaptiveRK\('bosh3'"):
        recalibrate_bn(model, [torch.randn(4, 1, 8, 8)])
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, model.stages[0].unit.norm1.pieces))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_the_manifestation_context_restores_the_fixed_steps_exactly() -> None:
    block = ODEBlock(4, unit="mlp", n_basis=2, n_steps=3, scheme="rk4", skip_init=False)
    before, plan = block.resolution, block._plan
    with block.manifestation(integrator=AdaptiveRK("dopri5", rtol=1e-5, atol=1e-7)):
        assert block.resolution.describe() == "n_steps=3 n_basis=2 dopri5 rtol=1e-05 atol=1e-07"
    assert block.resolution == before and block._plan is plan
    block.set_manifestation(integrator=FixedStepRK("midpoint", n_steps=5))
    assert (block.scheme, block.n_steps, block.function_evaluations) == ("midpoint", 5, 10)
    with pytest.raises(ValueError, match="give one of them"):
        block.set_manifestation(scheme="rk4", integrator=AdaptiveRK("dopri5"))
    with pytest.raises(ValueError, match="ask for two step counts"):
        block.set_manifestation(n_steps=2, integrator=FixedStepRK("rk4", n_steps=4))
    with pytest.raises(ValueError, match="expected a FixedStepRK or an AdaptiveRK"):
        block.set_manifestation(integrator="dopri5")  # type: ignore[arg-type]


def test_a_sample_s_output_depends_on_its_batchmates_within_the_tolerance() -> None:
    """One step size for the whole batch: a sample alone gets other steps, and an answer within the tolerance."""
    block = ODEBlock(3, unit="mlp", n_basis=1, T=3.0, skip_init=False).double().eval()
    x = torch.randn(8, 3, dtype=torch.float64) * torch.logspace(-1, 1, 8, dtype=torch.float64)[:, None]
    tolerance = 1e-6
    with torch.no_grad(), block.manifestation(integrator=AdaptiveRK("dopri5", rtol=tolerance, atol=tolerance)):
        together = block(x)
        batch_evaluations = block.function_evaluations
        alone = torch.cat([block(x[i:i + 1]) for i in range(len(x))])
    assert batch_evaluations > 0
    torch.testing.assert_close(together, alone, rtol=10 * tolerance, atol=10 * tolerance)


def test_an_adaptive_manifestation_travels_in_the_state_dict() -> None:
    source = get_model("cnet_digits", n_steps=2)
    source.set_manifestation(integrator=AdaptiveRK("dopri5", rtol=1e-4, atol=1e-6))
    state = source.state_dict()
    assert state["stages.1.resolution.rtol"].item() == 1e-4 and state["stages.1.resolution.atol"].item() == 1e-6
    target = get_model("cnet_digits", n_steps=2)
    target.load_state_dict(state)
    assert target.resolution == source.resolution and target.stages[2].integrator == source.stages[2].integrator
