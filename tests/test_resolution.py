"""The stage state (one immutable StageResolution), its checkpoint tensors, refinement's step factor, all-or-nothing
changes of it, and the basis contract a new family declares."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import pytest
import torch

from lightning_cnet import ContinuousNet, ODEBlock, StageResolution
from lightning_cnet.bases import Basis, NodeWeights, get_basis
from lightning_cnet.integrators import make_tableau
from lightning_cnet.resolution import RESOLUTION_KEYS


def _tiny(**kwargs) -> ContinuousNet:
    return ContinuousNet((4, 8), **{"in_chans": 1, "num_classes": 3, **kwargs})


# ---------------------------------------------------------------------- the object
def test_it_validates_each_value_in_one_line() -> None:
    cases = [
        (dict(n_steps=0), "n_steps=0 is not valid: expected an integer >= 1"),
        (dict(n_steps=2.5), "n_steps=2.5 is not valid: expected an integer >= 1"),
        (dict(n_basis=1, basis="piecewise_linear"), "n_basis=1 is not valid for the 'piecewise_linear' basis"),
        (dict(T=math.nan), "T=nan is not valid: expected a finite positive physical depth"),
        (dict(scheme="rk5"), "scheme='rk5' is not known"),
        (dict(basis="chebyshev"), "basis='chebyshev' is not known"),
        (dict(rtol=1e-3), "adaptive steps need both tolerances, fixed steps neither"),
        (dict(scheme="rk4", rtol=1e-3, atol=1e-6), "scheme='rk4' has no embedded error estimate"),
        (dict(scheme="dopri5", rtol=-1.0, atol=1e-6), "rtol=-1.0 is not valid"),
    ]
    for changes, message in cases:
        values = {"n_basis": 2, "n_steps": 2, "scheme": "euler", "basis": "piecewise_constant", "T": 1.0, **changes}
        with pytest.raises(ValueError) as error:
            StageResolution(**values)
        assert message in str(error.value) and "\n" not in str(error.value), (changes, str(error.value))


def test_it_is_immutable_compares_by_value_and_keeps_an_unregistered_tableau() -> None:
    ralston = make_tableau("ralston_here", a=[[0, 0], [2 / 3, 0]], b=[1 / 4, 3 / 4], order=2)
    resolution = StageResolution(2, 4, ralston, "piecewise_linear", 1.5)
    with pytest.raises(AttributeError):
        resolution.n_steps = 8  # type: ignore[misc]
    assert resolution.scheme == "ralston_here" and resolution.tableau is ralston
    assert resolution.replace(n_steps=8).tableau is ralston and resolution.replace(n_steps=8).n_steps == 8
    assert resolution == StageResolution(2, 4, ralston, get_basis("piecewise_linear"), 1.5)
    assert hash(resolution) == hash(StageResolution(2, 4, ralston, "piecewise_linear", 1.5))
    assert repr(resolution) == ("StageResolution(n_basis=2, n_steps=4, scheme='ralston_here', "
                                "basis='piecewise_linear', T=1.5)")
    with pytest.raises(ValueError, match="depth: not a field of StageResolution"):
        resolution.replace(depth=2.0)


@pytest.mark.parametrize("tolerances", [{}, {"rtol": 1e-4, "atol": 1e-6}])
def test_its_tensors_round_trip(tolerances: dict) -> None:
    resolution = StageResolution(3, 5, "dopri5", "piecewise_constant", 2.5, **tolerances)
    state = resolution.to_state_dict("stages.1.")
    expected = {f"stages.1.resolution.{name}" for name in RESOLUTION_KEYS + tuple(tolerances)}
    assert set(state) == expected
    assert state["stages.1.resolution.n_basis"].dtype == torch.int64 and state["stages.1.resolution.T"].item() == 2.5
    assert bytes(state["stages.1.resolution.scheme"].tolist()) == b"dopri5"
    decoded = StageResolution.from_state_dict(state, "stages.1.")
    assert decoded == resolution and decoded.adaptive == bool(tolerances)
    assert StageResolution.from_state_dict(state, "stages.0.") is None


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rtol", None, "stores stages.0.resolution.atol alone"),
    ("rtol", torch.tensor(-1.0, dtype=torch.float64), "the checkpoint's stage stages.0: rtol=-1.0 is not valid"),
    ("atol", torch.zeros(10**6), "stages.0.resolution.atol must be a one-element tensor"),
])
def test_hostile_tolerances_are_refused_in_milliseconds_with_the_model_unchanged(key, value, message) -> None:
    source = _tiny(n_steps=2)
    from lightning_cnet import AdaptiveRK

    source.set_manifestation(integrator=AdaptiveRK("bosh3", rtol=1e-3, atol=1e-6))
    state = source.state_dict()
    if value is None:
        del state[f"stages.0.resolution.{key}"]
    else:
        state[f"stages.0.resolution.{key}"] = value
    model = _tiny(n_steps=1)
    before, parameters = model.resolution, list(model.parameters())
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)
    assert time.perf_counter() - start < 0.5
    assert message in str(error.value) and "\n" not in str(error.value)
    assert model.resolution == before and all(a is b for a, b in zip(model.parameters(), parameters))


# ---------------------------------------------------------------------- held by a stage
def test_a_failed_load_puts_back_the_stage_state_and_its_plan() -> None:
    model = _tiny(n_steps=1)
    states = [(stage.resolution, stage._plan, stage.integrator) for stage in model.stages]
    source = _tiny(n_steps=2, scheme="rk4", T=3.0).state_dict()
    source["fc.weight"] = torch.zeros(7, 7)  # refused only after both stages were refined to the source's pieces
    with pytest.raises(RuntimeError, match="size mismatch for fc.weight"):
        model.load_state_dict(source)
    assert [(s.resolution, s._plan, s.integrator) for s in model.stages] == states
    assert all(stage._plan is plan for stage, (_, plan, _) in zip(model.stages, states))


@pytest.mark.parametrize(("step_factor", "steps"), [(1, 3), (2, 6), (3, 9)])
def test_refinement_multiplies_the_steps_by_the_step_factor(step_factor: int, steps: int) -> None:
    model = _tiny(n_steps=3, n_basis=2)
    change = model.refine(step_factor=step_factor)
    assert [(r.n_basis, r.n_steps) for r in change.after] == [(4, steps)] * 2
    assert [r.n_steps for r in change.before] == [3, 3]


def test_a_bad_step_factor_changes_nothing() -> None:
    model = _tiny(n_steps=2)
    before, parameters = model.resolution, list(model.parameters())
    with pytest.raises(ValueError, match="step_factor=0 is not valid: expected an integer >= 1"):
        model.refine(step_factor=0)
    assert model.resolution == before and all(a is b for a, b in zip(model.parameters(), parameters))


# ---------------------------------------------------------------------- a new basis is one class
class Monomials(Basis):
    """``theta(t) = sum_k theta_k t^k``: a family the package does not ship, to check what a new one must declare."""

    name = "monomials"
    min_size = 1
    partition_of_unity = False

    def breakpoints(self, n_basis: int) -> list[Fraction]:
        return [Fraction(0), Fraction(1)]

    def degree(self, n_basis: int) -> int:
        return n_basis - 1

    def node_weights(self, n_basis: int, t: Fraction, left_limit: bool = False) -> NodeWeights:
        return tuple((k, float(t) ** k) for k in range(n_basis) if k == 0 or t != 0)

    def refined_size(self, n_basis: int) -> int:
        return n_basis + 1

    def refinement_matrix(self, n_basis: int) -> torch.Tensor:
        return torch.eye(n_basis + 1, n_basis, dtype=torch.float64)

    def coefficient_spans(self, n_basis: int) -> list[tuple[Fraction, Fraction]]:
        return [(Fraction(0), Fraction(1))] * n_basis


def test_the_gram_matrix_is_exact_for_the_declared_degree() -> None:
    """``integral t^i t^j = 1 / (i + j + 1)``: the Hilbert matrix, degree 2K - 2 (Simpson's rule is exact to 3)."""
    basis = Monomials()
    hilbert = torch.tensor([[1.0 / (i + j + 1) for j in range(6)] for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(basis.mass_matrix(6), hilbert, atol=1e-15, rtol=0)
    coeffs = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)  # 1 + 3 t^2: its best line is 0 - 1/2 + 3 t
    torch.testing.assert_close(basis.apply(basis.projection_matrix(3, 2), coeffs),
                               torch.tensor([0.5, 3.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_the_built_in_bases_declare_their_contract() -> None:
    constant, linear = get_basis("piecewise_constant"), get_basis("piecewise_linear")
    assert constant.partition_of_unity and linear.partition_of_unity
    assert (constant.degree(4), linear.degree(4)) == (0, 1)
    assert constant.coefficient_spans(2) == [(0, Fraction(1, 2)), (Fraction(1, 2), 1)]
    assert linear.coefficient_spans(3) == [(0, 0), (Fraction(1, 2), Fraction(1, 2)), (1, 1)]


def test_a_stage_of_a_new_basis_runs_refines_and_refuses_batchnorm() -> None:
    with pytest.raises(ValueError, match="basis='monomials' is not valid for TimeBatchNorm2d"):
        ODEBlock(4, basis=Monomials(), n_basis=2)
    stage = ODEBlock(3, unit="mlp", basis=Monomials(), n_basis=2, n_steps=4, T=1.0, skip_init=False).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    before = stage(x).detach()
    stage.refine(step_factor=1)
    assert stage.n_basis == 3 and stage.basis.name == "monomials"
    torch.testing.assert_close(stage(x), before, atol=1e-14, rtol=0)
