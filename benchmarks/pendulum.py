"""Is a vector field learned inside one Runge-Kutta step a meaningful integrator? The nonlinear pendulum.

The pendulum ``theta'' = -g sin(theta)`` (state ``x = (theta, omega)``, ``g = 9.81``) has an exact solution in
Jacobi elliptic functions. A small MLP ``f(x)`` is trained so that one step of scheme ``S`` (euler, midpoint
or rk4) with step ``h0`` maps ``x(t)`` to ``x(t + h0)`` on exact trajectories. The learned ``f`` is then
integrated with every scheme at steps ``h`` from ``h0 / 20`` to ``20 h0`` and compared with the exact
solution, next to the *true* ``f`` integrated the same way. A model that has learned the vector field
converges as ``h`` shrinks (down to the floor of its fitting error); one that has learned the discrete map
of its training scheme is most accurate at ``h0`` only.

Exact solution (release at rest from ``theta0``, ``0 < theta0 < pi``): energy conservation gives
``omega^2 / 2 = g (cos(theta) - cos(theta0))``; with ``k = sin(theta0 / 2)`` and ``sin(theta / 2) = k s`` this
becomes ``s'^2 = g (1 - s^2)(1 - k^2 s^2)``, solved by ``s = sn(K(k) - sqrt(g) t, k)`` with ``s(0) = 1``.
Hence ``theta(t) = 2 arcsin(k sn(u, k))`` and, since ``cos(theta / 2) = dn(u, k)``,
``omega(t) = -2 k sqrt(g) cn(u, k)``, ``u = K(k) - sqrt(g) t``; the period is ``4 K(k) / sqrt(g)``. SciPy's
``ellipj`` and ``ellipk`` take the parameter ``m = k^2``.

Set-up: the evaluated trajectory is the paper's, released at rest from ``theta0 = 1.5 pi / 2`` (135 degrees),
integrated over ``t in [0, 5]``. Training pairs lie on exact trajectories released at rest from angles uniform
in ``theta0 +- 0.15`` (a small band of energies around the evaluated orbit), at times uniform over one period,
float64. The model is an MLP ``2 -> 50 (tanh) -> 2`` (:func:`build_vector_field`), trained by full-batch Adam
with a cosine schedule; each seed draws its own weights and pairs. The error of a trajectory is
``||X - X_exact||_F / ||X_exact||_F`` over the states at the multiples of ``20 h0``.

Usage::

    python benchmarks/pendulum.py --out outputs/pendulum            # the default study, a few minutes
    python benchmarks/pendulum.py --smoke --out /tmp/pendulum    # smoke run, seconds

Writes ``pendulum_errors.csv`` (one row per training scheme, evaluation scheme and ``h``),
``pendulum_summary.csv`` (per curve: best ``h``, errors, fitted slopes) and ``pendulum.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import ellipj, ellipk
from torch import nn
from tqdm import tqdm

from lightning_cnet import MLPUnit, odeint_fixed
from lightning_cnet._validation import check_integer
from lightning_cnet.integrators import get_scheme, rk_step

#: Node weights of a one-piece (autonomous) field: piece 0 with weight 1 at every time.
ONE_PIECE = ((0, 1.0),)

GRAVITY = 9.81
THETA0 = 1.5 * math.pi / 2
SCHEMES = ("euler", "midpoint", "rk4")
TRUE_FIELD = "true"
# Evaluation steps as fractions of h0: a 1-2-5 grid from h0 / 20 to 20 h0. Every step divides 20 h0, the
# spacing of the observation times, so all runs are compared at the same instants.
STEP_RATIOS = tuple(
    Fraction(n, d) for n, d in ((1, 20), (1, 10), (1, 5), (1, 2), (1, 1), (2, 1), (5, 1), (10, 1), (20, 1))
)
OBSERVATION_RATIO = max(STEP_RATIOS)
ROUND_OFF_FLOOR = 1e-12  # errors below this are round-off; they are left out of slope fits
ASYMPTOTIC_CEILING = 0.3  # errors above this are out of the asymptotic regime of a scheme
ORDER_POINTS = 3  # steps per order fit


Field = Callable[[torch.Tensor], torch.Tensor]


def exact_state(t: np.ndarray | float, theta0: np.ndarray | float = THETA0, g: float = GRAVITY) -> np.ndarray:
    """The exact state ``(theta, omega)`` at times ``t`` of a pendulum released at rest from ``theta0``.

    Args:
        t: times (any shape, broadcast against ``theta0``).
        theta0: release angles in ``(0, pi)``.
        g: gravity over length.

    Returns:
        An array of shape ``broadcast(t, theta0).shape + (2,)``, float64.

    Example:
        >>> np.allclose(exact_state(0.0), [THETA0, 0.0])
        True
    """
    theta0 = np.asarray(theta0, dtype=np.float64)
    if np.any(theta0 <= 0) or np.any(theta0 >= math.pi):
        raise ValueError(f"release angles must lie in (0, pi), got {theta0.min()!r} .. {theta0.max()!r}")
    k = np.sin(theta0 / 2)
    m = k * k
    u = ellipk(m) - math.sqrt(g) * np.asarray(t, dtype=np.float64)
    sn, cn, _, _ = ellipj(u, m)
    theta = 2 * np.arcsin(np.clip(k * sn, -1.0, 1.0))
    omega = -2 * k * math.sqrt(g) * cn
    return np.stack(np.broadcast_arrays(theta, omega), axis=-1)


def period(theta0: np.ndarray | float = THETA0, g: float = GRAVITY) -> np.ndarray:
    """The period ``4 K(k) / sqrt(g)`` of a pendulum released at rest from ``theta0``."""
    return 4 * ellipk(np.sin(np.asarray(theta0, dtype=np.float64) / 2) ** 2) / math.sqrt(g)


def autonomous(field: Field) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """The right-hand side ``(t, x) -> field(x)`` that :func:`~lightning_cnet.odeint_fixed` expects."""
    return lambda t, x: field(x)


def pendulum_field(x: torch.Tensor, g: float = GRAVITY) -> torch.Tensor:
    """The true vector field ``f(theta, omega) = (omega, -g sin(theta))`` on states ``[..., 2]``."""
    return torch.stack((x[..., 1], -g * torch.sin(x[..., 0])), dim=-1)


class LearnedField(nn.Module):
    """An autonomous vector field ``f(x)``: the library's MLP residual unit with one piece (constant in time).

    Args:
        hidden: width of the hidden layer.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.unit = MLPUnit(2, n_basis=1, hidden=hidden, activation="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x, ONE_PIECE)


def build_vector_field(hidden: int = 50) -> nn.Module:
    """The learned vector field ``f(x)``: an MLP ``2 -> hidden (tanh) -> 2`` in float64, the residual unit
    (:class:`lightning_cnet.MLPUnit`) of a vector ODE stage.

    The one place where the model is constructed; the rest of the study only calls ``field(x)`` on
    states of shape ``[..., 2]``.

    Args:
        hidden: width of the hidden layer.

    Example:
        >>> build_vector_field()(torch.zeros(3, 2, dtype=torch.float64)).shape
        torch.Size([3, 2])
    """
    check_integer("hidden", hidden)
    return LearnedField(hidden).to(torch.float64)


def sample_pairs(
    n_pairs: int, h0: float, theta0_range: tuple[float, float], generator: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(x(t), x(t + h0))`` on exact trajectories released at rest from angles in ``theta0_range``.

    Release angles are uniform in the range (a band of energies around the evaluated orbit), times
    uniform over one period of each trajectory.

    Returns:
        ``(inputs, targets)``, each ``[n_pairs, 2]`` float64.
    """
    low, high = theta0_range
    theta0 = generator.uniform(low, high, n_pairs)
    t = generator.uniform(0.0, 1.0, n_pairs) * period(theta0)
    inputs = exact_state(t, theta0)
    targets = exact_state(t + h0, theta0)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclass(frozen=True)
class TrainingConfig:
    """How every learned vector field is trained.

    Attributes:
        h0: training step.
        iterations: full-batch Adam iterations (one iteration is one epoch).
        lr: peak learning rate (cosine decay to zero).
        n_pairs: training pairs.
        theta0_range: release angles of the training trajectories, inside ``(0, pi)``.
        hidden: hidden width of the MLP.

    Raises:
        ValueError: a value out of its range (the message names it).
    """

    h0: float = 0.01
    iterations: int = 10000
    lr: float = 1e-2
    n_pairs: int = 512
    theta0_range: tuple[float, float] = (THETA0 - 0.15, THETA0 + 0.15)
    hidden: int = 50

    def __post_init__(self) -> None:
        for name in ("h0", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is not valid: expected a positive number")
        for name in ("iterations", "n_pairs", "hidden"):
            check_integer(name, getattr(self, name))
        low, high = self.theta0_range
        if not 0 < low < high < math.pi:
            raise ValueError(f"theta0_range={self.theta0_range!r} is not valid: expected 0 < low < high < pi")


def train_vector_field(
    scheme: str, config: TrainingConfig, seed: int, progress: bool = True
) -> tuple[nn.Module, float]:
    """Train ``f`` so that one step of ``scheme`` with step ``h0`` maps ``x(t)`` to ``x(t + h0)``.

    The loss is the mean squared error of the step divided by ``h0`` (the error of the step's mean
    slope), so it has the units of ``f`` whatever ``h0``. The seed fixes both the initial weights and
    the training pairs.

    Args:
        scheme: the Runge-Kutta scheme of the training step.
        config: the training set-up.
        seed: seed of the weights and of the pairs.
        progress: show a progress bar.

    Returns:
        The trained field and the root of its training loss after the last update.

    Example:
        >>> field, rmse = train_vector_field("rk4", TrainingConfig(iterations=5, n_pairs=8), seed=0, progress=False)
        >>> field(torch.zeros(2, dtype=torch.float64)).shape
        torch.Size([2])
    """
    get_scheme(scheme)
    torch.manual_seed(seed)
    field = build_vector_field(config.hidden)
    inputs, targets = sample_pairs(config.n_pairs, config.h0, config.theta0_range, np.random.default_rng(seed))
    optimizer = torch.optim.Adam(field.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
    rate = autonomous(field)

    def loss() -> torch.Tensor:
        return ((rk_step(rate, inputs, 0.0, config.h0, scheme) - targets) / config.h0).square().mean()

    for _ in tqdm(range(config.iterations), desc=f"train {scheme} seed {seed}", leave=False, disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return field, math.sqrt(loss().item())


def integrate_trajectory(
    field: Field, x0: torch.Tensor, step: float, spacing: float, n_observations: int, scheme: str
) -> torch.Tensor:
    """Integrate ``dx/dt = field(x)`` with fixed steps and return the states at ``spacing, 2 spacing, ...``.

    Args:
        field: the autonomous right-hand side.
        x0: initial state ``[..., 2]``.
        step: integration step; ``spacing / step`` must be an integer.
        spacing: time between observations.
        n_observations: number of observations.
        scheme: Runge-Kutta scheme.

    Returns:
        ``[n_observations, *x0.shape]``.
    """
    steps_per_observation = round(spacing / step)
    if steps_per_observation < 1 or abs(steps_per_observation * step - spacing) > 1e-9 * spacing:
        raise ValueError(f"step={step!r} must divide the observation spacing {spacing!r}")
    rate = autonomous(field)
    states = []
    x = x0
    with torch.no_grad():
        for index in range(n_observations):
            x = odeint_fixed(rate, x, index * spacing, (index + 1) * spacing, steps_per_observation, scheme)
            states.append(x)
    return torch.stack(states)


def relative_error(predicted: np.ndarray, exact: np.ndarray) -> float:
    """``||predicted - exact||_F / ||exact||_F`` over a whole trajectory (inf if it is not finite)."""
    error = float(np.linalg.norm(predicted - exact) / np.linalg.norm(exact))
    return error if math.isfinite(error) else math.inf


def fit_slope(steps: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(h)``; nan with fewer than two points.

    Example:
        >>> round(fit_slope([0.1, 0.2, 0.4], [3e-2, 1.2e-1, 4.8e-1]), 6)
        2.0
    """
    if len(steps) != len(errors):
        raise ValueError(f"got {len(steps)} steps and {len(errors)} errors")
    if len(steps) < 2:
        return math.nan
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def discretisation_dominated(errors: Sequence[float]) -> list[int]:
    """Indices of the (at most :data:`ORDER_POINTS`) smallest steps where discretisation dominates.

    These are the steps right of the curve's minimum whose error is at least three times that minimum
    (so the model's own error, the floor, is a minor part) and inside ``(ROUND_OFF_FLOOR,
    ASYMPTOTIC_CEILING)``. ``errors`` are ordered by increasing step.
    """
    best = int(np.argmin(errors))
    chosen = [
        index for index in range(best + 1, len(errors))
        if errors[index] >= 3 * errors[best] and ROUND_OFF_FLOOR < errors[index] < ASYMPTOTIC_CEILING
    ]
    return chosen[:ORDER_POINTS]


@dataclass(frozen=True)
class StudyConfig:
    """What is trained and how it is evaluated.

    Attributes:
        training: the training set-up.
        seeds: one learned field per seed and training scheme.
        horizon: integration time, rounded to a whole number (at least one) of observation spacings
            ``20 h0``.
        schemes: training and evaluation schemes.

    Raises:
        ValueError: no or repeated seeds, a non-positive horizon or an unknown scheme.
    """

    training: TrainingConfig = TrainingConfig()
    seeds: tuple[int, ...] = (0, 1, 2)
    horizon: float = 5.0
    schemes: tuple[str, ...] = SCHEMES

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds!r} is not valid: expected one or more distinct seeds")
        if not (math.isfinite(self.horizon) and self.horizon > 0):
            raise ValueError(f"horizon={self.horizon!r} is not valid: expected a positive number")
        if not self.schemes:
            raise ValueError("schemes must name at least one scheme")
        for scheme in self.schemes:
            get_scheme(scheme)

    @property
    def spacing(self) -> float:
        """Time between two observations of a trajectory."""
        return float(OBSERVATION_RATIO) * self.training.h0

    @property
    def n_observations(self) -> int:
        """Observations per trajectory (the first one at ``spacing``)."""
        return max(1, round(self.horizon / self.spacing))


def evaluate_field(field: Field, config: StudyConfig, scheme: str, exact: np.ndarray) -> list[float]:
    """Relative trajectory error of ``field`` integrated with ``scheme`` at every step of the grid."""
    x0 = torch.from_numpy(exact_state(0.0))
    errors = []
    for ratio in STEP_RATIOS:
        step = float(ratio) * config.training.h0
        states = integrate_trajectory(field, x0, step, config.spacing, config.n_observations, scheme)
        errors.append(relative_error(states.numpy(), exact))
    return errors


def run_study(config: StudyConfig, progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train every (scheme, seed), evaluate every field with every scheme, and summarise.

    Returns:
        ``(error_rows, summary_rows)``: one error row per training scheme, evaluation scheme and step
        (seeds aggregated; the true field is ``scheme_train = "true"``), one summary row per curve.
    """
    h0 = config.training.h0
    exact = exact_state(config.spacing * np.arange(1, config.n_observations + 1))
    fields: dict[str, list[tuple[Field, float]]] = {TRUE_FIELD: [(pendulum_field, 0.0)]}
    runs = [(scheme, seed) for scheme in config.schemes for seed in config.seeds]
    for scheme, seed in tqdm(runs, desc="training", disable=not progress):
        fields.setdefault(scheme, []).append(train_vector_field(scheme, config.training, seed, progress))
    curves = [(train, evaluation) for train in fields for evaluation in config.schemes]
    errors: dict[tuple[str, str], np.ndarray] = {}
    for train, evaluation in tqdm(curves, desc="evaluation", disable=not progress):
        errors[train, evaluation] = np.array(
            [evaluate_field(field, config, evaluation, exact) for field, _ in fields[train]]
        )
    error_rows = [
        {
            "scheme_train": train, "scheme_eval": evaluation, "h": float(ratio) * h0, "h_over_h0": float(ratio),
            "n_seeds": len(column), "error_mean": float(column.mean()),
            "error_std": float(column.std(ddof=1)) if len(column) > 1 else 0.0,
            "error_min": float(column.min()), "error_max": float(column.max()),
        }
        for (train, evaluation), per_seed in errors.items()
        for ratio, column in zip(STEP_RATIOS, per_seed.T)
    ]
    summary_rows = [
        summarise_curve(
            train, evaluation, per_seed.mean(axis=0), errors[TRUE_FIELD, evaluation][0], h0,
            float(np.mean([loss for _, loss in fields[train]])),
        )
        for (train, evaluation), per_seed in errors.items()
    ]
    return error_rows, summary_rows


def summarise_curve(
    train: str, evaluation: str, errors: np.ndarray, true_errors: np.ndarray, h0: float, train_rmse: float
) -> dict[str, Any]:
    """Summarise one error curve (errors on the grid of :data:`STEP_RATIOS`, by increasing step).

    ``converges`` is true when refining the step does not make the trajectory worse: the error at the
    smallest step is at most twice the curve's minimum; ``error_at_hmin`` is then the error of the limit
    the integration converges to. For convergent curves, ``observed_order`` is the log-log slope over
    the steps chosen by :func:`discretisation_dominated` (from ``order_h_lo`` to ``order_h_hi``), and
    ``true_order`` the slope of the true field's curve (``true_errors``, same scheme) over the same
    steps: the error of the pendulum is not a pure power of ``h`` at large steps, so that is the slope
    a field that has learned the vector field should reproduce.
    """
    steps = [float(ratio) * h0 for ratio in STEP_RATIOS]
    best = int(np.argmin(errors))
    converges = bool(errors[0] <= 2 * errors[best])
    chosen = discretisation_dominated(errors) if converges else []
    if len(chosen) < 2:
        chosen = []
    return {
        "scheme_train": train, "scheme_eval": evaluation, "train_rmse": train_rmse,
        "h_best_over_h0": float(STEP_RATIOS[best]), "error_best": float(errors[best]),
        "error_at_h0": float(errors[STEP_RATIOS.index(1)]), "error_at_hmin": float(errors[0]),
        "converges": converges,
        "observed_order": fit_slope([steps[i] for i in chosen], [errors[i] for i in chosen]),
        "true_order": fit_slope([steps[i] for i in chosen], [true_errors[i] for i in chosen]),
        "order_h_lo": steps[chosen[0]] if chosen else math.nan,
        "order_h_hi": steps[chosen[-1]] if chosen else math.nan,
        "scheme_order": get_scheme(evaluation).order,
    }


def write_csv_atomic(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write rows of equal keys to ``path`` through a temporary file renamed into place."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def plot_errors(rows: Sequence[dict[str, Any]], h0: float, path: Path) -> Path:
    """Log-log error against ``h``: one panel per training scheme, the true field dashed, ``h0`` marked.

    Lines are seed means, bands the seeds' range. Written through a temporary file renamed into place.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [name for name in dict.fromkeys(row["scheme_train"] for row in rows) if name != TRUE_FIELD]
    evaluations = list(dict.fromkeys(row["scheme_eval"] for row in rows))
    colors = dict(zip(evaluations, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    figure, axes = plt.subplots(1, len(trained), figsize=(4.2 * len(trained), 4.0), sharey=True, squeeze=False)
    for panel, train in zip(axes[0], trained):
        for evaluation in evaluations:
            for name, style in ((TRUE_FIELD, "--"), (train, "-")):
                curve = [row for row in rows if row["scheme_train"] == name and row["scheme_eval"] == evaluation]
                h = np.array([row["h"] for row in curve])
                mean = np.array([row["error_mean"] for row in curve])
                label = f"true f, {evaluation}" if name == TRUE_FIELD else f"learned f, {evaluation}"
                panel.plot(h, mean, style, marker="o" if name == train else None, markersize=3,
                           color=colors[evaluation], label=label, alpha=0.6 if name == TRUE_FIELD else 1.0)
                if name == train:
                    low = np.array([row["error_min"] for row in curve])
                    high = np.array([row["error_max"] for row in curve])
                    panel.fill_between(h, low, high, color=colors[evaluation], alpha=0.15, linewidth=0)
        panel.axvline(h0, color="gray", linestyle=":", label="h0")
        panel.set_xscale("log")
        panel.set_yscale("log")
        panel.set_xlabel("integration step h")
        panel.set_title(f"f trained inside {train} at h0 = {h0:g}")
        panel.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("relative trajectory error")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(temporary, format="png", dpi=120)
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return path


def print_summary(rows: Sequence[dict[str, Any]]) -> None:
    """Print the summary rows as a table."""
    print(f"{'train':>8s} {'eval':>8s} {'train rmse':>10s} {'best h/h0':>9s} {'err best':>9s} {'err h0':>9s} "
          f"{'err hmin':>9s} {'converges':>9s} {'order':>6s} {'true f':>6s} {'fit h range':>17s} scheme order")
    for row in rows:
        fitted = math.isfinite(row["observed_order"])
        h_range = f"{row['order_h_lo']:.2g} - {row['order_h_hi']:.2g}" if fitted else "-"
        print(f"{row['scheme_train']:>8s} {row['scheme_eval']:>8s} {row['train_rmse']:10.2e} "
              f"{row['h_best_over_h0']:9.3g} {row['error_best']:9.2e} {row['error_at_h0']:9.2e} "
              f"{row['error_at_hmin']:9.2e} {str(row['converges']):>9s} {row['observed_order']:6.2f} "
              f"{row['true_order']:6.2f} {h_range:>17s} {row['scheme_order']}")


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of the study."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/pendulum"), help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one model per seed and scheme")
    parser.add_argument("--iterations", "--epochs", type=_positive_int, default=None,
                        help="full-batch Adam iterations per model (default 10000, 150 with --smoke)")
    parser.add_argument("--h0", type=_positive_float, default=0.01, help="training step (default 0.01)")
    parser.add_argument("--lr", type=_positive_float, default=1e-2, help="peak Adam learning rate (default 0.01)")
    parser.add_argument("--pairs", type=_positive_int, default=None,
                        help="training pairs (default 512, 128 with --smoke)")
    parser.add_argument("--theta0-band", type=_positive_float, default=0.15,
                        help="training release angles: theta0 +- this (default 0.15 rad)")
    parser.add_argument("--horizon", type=_positive_float, default=None,
                        help="integration time (default 5, 1 with --smoke)")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="smoke run in seconds: few iterations, short horizon")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Run the study from the command line; returns the paths written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.theta0_band >= min(THETA0, math.pi - THETA0):
        parser.error(f"--theta0-band={args.theta0_band!r} is not valid: the training release angles "
                     f"theta0 +- band must stay inside (0, pi), so band < {math.pi - THETA0:.4f}")
    try:
        training = TrainingConfig(
            h0=args.h0,
            iterations=args.iterations or (150 if args.smoke else 10000),
            lr=args.lr,
            n_pairs=args.pairs or (128 if args.smoke else 512),
            theta0_range=(THETA0 - args.theta0_band, THETA0 + args.theta0_band),
        )
        config = StudyConfig(training, tuple(args.seeds), args.horizon or (1.0 if args.smoke else 5.0))
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error_rows, summary_rows = run_study(config, progress=not args.no_progress)
    outputs = {
        "errors": write_csv_atomic(error_rows, args.out / "pendulum_errors.csv"),
        "summary": write_csv_atomic(summary_rows, args.out / "pendulum_summary.csv"),
        "figure": plot_errors(error_rows, training.h0, args.out / "pendulum.png"),
    }
    print(f"pendulum theta0 = {THETA0:.4f}, g = {GRAVITY}, h0 = {training.h0:g}, horizon = "
          f"{config.n_observations * config.spacing:g} ({config.n_observations} observations), "
          f"{training.iterations} Adam iterations, {training.n_pairs} pairs, theta0 range "
          f"[{training.theta0_range[0]:.4f}, {training.theta0_range[1]:.4f}], seeds {list(config.seeds)}, "
          f"{time.perf_counter() - start:.0f} s")
    print_summary(summary_rows)
    for path in outputs.values():
        print(f"wrote {path}")
    return outputs


if __name__ == "__main__":
    main()
