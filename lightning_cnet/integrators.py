"""Explicit Runge-Kutta schemes from Butcher tableaux, the integrator seam of ODE stages, and fixed-step integration.

One generic step drives every scheme. Time is a Python number: no tensor time, no host syncs, and loops
are static, so ``torch.fx`` tracing and ``torch.compile`` see a plain unrolled graph.

Built-in schemes: ``euler`` (order 1), ``midpoint`` and ``heun`` (2), ``rk3`` (Kutta's third-order
method, 3), ``rk4`` (the *classic* 1/6-1/3-1/3-1/6 scheme, 4) and ``rk4_38`` (Kutta's 3/8 rule, 4; this
is what torchdiffeq calls ``rk4``); :mod:`lightning_cnet.adaptive` adds the embedded pairs ``bosh3`` and ``dopri5``.
:func:`register_scheme` adds a user tableau, with an error row (``b_embedded``) if it is an embedded pair.

An ODE stage integrates through the :class:`Integrator` protocol: a plan computed once per resolution (which
coefficients of ``theta(t)`` every evaluation reads), then ``integrate(rate, x, depth, plan)``.
:class:`FixedStepRK` (``n_steps`` equal steps, the integrator of training) is one implementation,
:class:`~lightning_cnet.adaptive.AdaptiveRK` (step sizes chosen by an embedded error estimate) another.

Example:
    >>> import math, torch
    >>> x1 = odeint_fixed(lambda t, x: -x, torch.ones(1), 0.0, 1.0, n_steps=8, scheme="rk4")
    >>> abs(x1.item() - math.exp(-1.0)) < 1e-5
    True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar, Protocol, TypeVar

import torch

from lightning_cnet._validation import check_integer
from lightning_cnet.bases import Basis, NodeWeights
from lightning_cnet.registry import Registry

Number = int | float | Fraction
StageArgument = TypeVar("StageArgument")
PlanT = TypeVar("PlanT")

Rate = Callable[[NodeWeights, torch.Tensor], torch.Tensor]
"""The right-hand side of an ODE stage without its depth factor: ``rate(node_weights, x)``, ``theta(t)`` given by the
node weights of the time of the evaluation."""

RKStagePlan = tuple[tuple[NodeWeights, ...], ...]
"""Per integration step, the node weights read by each Runge-Kutta stage."""

_TOLERANCE = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta scheme.

    Args:
        name: registry name.
        a: strictly lower-triangular ``s x s`` stage matrix.
        b: ``s`` weights of the final combination.
        c: ``s`` stage nodes (fractions of the step), the row sums of ``a``; exact fractions so that the
            piece of a time-dependent weight a stage reads is computed exactly.
        order: order of accuracy, for documentation and tests.
        error_weights: the error row of an embedded pair, ``b - b_embedded``: the local error estimate of a step
            is ``h * sum_j error_weights[j] k_j``; ``None`` for a scheme without one.
        embedded_order: order of the embedded (lower-order) solution.
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[Fraction, ...]
    order: int
    error_weights: tuple[float, ...] | None = None
    embedded_order: int | None = None
    stage_terms: tuple[tuple[tuple[int, float], ...], ...] = field(init=False, repr=False)
    final_terms: tuple[tuple[int, float], ...] = field(init=False, repr=False)
    error_terms: tuple[tuple[int, float], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        stage_terms = tuple(
            tuple((col, value) for col, value in enumerate(row[:stage]) if value != 0.0)
            for stage, row in enumerate(self.a)
        )
        final_terms = tuple((col, value) for col, value in enumerate(self.b) if value != 0.0)
        error_terms = tuple((col, value) for col, value in enumerate(self.error_weights or ()) if value != 0.0)
        object.__setattr__(self, "stage_terms", stage_terms)
        object.__setattr__(self, "final_terms", final_terms)
        object.__setattr__(self, "error_terms", error_terms)

    @property
    def n_stages(self) -> int:
        """Evaluations of the right-hand side per fixed step: the stages up to the last one with a non-zero weight
        (a stage after it only serves an embedded error estimate)."""
        return 1 + max(col for col, _ in self.final_terms)

    @property
    def has_error_estimate(self) -> bool:
        """Whether the tableau is an embedded pair (it carries an error row)."""
        return self.error_weights is not None

    @property
    def first_same_as_last(self) -> bool:
        """The last stage is evaluated at the end of the step, at the new state (FSAL): it is the next step's
        first evaluation."""
        return self.c[-1] == 1 and self.a[-1] == self.b and len(self.b) > 1


def make_tableau(
    name: str,
    a: Sequence[Sequence[Number]],
    b: Sequence[Number],
    c: Sequence[Number] | None = None,
    order: int = 1,
    *,
    b_embedded: Sequence[Number] | None = None,
    embedded_order: int | None = None,
) -> ButcherTableau:
    """Validate and build a :class:`ButcherTableau`.

    Raises:
        ValueError: ``a`` is not square or not strictly lower triangular, ``b`` (or ``b_embedded``) does not have
            one weight per stage or does not sum to one, ``c`` is not the row sums of ``a``, or an embedded pair
            lacks its order.
    """
    n_stages = len(b)
    if n_stages < 1:
        raise ValueError(f"scheme {name!r}: b must hold at least one weight, got {list(b)!r}")
    if len(a) != n_stages or any(len(row) != n_stages for row in a):
        raise ValueError(
            f"scheme {name!r}: a must be a {n_stages}x{n_stages} matrix (one row and column per weight in b)")
    for row_index, row in enumerate(a):
        if any(float(value) != 0.0 for value in row[row_index:]):
            raise ValueError(
                f"scheme {name!r}: a must be strictly lower triangular for an explicit scheme; "
                f"row {row_index} has a non-zero entry on or above the diagonal"
            )
    if abs(sum(float(value) for value in b) - 1.0) > _TOLERANCE:
        raise ValueError(f"scheme {name!r}: the weights b must sum to 1, got {sum(float(v) for v in b)!r}")
    row_sums = [sum((Fraction(value).limit_denominator(10**9) for value in row), Fraction(0)) for row in a]
    if c is None:
        nodes = row_sums
    else:
        if len(c) != n_stages:
            raise ValueError(f"scheme {name!r}: c must hold {n_stages} nodes, got {len(c)}")
        nodes = [Fraction(value).limit_denominator(10**9) for value in c]
        for index, (node, row_sum) in enumerate(zip(nodes, row_sums)):
            if abs(float(node - row_sum)) > 1e-9:
                raise ValueError(
                    f"scheme {name!r}: c[{index}]={float(node)!r} must equal the sum of row {index} of a "
                    f"({float(row_sum)!r}) for a consistent scheme"
                )
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"scheme {name!r}: order must be a positive integer, got {order!r}")
    error_weights = None
    if b_embedded is not None:
        if len(b_embedded) != n_stages:
            raise ValueError(f"scheme {name!r}: b_embedded must hold {n_stages} weights, got {len(b_embedded)}")
        if abs(sum(float(value) for value in b_embedded) - 1.0) > _TOLERANCE:
            raise ValueError(f"scheme {name!r}: the weights b_embedded must sum to 1, "
                             f"got {sum(float(v) for v in b_embedded)!r}")
        if isinstance(embedded_order, bool) or not isinstance(embedded_order, int) or not 1 <= embedded_order < order:
            raise ValueError(f"scheme {name!r}: embedded_order={embedded_order!r} is not valid: expected an integer "
                             f"in [1, {order - 1}] (the order of the embedded solution, below the scheme's)")
        # exact differences where the weights are fractions, so that equal weights give an exact zero
        error_weights = tuple(float(Fraction(high) - Fraction(low)) for high, low in zip(b, b_embedded))
    elif embedded_order is not None:
        raise ValueError(f"scheme {name!r}: embedded_order={embedded_order!r} needs b_embedded")
    return ButcherTableau(
        name=name,
        a=tuple(tuple(float(value) for value in row) for row in a),
        b=tuple(float(value) for value in b),
        c=tuple(nodes),
        order=order,
        error_weights=error_weights,
        embedded_order=embedded_order,
    )


_F = Fraction
SCHEMES: Registry[ButcherTableau] = Registry("scheme")
"""The registered Runge-Kutta schemes."""


def register_scheme(
    name: str,
    a: Sequence[Sequence[Number]],
    b: Sequence[Number],
    c: Sequence[Number] | None = None,
    *,
    order: int = 1,
    b_embedded: Sequence[Number] | None = None,
    embedded_order: int | None = None,
    overwrite: bool = False,
) -> ButcherTableau:
    """Register a user-defined explicit Runge-Kutta scheme under ``name``.

    Args:
        name: the name later given as ``scheme=``.
        a: strictly lower-triangular stage matrix, one row per stage.
        b: final weights, summing to one.
        c: stage nodes; computed from ``a`` when omitted, checked against it when given.
        order: order of accuracy.
        b_embedded: weights of an embedded solution of lower order, for adaptive steps
            (:class:`~lightning_cnet.adaptive.AdaptiveRK`); its difference to ``b`` is the error row.
        embedded_order: the order of that embedded solution.
        overwrite: replace an existing scheme of the same name.

    Example:
        >>> ralston = register_scheme("ralston", a=[[0, 0], [2 / 3, 0]], b=[1 / 4, 3 / 4], order=2)
        >>> ralston.c
        (Fraction(0, 1), Fraction(2, 3))
    """
    SCHEMES.check_name(name, overwrite=overwrite)
    tableau = make_tableau(name, a, b, c, order, b_embedded=b_embedded, embedded_order=embedded_order)
    return SCHEMES.register(name, tableau, overwrite=overwrite)


def list_schemes() -> list[str]:
    """Names accepted as ``scheme=``."""
    return SCHEMES.names()


def get_scheme(scheme: str | ButcherTableau) -> ButcherTableau:
    """Look a scheme up by name (a tableau is returned as is).

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    if isinstance(scheme, ButcherTableau):
        return scheme
    return SCHEMES.get(scheme)


register_scheme("euler", a=[[0]], b=[1], order=1)
register_scheme("midpoint", a=[[0, 0], [_F(1, 2), 0]], b=[0, 1], order=2)
register_scheme("heun", a=[[0, 0], [1, 0]], b=[_F(1, 2), _F(1, 2)], order=2)
register_scheme(
    "rk3",
    a=[[0, 0, 0], [_F(1, 2), 0, 0], [-1, 2, 0]],
    b=[_F(1, 6), _F(2, 3), _F(1, 6)],
    order=3,
)
register_scheme(
    "rk4",
    a=[[0, 0, 0, 0], [_F(1, 2), 0, 0, 0], [0, _F(1, 2), 0, 0], [0, 0, 1, 0]],
    b=[_F(1, 6), _F(1, 3), _F(1, 3), _F(1, 6)],
    order=4,
)
register_scheme(
    "rk4_38",
    a=[[0, 0, 0, 0], [_F(1, 3), 0, 0, 0], [-_F(1, 3), 1, 0, 0], [1, -1, 1, 0]],
    b=[_F(1, 8), _F(3, 8), _F(3, 8), _F(1, 8)],
    order=4,
)


# Embedded pairs: a solution and an error estimate from the same stages (adaptive steps: lightning_cnet.adaptive).
register_scheme(
    "bosh3",
    a=[[0, 0, 0, 0], [_F(1, 2), 0, 0, 0], [0, _F(3, 4), 0, 0], [_F(2, 9), _F(1, 3), _F(4, 9), 0]],
    b=[_F(2, 9), _F(1, 3), _F(4, 9), 0],
    b_embedded=[_F(7, 24), _F(1, 4), _F(1, 3), _F(1, 8)],
    order=3,
    embedded_order=2,
)
register_scheme(
    "dopri5",
    a=[
        [0, 0, 0, 0, 0, 0, 0],
        [_F(1, 5), 0, 0, 0, 0, 0, 0],
        [_F(3, 40), _F(9, 40), 0, 0, 0, 0, 0],
        [_F(44, 45), _F(-56, 15), _F(32, 9), 0, 0, 0, 0],
        [_F(19372, 6561), _F(-25360, 2187), _F(64448, 6561), _F(-212, 729), 0, 0, 0],
        [_F(9017, 3168), _F(-355, 33), _F(46732, 5247), _F(49, 176), _F(-5103, 18656), 0, 0],
        [_F(35, 384), 0, _F(500, 1113), _F(125, 192), _F(-2187, 6784), _F(11, 84), 0],
    ],
    b=[_F(35, 384), 0, _F(500, 1113), _F(125, 192), _F(-2187, 6784), _F(11, 84), 0],
    b_embedded=[_F(5179, 57600), 0, _F(7571, 16695), _F(393, 640), _F(-92097, 339200), _F(187, 2100), _F(1, 40)],
    order=5,
    embedded_order=4,
)


def validate_n_steps(n_steps: int, argument: str = "n_steps") -> None:
    """Raise ``ValueError`` unless ``n_steps`` is an integer >= 1."""
    check_integer(argument, n_steps)


def rk_stage_plan(basis: Basis, n_basis: int, tableau: ButcherTableau, n_steps: int) -> RKStagePlan:
    """Which pieces every Runge-Kutta stage of ``n_steps`` equal steps reads, computed exactly.

    RK stage ``j`` of step ``i`` sits at ``t = (i + c_j) / n_steps``. A stage at the end of its step (``c_j = 1``)
    takes the left limit, so it reads the piece its step ends in (the open-interval rule).
    """
    return tuple(
        tuple(
            basis.node_weights(n_basis, Fraction(step, n_steps) + node / n_steps, left_limit=node == 1)
            for node in tableau.c[: tableau.n_stages]
        )
        for step in range(n_steps)
    )


class Integrator(Protocol[PlanT]):
    """How an ODE stage is integrated: ``dx/dt = depth * rate(theta(t), x)`` over ``t in [0, 1]``.

    A stage asks for a plan once per resolution (which coefficients of its basis every evaluation reads, as far as
    that can be known before the run) and integrates with it at every forward pass. Implementations are immutable:
    their settings are part of the stage's :class:`~lightning_cnet.resolution.StageResolution`.

    Attributes:
        trains: whether the stage may use it in training mode (an integrator that tries steps and rejects some
            would let BatchNorm learn from the rejected ones).
    """

    trains: ClassVar[bool]

    @property
    def name(self) -> str:
        """The scheme's name."""

    @property
    def n_steps(self) -> int | None:
        """Steps over ``[0, 1]`` (the first step's size ``1 / n_steps`` for an adaptive integrator)."""

    def plan(self, basis: Basis, n_basis: int) -> PlanT:
        """What the integration reads of a basis of ``n_basis`` coefficients, computed once per resolution."""

    def integrate(self, rate: Rate, x: torch.Tensor, depth: float, plan: PlanT) -> torch.Tensor:
        """The state at ``t = 1`` from ``x`` at ``t = 0``."""

    def segments(self, plan: PlanT) -> Sequence[PlanT]:
        """Consecutive parts of ``plan``; integrating them in turn is integrating ``plan`` (so that training can
        recompute each part's activations in backward)."""

    def function_evaluations(self, plan: PlanT) -> int:
        """Evaluations of ``rate`` per integration (an adaptive integrator: those of its last integration)."""


@dataclass(frozen=True, init=False, repr=False)
class FixedStepRK:
    """``n_steps`` equal steps of an explicit Runge-Kutta scheme over ``[0, 1]``: the integrator of training.

    Args:
        scheme: a registered scheme name or a :class:`ButcherTableau`.
        n_steps: number of steps; ``None`` as a manifestation keeps the stage's own step count.

    Example:
        >>> from lightning_cnet.bases import get_basis
        >>> rk4 = FixedStepRK("rk4", n_steps=8)
        >>> plan = rk4.plan(get_basis("piecewise_constant"), 1)
        >>> x1 = rk4.integrate(lambda nodes, x: -x, torch.ones(1), 1.0, plan)
        >>> abs(x1.item() - math.exp(-1.0)) < 1e-5, rk4.function_evaluations(plan)
        (True, 32)
        >>> rk4
        FixedStepRK('rk4', n_steps=8)
    """

    tableau: ButcherTableau
    n_steps: int | None
    trains: ClassVar[bool] = True

    def __init__(self, scheme: str | ButcherTableau = "euler", n_steps: int | None = None) -> None:
        check_integer("n_steps", n_steps, optional=True)
        object.__setattr__(self, "tableau", get_scheme(scheme))
        object.__setattr__(self, "n_steps", n_steps)

    @property
    def name(self) -> str:
        return self.tableau.name

    def __repr__(self) -> str:
        return f"FixedStepRK({self.name!r}, n_steps={self.n_steps!r})"

    def plan(self, basis: Basis, n_basis: int) -> RKStagePlan:
        return rk_stage_plan(basis, n_basis, self.tableau, self._steps())

    def integrate(self, rate: Rate, x: torch.Tensor, depth: float, plan: RKStagePlan) -> torch.Tensor:
        return rk_integrate(rate, x, self.tableau, depth / self._steps(), plan)

    def segments(self, plan: RKStagePlan) -> tuple[RKStagePlan, ...]:
        """One part per step."""
        return tuple((step,) for step in plan)

    def function_evaluations(self, plan: RKStagePlan) -> int:
        return self._steps() * self.tableau.n_stages

    def _steps(self) -> int:
        if self.n_steps is None:
            raise ValueError(f"FixedStepRK({self.name!r}) has no n_steps: give one (a stage given it as a "
                             "manifestation keeps its own)")
        return self.n_steps


def rk_integrate(
    rate: Callable[[StageArgument, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tableau: ButcherTableau,
    step_size: float,
    stage_arguments: Sequence[Sequence[StageArgument]],
) -> torch.Tensor:
    """Take ``len(stage_arguments)`` explicit Runge-Kutta steps of size ``step_size``.

    The generic loop behind every scheme: stage ``j`` of step ``i`` evaluates
    ``rate(stage_arguments[i][j], x_i + h * sum_l a[j][l] k_l)``, and the step ends with
    ``x_{i+1} = x_i + h * sum_j b_j k_j``. Zero tableau entries cost nothing; each non-zero one is one
    fused ``add`` pass, and a combination of several terms allocates one tensor only (under ``torch.func``
    transforms such as ``vmap`` one per term: the same values, added out of place).

    Args:
        rate: the right-hand side, called with a stage's argument (a time, or a weight lookup) and a state.
        x: initial state.
        tableau: the scheme.
        step_size: ``h`` (already multiplied by any constant factor of the right-hand side).
        stage_arguments: per step, one argument per stage.
    """
    # Under torch.func transforms (vmap, grad, jvp) a slope may be batched or carry a tangent that the running sum
    # does not (a first slope that does not depend on the mapped input): adding it in place would be refused or
    # lose it, so every term is added out of place there.
    in_place = not torch._C._are_functorch_transforms_active()
    for step_arguments in stage_arguments:
        slopes: list[torch.Tensor] = []
        for terms, argument in zip(tableau.stage_terms, step_arguments):
            slopes.append(rate(argument, _combine(x, slopes, terms, step_size, in_place)))
        x = _combine(x, slopes, tableau.final_terms, step_size, in_place)
    return x


def _combine(
    x: torch.Tensor,
    slopes: Sequence[torch.Tensor],
    terms: tuple[tuple[int, float], ...],
    step_size: float,
    in_place: bool = True,
) -> torch.Tensor:
    """``x + h * sum_j a_j k_j``, added left to right.

    The first term makes a new tensor and, if ``in_place``, the others are added to it in place: the same values as
    out-of-place adds without an allocation per term (nothing else holds that tensor yet, so autograd needs none of
    its earlier versions). A term that would change the dtype or shape of the sum, or a symbolic value (a
    ``torch.fx`` proxy, whose dtype is not known while tracing), is added out of place.
    """
    if not terms:
        return x
    (column, coefficient), *rest = terms
    combined = torch.add(x, slopes[column], alpha=step_size * coefficient)
    for column, coefficient in rest:
        slope = slopes[column]
        if in_place and _accumulates_in_place(combined, slope):
            combined.add_(slope, alpha=step_size * coefficient)
        else:
            combined = torch.add(combined, slope, alpha=step_size * coefficient)
    return combined


def _accumulates_in_place(total: torch.Tensor, term: torch.Tensor) -> bool:
    return (isinstance(total, torch.Tensor) and isinstance(term, torch.Tensor) and term.dtype == total.dtype
            and term.shape == total.shape)


def odeint_fixed(
    func: Callable[[float, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t0: float | torch.Tensor,
    t1: float | torch.Tensor,
    n_steps: int,
    scheme: str | ButcherTableau = "rk4",
) -> torch.Tensor:
    """Integrate ``dx/dt = func(t, x)`` from ``t0`` to ``t1`` in ``n_steps`` equal steps.

    A lean fixed-step ``odeint`` that returns only the final state. ``func`` receives ``t`` as a Python
    float. Works under ``torch.func.vmap``, ``grad`` and ``jvp`` (mapping over ``x0`` or over tensors ``func``
    closes over).

    Args:
        func: right-hand side ``f(t, x)``.
        x0: state at ``t0``.
        t0: start time: a number, or a one-element tensor without gradient (read once as a Python float; time is a
            constant of the integration, so no gradient flows to it).
        t1: end time, as ``t0``.
        n_steps: number of steps (>= 1).
        scheme: a registered scheme name or a :class:`ButcherTableau`.

    Raises:
        ValueError: ``t0`` or ``t1`` is not a finite real number or one-element tensor, or needs a gradient;
            ``n_steps < 1``; an unknown scheme.

    Example:
        >>> x1 = odeint_fixed(lambda t, x: torch.full_like(x, t), torch.zeros(1), 0.0, 1.0, 1, "midpoint")
        >>> x1.item()
        0.5
        >>> odeint_fixed(lambda t, x: torch.full_like(x, t), torch.zeros(1), torch.tensor(0.0), torch.tensor(1.0), 1,
        ...              "midpoint").item()
        0.5
    """
    t0, t1 = _time(t0, "t0"), _time(t1, "t1")
    validate_n_steps(n_steps)
    tableau = get_scheme(scheme)
    step_size = (t1 - t0) / n_steps
    nodes = tableau.c[: tableau.n_stages]
    times = [[t0 + (step + float(node)) * step_size for node in nodes] for step in range(n_steps)]
    return rk_integrate(func, x0, tableau, step_size, times)


def _time(value: float | torch.Tensor, argument: str) -> float:
    """``value`` as a finite Python float: a real number, or a one-element real tensor that needs no gradient.

    Raises:
        ValueError: anything else, naming ``argument``.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{argument}={value!r} is not valid: expected a number or a one-element real tensor")
        if value.requires_grad:
            raise ValueError(
                f"{argument}={value!r} requires a gradient: odeint_fixed reads the time once as a Python float and "
                f"no gradient flows to it; pass {argument}.detach() or a number"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{argument}={value!r} is not valid: expected a finite real number or one-element tensor")
    return float(value)


def rk_step(
    func: Callable[[float, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: float | torch.Tensor,
    step_size: float | torch.Tensor,
    scheme: str | ButcherTableau = "rk4",
) -> torch.Tensor:
    """One explicit Runge-Kutta step of ``dx/dt = func(t, x)`` from ``t`` to ``t + step_size`` (times as in
    :func:`odeint_fixed`)."""
    t, step_size = _time(t, "t"), _time(step_size, "step_size")
    tableau = get_scheme(scheme)
    times = [[t + float(node) * step_size for node in tableau.c[: tableau.n_stages]]]
    return rk_integrate(func, x, tableau, step_size, times)
