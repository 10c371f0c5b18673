"""The continuous-in-depth residual stage: ``dx/dt = T * R(x; theta(t))`` on ``t in [0, 1]``.

``R`` is a pre-activation residual unit ``BN -> ReLU -> Conv3x3 -> BN -> ReLU -> Conv3x3``, optionally
times a skip-init gate ``s(t)``. Every parameter of ``R`` (and the BatchNorm running statistics) is a
function of depth-time in a :mod:`~lightning_cnet.bases` basis of ``n_basis`` coefficients. The block is
integrated with ``n_steps`` steps of an explicit Runge-Kutta ``scheme``; ``T`` is the physical depth.
Scheme and step count can change after training (a different *manifestation* of the same model).

Euler with a piecewise-constant basis, ``n_basis = n_steps = T = N`` is exactly a ResNet stage of ``N``
pre-activation basic blocks.

Example:
    >>> import torch
    >>> block = ODEBlock(8, n_basis=2, n_steps=2, scheme="rk4")
    >>> block(torch.randn(2, 8, 6, 6)).shape
    torch.Size([2, 8, 6, 6])
    >>> block.refine().after
    StageResolution(n_basis=4, n_steps=4, scheme='rk4', basis='piecewise_constant', T=2.0)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_cnet.bases import Basis, NodeWeights, get_basis
from lightning_cnet.integrators import ButcherTableau, get_scheme, rk_integrate, validate_n_steps
from lightning_cnet.layers import ParameterMap, TimeBatchNorm2d, TimeConv2d, TimeDependent, TimeGate

StagePlan = tuple[tuple[NodeWeights, ...], ...]


@dataclass(frozen=True)
class StageResolution:
    """How one ODE stage is represented (``n_basis``, ``basis``, ``T``) and integrated (``n_steps``, ``scheme``)."""

    n_basis: int
    n_steps: int
    scheme: str
    basis: str
    T: float


@dataclass
class BlockChange:
    """What a change of resolution did to one block.

    Attributes:
        before: resolution before.
        after: resolution after.
        parameter_map: each replaced parameter -> (its successor, coefficient map ``[K_new, K_old]``);
            optimizers use it to carry their state over.
    """

    before: StageResolution
    after: StageResolution
    parameter_map: ParameterMap


def stage_plan(basis: Basis, n_basis: int, tableau: ButcherTableau, n_steps: int) -> StagePlan:
    """Which coefficients every Runge-Kutta stage reads, computed exactly.

    Stage ``j`` of step ``i`` sits at ``t = (i + c_j) / n_steps``. A stage at the end of its step
    (``c_j = 1``) takes the left limit, so it reads the piece of its own step (the open-interval rule).
    """
    return tuple(
        tuple(
            basis.node_weights(n_basis, Fraction(step, n_steps) + node / n_steps, left_limit=node == 1)
            for node in tableau.c
        )
        for step in range(n_steps)
    )


class _Recomputing:
    """Marks a block while a checkpointed step is recomputed in the backward pass."""

    def __init__(self, block: ODEBlock) -> None:
        self.block = block

    def __enter__(self) -> None:
        self.block._recomputing = True

    def __exit__(self, *exc: object) -> None:
        self.block._recomputing = False


class ODEBlock(nn.Module):
    """A ContinuousNet stage of constant width.

    Args:
        channels: width of the stage.
        n_basis: number of basis coefficients ``K`` of every parameter.
        n_steps: number of integration steps ``N`` (default: ``n_basis``).
        scheme: a registered Runge-Kutta scheme (see :func:`~lightning_cnet.integrators.list_schemes`).
        basis: ``"piecewise_constant"`` or ``"piecewise_linear"``.
        T: physical depth of the stage (default: ``n_steps``, so that each Euler step is ``x + R(x)``).
        skip_init: multiply ``R`` by a gate ``s(t)`` initialised to zero (the block starts as the identity).
        bias: give the convolutions time-dependent biases.
        bn_momentum: momentum of the BatchNorm running statistics.
        checkpoint_steps: in training, recompute each step's activations in the backward pass instead of
            storing them (memory O(1) in the step count for the cost of one more forward).
    """

    def __init__(
        self,
        channels: int,
        *,
        n_basis: int = 1,
        n_steps: int | None = None,
        scheme: str = "euler",
        basis: str = "piecewise_constant",
        T: float | None = None,
        skip_init: bool = True,
        bias: bool = False,
        bn_momentum: float = 0.1,
        checkpoint_steps: bool = False,
    ) -> None:
        super().__init__()
        self.basis = get_basis(basis)
        self.basis.validate_size(n_basis)
        n_steps = n_basis if n_steps is None else n_steps
        validate_n_steps(n_steps)
        self.tableau = get_scheme(scheme)
        self.n_steps = n_steps
        self.T = float(n_steps if T is None else T)
        if self.T <= 0:
            raise ValueError(f"T={T!r} is not valid: expected a positive physical depth")
        self.checkpoint_steps = checkpoint_steps
        self._recomputing = False
        self.norm1 = TimeBatchNorm2d(channels, n_basis=n_basis, momentum=bn_momentum)
        self.conv1 = TimeConv2d(channels, channels, n_basis=n_basis, bias=bias)
        self.norm2 = TimeBatchNorm2d(channels, n_basis=n_basis, momentum=bn_momentum)
        self.conv2 = TimeConv2d(channels, channels, n_basis=n_basis, bias=bias)
        self.gate = TimeGate(n_basis=n_basis) if skip_init else None
        self.load_refinements: list[BlockChange] = []
        self._update_plan()
        self.register_load_state_dict_pre_hook(_match_checkpoint_resolution)

    # ------------------------------------------------------------------ resolution
    @property
    def n_basis(self) -> int:
        """Number of basis coefficients ``K``."""
        return self.conv1.n_basis

    @property
    def scheme(self) -> str:
        """Name of the Runge-Kutta scheme."""
        return self.tableau.name

    @property
    def resolution(self) -> StageResolution:
        """The current representation and manifestation."""
        return StageResolution(self.n_basis, self.n_steps, self.scheme, self.basis.name, self.T)

    @property
    def function_evaluations(self) -> int:
        """Evaluations of ``R`` per forward pass."""
        return self.n_steps * self.tableau.n_stages

    def time_layers(self) -> Iterator[TimeDependent]:
        """The layers whose tensors carry basis coefficients."""
        return (module for module in self.children() if isinstance(module, TimeDependent))

    def set_manifestation(self, *, scheme: str | None = None, n_steps: int | None = None) -> None:
        """Integrate with another scheme and/or step count from now on; the weights are untouched.

        Raises:
            ValueError: unknown scheme or ``n_steps < 1``; nothing is changed.
        """
        tableau = self.tableau if scheme is None else get_scheme(scheme)
        if n_steps is not None:
            validate_n_steps(n_steps)
        self.tableau = tableau
        self.n_steps = self.n_steps if n_steps is None else n_steps
        self._update_plan()

    @contextmanager
    def manifestation(self, *, scheme: str | None = None, n_steps: int | None = None) -> Iterator[ODEBlock]:
        """Temporarily integrate with another scheme and/or step count."""
        previous = (self.tableau, self.n_steps)
        self.set_manifestation(scheme=scheme, n_steps=n_steps)
        try:
            yield self
        finally:
            self.tableau, self.n_steps = previous
            self._update_plan()

    def refine(self, *, noise_std: float = 0.0, generator: torch.Generator | None = None) -> BlockChange:
        """Double the time resolution in place: ``K -> K'`` (``2K``, or ``2K - 1`` for linear), ``N -> 2N``.

        ``theta(t)`` is unchanged as a function and ``T`` is kept, so the output changes only through the
        finer step (unless ``noise_std > 0`` multiplies the convolution coefficients by
        ``1 + noise_std * N(0, 1)``).
        """
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std!r} is not valid: expected a value >= 0")
        before = self.resolution
        parameter_map = self._resample(self.basis.refinement_matrix(self.n_basis))
        if noise_std > 0:
            self.conv1.perturb_(noise_std, generator)
            self.conv2.perturb_(noise_std, generator)
        self.n_steps *= 2
        self._update_plan()
        return BlockChange(before, self.resolution, parameter_map)

    def check_compress(self, n_basis: int | None, n_steps: int | None) -> None:
        """Raise ``ValueError`` if :meth:`compress` would refuse these arguments."""
        if n_basis is not None:
            self.basis.validate_size(n_basis)
            if n_basis > self.n_basis:
                raise ValueError(
                    f"n_basis={n_basis} is finer than the current {self.n_basis}: compression projects onto "
                    f"a coarser basis, expected n_basis in [{self.basis.min_size}, {self.n_basis}] "
                    "(use refine() to go finer)"
                )
        if n_steps is not None:
            validate_n_steps(n_steps)

    def compress(self, *, n_basis: int | None = None, n_steps: int | None = None) -> BlockChange:
        """L2-project ``theta(t)`` (weights and BatchNorm statistics) onto ``n_basis`` coefficients and/or
        integrate with ``n_steps`` steps, in place, without data.

        Raises:
            ValueError: a finer or invalid ``n_basis``, or ``n_steps < 1``; nothing is changed.
        """
        self.check_compress(n_basis, n_steps)
        before = self.resolution
        parameter_map: ParameterMap = {}
        if n_basis is not None and n_basis != self.n_basis:
            parameter_map = self._resample(self.basis.projection_matrix(self.n_basis, n_basis))
        if n_steps is not None:
            self.n_steps = n_steps
        self._update_plan()
        return BlockChange(before, self.resolution, parameter_map)

    def _resample(self, matrix: torch.Tensor) -> ParameterMap:
        parameter_map: ParameterMap = {}
        for layer in self.time_layers():
            parameter_map.update(layer.resample(matrix))
        return parameter_map

    def _update_plan(self) -> None:
        self._plan: StagePlan = stage_plan(self.basis, self.n_basis, self.tableau, self.n_steps)

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        """The resolution, saved in the state dict next to the tensors."""
        resolution = self.resolution
        return {"n_basis": resolution.n_basis, "n_steps": resolution.n_steps, "scheme": resolution.scheme,
                "basis": resolution.basis, "T": resolution.T}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the manifestation and ``T`` saved by :meth:`get_extra_state`."""
        self._check_same_basis(state)
        self.set_manifestation(scheme=state.get("scheme"), n_steps=state.get("n_steps"))
        self.T = float(state.get("T", self.T))

    def refinements_to_match(self, n_basis: int) -> int:
        """How many refinements take this block to ``n_basis`` coefficients.

        Raises:
            ValueError: ``n_basis`` cannot be reached by refining the current basis.
        """
        reachable, current = [], self.n_basis
        while current <= n_basis:
            if current == n_basis:
                return len(reachable)
            reachable.append(current)
            current = self.basis.refined_size(current)
        raise ValueError(
            f"a checkpoint with n_basis={n_basis} cannot be loaded into a stage with n_basis={self.n_basis} "
            f"({self.basis.name}): refinement reaches {reachable + [current]}, ...; build the model with "
            f"n_basis={n_basis}"
        )

    def pending_refinements(self, state_dict: dict[str, Any], prefix: str) -> int:
        """Refinements needed before ``state_dict`` (at ``prefix``) fits; 0 if it holds no such stage."""
        self._check_same_basis(state_dict.get(prefix + "_extra_state") or {})
        weight = state_dict.get(prefix + "conv1.weight")
        return 0 if weight is None else self.refinements_to_match(weight.shape[0])

    def _check_same_basis(self, state: dict[str, Any]) -> None:
        if state.get("basis", self.basis.name) != self.basis.name:
            raise ValueError(
                f"the checkpoint's stage uses basis={state['basis']!r} but this model uses {self.basis.name!r}; "
                f"build the model with basis={state['basis']!r}"
            )

    # ------------------------------------------------------------------ forward
    def _rate(self, weights: NodeWeights, x: torch.Tensor) -> torch.Tensor:
        track_stats = not self._recomputing
        y = torch.relu_(self.norm1(x, weights, track_stats))
        y = self.conv1(y, weights)
        y = torch.relu_(self.norm2(y, weights, track_stats))
        return self.conv2(y, weights, None if self.gate is None else self.gate(weights))

    def _step(self, x: torch.Tensor, step_plan: tuple[NodeWeights, ...]) -> torch.Tensor:
        return rk_integrate(self._rate, x, self.tableau, self.T / self.n_steps, (step_plan,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Integrate the stage from ``t = 0`` to ``t = 1``."""
        if self.checkpoint_steps and self.training and torch.is_grad_enabled():
            for step_plan in self._plan:
                x = checkpoint(
                    self._step, x, step_plan, use_reentrant=False,
                    context_fn=lambda: (nullcontext(), _Recomputing(self)),
                )
            return x
        with ExitStack() as stack:
            for layer in self.time_layers():
                stack.enter_context(layer.sliced())
            return rk_integrate(self._rate, x, self.tableau, self.T / self.n_steps, self._plan)

    def extra_repr(self) -> str:
        r = self.resolution
        return f"n_basis={r.n_basis}, n_steps={r.n_steps}, scheme={r.scheme!r}, basis={r.basis!r}, T={r.T}"


def _match_checkpoint_resolution(module: ODEBlock, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: refine a freshly built block until its tensors have the checkpoint's shapes."""
    for _ in range(module.pending_refinements(state_dict, prefix)):
        module.load_refinements.append(module.refine())
