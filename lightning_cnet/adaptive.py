"""Adaptive step sizes from an embedded Runge-Kutta pair: an :class:`~lightning_cnet.integrators.Integrator` for
evaluation and studies.

An embedded pair computes two solutions of different orders from the same stages; their difference estimates the
local error of the step. A step is accepted when that error, measured against ``atol + rtol * |x|``, is at most one
(root mean square over every element of the state, as torchdiffeq and Hairer-Norsett-Wanner do), and the next step
size is ``h * clamp(0.9 * ratio^(-1/(q+1)), 0.2, 10)`` (``q``: the embedded order; an accepted step never shrinks
the next one, a rejected step is retried smaller).

Two decisions specific to ODE stages:

* **Breakpoints are never crossed.** ``theta(t)`` jumps (piecewise constant) or kinks (piecewise linear) at the
  breakpoints of its basis, where an error estimate that assumes a smooth right-hand side means nothing; every
  interval between breakpoints is integrated on its own, ending exactly on the breakpoint, and a stage at the end of
  an interval reads the limit from inside it (the open-interval rule of fixed steps). torchdiffeq does the same when
  given the breakpoints as ``jump_t``.
* **One step size for the whole batch.** The error norm runs over every element of the batch, so the steps are
  those the hardest sample needs and a sample's output depends on its batchmates (within the tolerance); per-sample
  steps would mean per-sample control flow. torchdiffeq does the same.

Training is refused (:attr:`AdaptiveRK.trains` is false): in training mode every evaluation, rejected steps
included, would update the BatchNorm running statistics, and the steps taken change from batch to batch. Evaluate,
or recalibrate BatchNorm at a fixed-step manifestation.

The pairs (tableaux with an error row, in :mod:`lightning_cnet.integrators`): ``bosh3`` (Bogacki-Shampine 3(2), 4
stages, first same as last: 3 evaluations per accepted step) and ``dopri5`` (Dormand-Prince 5(4), 7 stages, FSAL: 6
per step). Both are also ordinary fixed-step schemes of order 3 and 5 (``scheme="dopri5"``, ``n_steps=8``),
evaluating only the stages their solution needs.

Example:
    >>> import math, torch
    >>> x1, evaluations = odeint_adaptive(lambda t, x: -2 * t * x, torch.ones(1, dtype=torch.float64), 0.0, 1.0,
    ...                                   scheme="dopri5", rtol=1e-8, atol=1e-10)
    >>> abs(x1.item() - math.exp(-1.0)) < 1e-7
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import ClassVar

import torch

from lightning_cnet import cost
from lightning_cnet._validation import check_integer
from lightning_cnet.bases import Basis
from lightning_cnet.integrators import ButcherTableau, Rate, _combine, get_scheme

#: Step-size controller: a safety factor on the optimal step, and the largest decrease and increase of one change.
SAFETY, SHRINK_LIMIT, GROW_LIMIT = 0.9, 0.2, 10.0
#: Smallest step, as a fraction of ``[0, 1]``: below it the integration is refused (a stiff or non-finite field).
MIN_STEP = 1e-10

#: ``evaluate(t, at_end, x)``: the right-hand side (depth factor included) at time ``t``; ``at_end`` tells a stage
#: that sits on the end of the current interval, which reads the limit from inside it.
Evaluate = Callable[[float, bool, torch.Tensor], torch.Tensor]


@dataclass
class AdaptiveStatistics:
    """What one adaptive integration did.

    Attributes:
        function_evaluations: evaluations of the right-hand side.
        accepted_steps: steps kept.
        rejected_steps: steps retried with a smaller size.
    """

    function_evaluations: int = 0
    accepted_steps: int = 0
    rejected_steps: int = 0


@dataclass(eq=False)
class AdaptivePlan:
    """What an adaptive integration of a stage reads: its basis, the intervals between breakpoints, and the
    statistics of the last integration (updated by each one)."""

    basis: Basis
    n_basis: int
    intervals: tuple[tuple[Fraction, Fraction], ...]
    last: AdaptiveStatistics = field(default_factory=AdaptiveStatistics)


@dataclass(frozen=True, init=False, repr=False)
class AdaptiveRK:
    """Step sizes chosen by the error estimate of an embedded Runge-Kutta pair, to ``rtol`` and ``atol``.

    For evaluation and studies: ``model.manifestation(integrator=AdaptiveRK("dopri5", rtol=1e-4))``. A stage in
    training mode refuses it (see the module's notes).

    Args:
        scheme: an embedded pair: ``"bosh3"``, ``"dopri5"`` or a registered tableau with ``b_embedded``.
        rtol: relative tolerance (default: scipy's ``solve_ivp``, 1e-3).
        atol: absolute tolerance (default 1e-6).
        n_steps: the first step is ``1 / n_steps`` of ``[0, 1]`` (``None``: chosen from the first two evaluations by
            Hairer's rule; as a manifestation, the stage's own step count: the step size it was trained with).

    An integration takes at most :data:`~lightning_cnet.cost.MAX_STEPS_PER_STAGE` steps (accepted and rejected);
    beyond, a ``RuntimeError`` says how far it got.

    Example:
        >>> import torch
        >>> from lightning_cnet import get_model
        >>> model = get_model("cnet_digits", n_steps=2).eval()
        >>> with model.manifestation(integrator=AdaptiveRK("bosh3", rtol=1e-3)), torch.no_grad():
        ...     model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    tableau: ButcherTableau
    rtol: float
    atol: float
    n_steps: int | None
    trains: ClassVar[bool] = False

    def __init__(
        self,
        scheme: str | ButcherTableau = "dopri5",
        *,
        rtol: float = 1e-3,
        atol: float = 1e-6,
        n_steps: int | None = None,
    ) -> None:
        tableau = get_scheme(scheme)
        if not tableau.has_error_estimate:
            raise ValueError(f"scheme={tableau.name!r} has no embedded error estimate: adaptive steps need an "
                             "embedded pair such as 'bosh3' or 'dopri5' (register_scheme(..., b_embedded=...))")
        for name, value in (("rtol", rtol), ("atol", atol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name}={value!r} is not valid: expected a finite number >= 0")
        if rtol == 0 and atol == 0:
            raise ValueError("rtol=0 and atol=0 ask for no error at all: expected at least one of them > 0")
        check_integer("n_steps", n_steps, optional=True)
        object.__setattr__(self, "tableau", tableau)
        object.__setattr__(self, "rtol", float(rtol))
        object.__setattr__(self, "atol", float(atol))
        object.__setattr__(self, "n_steps", n_steps)

    @property
    def name(self) -> str:
        return self.tableau.name

    def __repr__(self) -> str:
        return f"AdaptiveRK({self.name!r}, rtol={self.rtol!r}, atol={self.atol!r}, n_steps={self.n_steps!r})"

    def plan(self, basis: Basis, n_basis: int) -> AdaptivePlan:
        points = basis.breakpoints(n_basis)
        return AdaptivePlan(basis, n_basis, tuple(zip(points[:-1], points[1:])))

    def segments(self, plan: AdaptivePlan) -> tuple[AdaptivePlan, ...]:
        return (plan,)

    def function_evaluations(self, plan: AdaptivePlan) -> int:
        """Evaluations of the last integration with ``plan`` (0 before the first)."""
        return plan.last.function_evaluations

    def integrate(self, rate: Rate, x: torch.Tensor, depth: float, plan: AdaptivePlan) -> torch.Tensor:
        """Integrate interval by interval; the step size carries over from one interval to the next."""
        statistics = AdaptiveStatistics()
        step = 1.0 / self.n_steps if self.n_steps is not None else None
        for left, right in plan.intervals:
            evaluate = partial(_rate_inside, rate, plan, left, right)
            x, step = self._interval(evaluate, x, float(left), float(right), step, depth, statistics,
                                     cost.MAX_STEPS_PER_STAGE)
        plan.last = statistics
        return x

    def _interval(self, evaluate: Evaluate, x: torch.Tensor, start: float, end: float, step: float | None,
                  depth: float, statistics: AdaptiveStatistics, max_steps: int) -> tuple[torch.Tensor, float]:
        """Integrate ``dx/dt = depth * evaluate(t, ., x)`` from ``start`` to exactly ``end``, starting with ``step``
        (``None``: :func:`initial_step`); return the state and the step size proposed for what follows."""
        tableau = self.tableau
        t, first = start, None
        if step is None:
            first = evaluate(t, False, x)
            step = initial_step(evaluate, x, first, t, depth, tableau, self.rtol, self.atol)
            statistics.function_evaluations += 2
        while t < end:
            if statistics.accepted_steps + statistics.rejected_steps >= max_steps:
                raise RuntimeError(f"adaptive {self.name} took {max_steps} steps and reached only "
                                   f"t={t:.6g} of 1 with rtol={self.rtol:g}, atol={self.atol:g}: loosen the tolerances "
                                   "or use fixed steps")
            if step < MIN_STEP:
                raise RuntimeError(f"adaptive {self.name} needs steps below {MIN_STEP:g} at t={t:.6g} (rtol="
                                   f"{self.rtol:g}, atol={self.atol:g}): the field is stiff or not finite there")
            last = step >= end - t
            h = end - t if last else step
            slopes = [first if first is not None else evaluate(t, False, x)]
            statistics.function_evaluations += first is None
            for stage in range(1, len(tableau.c)):
                at = end if last and tableau.c[stage] == 1 else t + float(tableau.c[stage]) * h
                state = _combine(x, slopes, tableau.stage_terms[stage], depth * h)
                slopes.append(evaluate(at, last and tableau.c[stage] == 1, state))
            statistics.function_evaluations += len(tableau.c) - 1
            proposal = _combine(x, slopes, tableau.final_terms, depth * h)
            ratio = _error_ratio(x, proposal, slopes, tableau, depth * h, self.rtol, self.atol)
            accepted = ratio <= 1.0
            if accepted:
                statistics.accepted_steps += 1
                t = end if last else t + h
                first = slopes[-1] if tableau.first_same_as_last and t < end else None
                x = proposal
            else:
                statistics.rejected_steps += 1
            step = h * _step_factor(ratio, accepted, tableau)
        return x, step


def _rate_inside(rate: Rate, plan: AdaptivePlan, left: Fraction, right: Fraction, t: float, at_end: bool,
                 x: torch.Tensor) -> torch.Tensor:
    """``rate`` at ``t`` seen from inside ``[left, right]``: a time rounded outside is put back on the interval's end,
    and the end itself reads the limit from inside (the piece of the interval, not the next one)."""
    if at_end:
        nodes = plan.basis.node_weights(plan.n_basis, right, left_limit=True)
    else:
        inside = min(max(Fraction(t), left), right)
        nodes = plan.basis.node_weights(plan.n_basis, inside, left_limit=inside == right)
    return rate(nodes, x)


@torch.no_grad()
def _error_ratio(x: torch.Tensor, proposal: torch.Tensor, slopes: list[torch.Tensor], tableau: ButcherTableau,
                 step: float, rtol: float, atol: float) -> float:
    """Root mean square over every element of ``error / (atol + rtol * max(|x|, |proposal|))``; ``inf`` when not
    finite. One host synchronisation."""
    error = torch.zeros_like(x)
    for column, weight in tableau.error_terms:
        error.add_(slopes[column], alpha=step * weight)
    scale = torch.maximum(x.abs(), proposal.abs()).mul_(rtol).add_(atol)
    ratio = float(error.div_(scale).square_().mean().sqrt().item())
    return ratio if math.isfinite(ratio) else math.inf


@torch.no_grad()
def initial_step(evaluate: Evaluate, x: torch.Tensor, slope: torch.Tensor, t: float, depth: float,
                 tableau: ButcherTableau, rtol: float, atol: float) -> float:
    """A first step size from the state, its slope and one more evaluation (Hairer, Norsett and Wanner, Solving ODEs I,
    II.4): a step whose explicit Euler change is about 1% of the state, checked against the change of the slope."""
    scale = x.abs().mul(rtol).add(atol)

    def norm(value: torch.Tensor) -> float:
        return float(value.div(scale).square().mean().sqrt().item())

    size, rate = norm(x), norm(slope) * depth
    guess = 0.01 * size / rate if size > 1e-5 and rate > 1e-5 else 1e-6
    probe = evaluate(t + guess, False, x + (depth * guess) * slope)
    change = norm(probe - slope) * depth / guess
    assert tableau.embedded_order is not None
    largest = max(rate, change)
    step = (max(1e-6, guess * 1e-3) if largest <= 1e-15
            else (0.01 / largest) ** (1.0 / (tableau.embedded_order + 1)))
    return min(100 * guess, step)


def _step_factor(ratio: float, accepted: bool, tableau: ButcherTableau) -> float:
    """How much to change the step: the optimal factor for the embedded order, times the safety factor, never
    below one after an accepted step nor above one after a rejected step."""
    if ratio == 0.0:
        return GROW_LIMIT
    if not math.isfinite(ratio):
        return SHRINK_LIMIT
    assert tableau.embedded_order is not None
    factor = SAFETY * math.pow(ratio, -1.0 / (tableau.embedded_order + 1))
    return min(GROW_LIMIT, max(1.0, factor)) if accepted else min(1.0, max(SHRINK_LIMIT, factor))


def odeint_adaptive(
    func: Callable[[float, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t0: float,
    t1: float,
    *,
    scheme: str | ButcherTableau = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-6,
    first_step: float | None = None,
    max_steps: int = 100_000,
) -> tuple[torch.Tensor, AdaptiveStatistics]:
    """Integrate ``dx/dt = func(t, x)`` from ``t0`` to ``t1 > t0`` with adaptive steps of an embedded pair.

    The same stepping as :class:`AdaptiveRK` for a plain right-hand side (``t`` a Python float).

    Args:
        func: right-hand side ``f(t, x)``.
        x0: state at ``t0``.
        t0: start time.
        t1: end time, after ``t0``.
        scheme: an embedded pair.
        rtol: relative tolerance.
        atol: absolute tolerance.
        first_step: the first step's size (default: :func:`initial_step`).
        max_steps: most steps, accepted and rejected.

    Returns:
        The state at ``t1`` and what the integration did.

    Raises:
        ValueError: ``t1 <= t0``, a first step that is not positive, or invalid integrator settings.
        RuntimeError: more than ``max_steps`` steps, or a step below :data:`MIN_STEP` of the interval.
    """
    if not (math.isfinite(t0) and math.isfinite(t1) and t1 > t0):
        raise ValueError(f"t0={t0!r}, t1={t1!r} are not valid: expected finite times with t1 > t0")
    if first_step is not None and not 0 < first_step < math.inf:
        raise ValueError(f"first_step={first_step!r} is not valid: expected a finite number > 0")
    check_integer("max_steps", max_steps)
    integrator = AdaptiveRK(scheme, rtol=rtol, atol=atol)
    span = t1 - t0
    statistics = AdaptiveStatistics()

    def evaluate(t: float, at_end: bool, x: torch.Tensor) -> torch.Tensor:
        return func(t0 + t * span, x)

    step = None if first_step is None else first_step / span
    x1, _ = integrator._interval(evaluate, x0, 0.0, 1.0, step, span, statistics, max_steps)
    return x1, statistics


__all__ = ["AdaptivePlan", "AdaptiveRK", "AdaptiveStatistics", "odeint_adaptive"]
