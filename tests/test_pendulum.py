"""The pendulum study (``benchmarks/pendulum.py``): its exact solution against a fine RK4 integration and
hand-derived properties, its bookkeeping against hand computations, its training against the modified
equation of Euler's method, and a smoke run of the command line."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_cnet import odeint_fixed

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pendulum.py"
G = 9.81


def _load_study():
    spec = importlib.util.spec_from_file_location("pendulum_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


study = _load_study()


def pendulum_rate(t: float, x: torch.Tensor) -> torch.Tensor:
    """The pendulum written out here, independently of the study's own field."""
    return torch.stack((x[..., 1], -G * torch.sin(x[..., 0])), dim=-1)


def complete_elliptic_k(m: float) -> float:
    """K(m) = pi / (2 AGM(1, sqrt(1 - m))), by Gauss's arithmetic-geometric mean."""
    a, b = 1.0, math.sqrt(1.0 - m)
    for _ in range(8):  # the mean converges quadratically: 8 rounds reach round-off for m < 0.99
        a, b = (a + b) / 2, math.sqrt(a * b)
    return math.pi / (2 * a)


def energy(state: np.ndarray) -> np.ndarray:
    return state[..., 1] ** 2 / 2 - G * np.cos(state[..., 0])


def test_exact_solution_matches_a_fine_rk4_integration() -> None:
    theta0 = np.array([0.3, study.THETA0, 3.0])
    x = torch.tensor(np.stack([theta0, np.zeros(3)], axis=-1))
    for index in range(1, 11):  # states at t = 0.5, 1.0, ..., 5.0, RK4 with h = 1e-3
        x = odeint_fixed(pendulum_rate, x, 0.5 * (index - 1), 0.5 * index, 500, "rk4")
        np.testing.assert_allclose(x.numpy(), study.exact_state(0.5 * index, theta0), rtol=0, atol=1e-9)


def test_exact_solution_conserves_energy_and_has_the_elliptic_period() -> None:
    theta0 = study.THETA0
    t = np.linspace(0.0, 10.0, 2001)
    np.testing.assert_allclose(energy(study.exact_state(t)), -G * np.cos(theta0), rtol=0, atol=1e-12)
    period = float(study.period(theta0))
    assert period == pytest.approx(4 * complete_elliptic_k(math.sin(theta0 / 2) ** 2) / math.sqrt(G), rel=1e-13)
    np.testing.assert_allclose(study.exact_state(period), [theta0, 0.0], atol=1e-12)
    np.testing.assert_allclose(study.exact_state(period / 2), [-theta0, 0.0], atol=1e-12)
    # A quarter period on, the pendulum passes the bottom at the speed energy conservation gives.
    np.testing.assert_allclose(study.exact_state(period / 4), [0.0, -math.sqrt(2 * G * (1 - math.cos(theta0)))],
                               atol=1e-12)


def test_exact_solution_tends_to_the_harmonic_oscillator_for_small_angles() -> None:
    theta0, t = 1e-4, np.linspace(0.0, 3.0, 31)
    state = study.exact_state(t, theta0)
    np.testing.assert_allclose(state[:, 0], theta0 * np.cos(math.sqrt(G) * t), rtol=0, atol=1e-12)
    np.testing.assert_allclose(state[:, 1], -theta0 * math.sqrt(G) * np.sin(math.sqrt(G) * t), rtol=0, atol=1e-11)


@pytest.mark.parametrize("theta0", [0.0, -0.5, math.pi, 4.0])
def test_exact_solution_rejects_release_angles_outside_zero_pi(theta0: float) -> None:
    with pytest.raises(ValueError, match=r"\(0, pi\)"):
        study.exact_state(1.0, theta0)


def test_pairs_are_one_training_step_apart_on_trajectories_of_the_band() -> None:
    low, high, h0 = 2.2, 2.5, 0.05
    inputs, targets = study.sample_pairs(64, h0, (low, high), np.random.default_rng(3))
    assert inputs.dtype == targets.dtype == torch.float64 and inputs.shape == targets.shape == (64, 2)
    stepped = odeint_fixed(pendulum_rate, inputs, 0.0, h0, 50, "rk4")
    np.testing.assert_allclose(stepped.numpy(), targets.numpy(), rtol=0, atol=1e-10)
    levels = energy(inputs.numpy())  # each trajectory starts at rest, so E = -g cos(release angle)
    assert np.all(levels >= -G * np.cos(low) - 1e-9) and np.all(levels <= -G * np.cos(high) + 1e-9)
    assert levels.max() - levels.min() > 0.5 * G * (np.cos(low) - np.cos(high)), "the band must be sampled"


def test_euler_trajectory_of_a_linear_field_is_a_matrix_power() -> None:
    h, spacing = 0.05, 0.2
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    states = study.integrate_trajectory(lambda x: torch.stack((x[1], -x[0])), x0, h, spacing, 3, "euler")
    one_step = np.array([[1.0, h], [-h, 1.0]])
    expected = [np.linalg.matrix_power(one_step, 4 * k) @ x0.numpy() for k in (1, 2, 3)]
    np.testing.assert_allclose(states.numpy(), expected, rtol=1e-13)


def test_trajectory_step_must_divide_the_observation_spacing() -> None:
    with pytest.raises(ValueError, match="divide"):
        study.integrate_trajectory(study.pendulum_field, torch.zeros(2, dtype=torch.float64), 0.03, 0.2, 2, "rk4")


def test_relative_error_and_slope_by_hand() -> None:
    exact = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert study.relative_error(exact + [[0.0, 0.5], [0.0, 0.0]], exact) == pytest.approx(0.1)
    assert study.relative_error(np.full_like(exact, np.nan), exact) == math.inf
    assert study.fit_slope([0.01, 0.02, 0.05], [5e-6, 4e-5, 6.25e-4]) == pytest.approx(3.0)
    assert math.isnan(study.fit_slope([0.01], [1e-3]))


def test_order_fit_uses_only_steps_dominated_by_discretisation() -> None:
    # A floor of 1e-3 (the model's error) under a slope-2 branch; the last point is out of the window.
    errors = [1e-3, 1e-3, 1.1e-3, 2e-3, 4e-3, 1.6e-2, 6.4e-2, 0.256, 1.0]
    assert study.discretisation_dominated(errors) == [4, 5, 6]
    assert study.discretisation_dominated([1e-14, 1e-13, 2e-12, 1e-3]) == [2, 3]


def test_summary_tells_a_learned_map_from_a_convergent_field() -> None:
    h0 = 0.01
    ratios = np.array([float(r) for r in study.STEP_RATIOS])
    true_errors = 0.1 * ratios**2
    field_like = 1e-3 + 0.1 * ratios**2  # converges to a floor, then the scheme's order
    map_like = 1e-3 + 0.1 * np.abs(1 - ratios)  # best at h0 only
    convergent = study.summarise_curve("rk4", "midpoint", field_like, true_errors, h0, 0.0)
    assert convergent["converges"] and convergent["h_best_over_h0"] == ratios[0]
    assert convergent["error_at_hmin"] == pytest.approx(field_like[0])
    assert convergent["true_order"] == pytest.approx(2.0)
    assert 1.5 < convergent["observed_order"] < 2.0  # the floor still bends the fit a little
    assert convergent["scheme_order"] == 2
    learned_map = study.summarise_curve("euler", "euler", map_like, true_errors, h0, 0.0)
    assert not learned_map["converges"] and learned_map["h_best_over_h0"] == 1.0
    assert math.isnan(learned_map["observed_order"]) and math.isnan(learned_map["order_h_lo"])


def test_euler_training_learns_the_modified_field_and_rk4_training_the_true_one() -> None:
    """Backward error analysis: x + h f_E(x) matches the flow when f_E = f + (h / 2) f' f + O(h^2),
    while a step of order 4 is matched by f itself up to O(h^4)."""
    h0 = 0.05
    config = study.TrainingConfig(h0=h0, iterations=1000, n_pairs=256)
    states, _ = study.sample_pairs(512, h0, config.theta0_range, np.random.default_rng(123))
    theta, omega = states[:, 0], states[:, 1]
    true_field = torch.stack((omega, -G * torch.sin(theta)), dim=-1)
    jacobian_times_field = torch.stack((-G * torch.sin(theta), -G * torch.cos(theta) * omega), dim=-1)
    modified_field = true_field + h0 / 2 * jacobian_times_field

    def distances(scheme: str) -> tuple[float, float]:
        field, _ = study.train_vector_field(scheme, config, seed=0, progress=False)
        with torch.no_grad():
            learned = field(states)
        return ((learned - true_field).norm(dim=-1).mean().item(),
                (learned - modified_field).norm(dim=-1).mean().item())

    euler_to_true, euler_to_modified = distances("euler")
    rk4_to_true, rk4_to_modified = distances("rk4")
    assert euler_to_modified < 0.6 * euler_to_true
    assert rk4_to_true < 0.6 * rk4_to_modified


def test_training_rejects_an_unknown_scheme_before_training() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        study.train_vector_field("rk5", study.TrainingConfig(iterations=1), seed=0, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"h0": 0.0}, "h0"), ({"iterations": 0}, "iterations"), ({"n_pairs": 2.5}, "n_pairs"),
     ({"theta0_range": (2.0, 3.5)}, "theta0_range"), ({"lr": float("nan")}, "lr")],
)
def test_training_config_names_the_bad_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        study.TrainingConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"seeds": ()}, "seeds"), ({"seeds": (1, 1)}, "seeds"), ({"horizon": -1.0}, "horizon"),
     ({"schemes": ("euler", "leapfrog")}, "leapfrog")],
)
def test_study_config_names_the_bad_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        study.StudyConfig(**kwargs)


def test_csv_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    study.write_csv_atomic([{"a": 1, "b": 2}], path)
    with pytest.raises(ValueError):
        study.write_csv_atomic([{"a": 3, "b": 4}, {"c": 5}], path)  # a row with a foreign key fails mid-way
    assert path.read_text().splitlines() == ["a,b", "1,2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
    with pytest.raises(ValueError, match="no rows"):
        study.write_csv_atomic([], path)


@pytest.mark.parametrize(
    "argv, message",
    [(["--h0", "0"], "--h0"), (["--seeds", "1", "1"], "seeds"), (["--iterations", "0"], "--iterations"),
     (["--theta0-band", "0.9"], "--theta0-band")],
)
def test_command_line_rejects_bad_values(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        study.main([*argv, "--smoke", "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is written for a rejected command"


def test_smoke_run_writes_the_table_the_summary_and_the_figure(tmp_path: Path) -> None:
    outputs = study.main(["--smoke", "--seeds", "0", "--out", str(tmp_path), "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pendulum.png", "pendulum_errors.csv", "pendulum_summary.csv"]
    assert outputs["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with outputs["errors"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:6] == ["scheme_train", "scheme_eval", "h", "h_over_h0", "n_seeds", "error_mean"]
    schemes = ("euler", "midpoint", "rk4")
    assert {(r["scheme_train"], r["scheme_eval"]) for r in rows} == {
        (train, evaluation) for train in ("true", *schemes) for evaluation in schemes
    }
    steps = sorted({float(r["h"]) for r in rows})
    assert len(rows) == 12 * len(steps) and steps[0] == pytest.approx(0.01 / 20) and steps[-1] == pytest.approx(0.2)
    with outputs["summary"].open() as handle:
        summary = {(r["scheme_train"], r["scheme_eval"]): r for r in csv.DictReader(handle)}
    for scheme, order in (("euler", 1), ("midpoint", 2), ("rk4", 4)):  # the true field shows each scheme's order
        assert float(summary["true", scheme]["observed_order"]) == pytest.approx(order, abs=0.15)
