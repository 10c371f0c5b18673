"""The continuous-in-depth stage: ``dx/dt = T * s(t) * R(x; theta(t))`` on ``t in [0, 1]``.

``R`` is any residual unit (:mod:`lightning_cnet.units`; default: the pre-activation basic unit), ``s(t)`` an
optional skip-init gate. Every parameter of ``R`` and of the gate (and the BatchNorm running statistics) is a
function of depth-time in a :mod:`~lightning_cnet.bases` basis of ``n_basis`` pieces. The stage is integrated
with ``n_steps`` steps of an explicit Runge-Kutta ``scheme``; ``T`` is the physical depth. Scheme and step count
can change after training (a different *manifestation* of the same model), and an evaluation may choose its steps
adaptively (:class:`~lightning_cnet.adaptive.AdaptiveRK`).

Euler with a piecewise-constant basis and ``n_basis = n_steps = T = N`` is exactly a ResNet stage of ``N``
blocks of the unit.

The stage holds one immutable :class:`~lightning_cnet.resolution.StageResolution` and the integration plan derived
from it; every change of resolution replaces both. The resolution travels in the state dict as tensors
(``resolution.*``); loading a state dict of a finer stage refines this one first, after checking every entry, so a
freshly built coarse model loads a refined checkpoint.

Example:
    >>> import torch
    >>> block = ODEBlock(8, n_basis=2, n_steps=2, scheme="rk4")
    >>> block(torch.randn(2, 8, 6, 6)).shape
    torch.Size([2, 8, 6, 6])
    >>> block.refine().after
    StageResolution(n_basis=4, n_steps=4, scheme='rk4', basis='piecewise_constant', T=2.0)
    >>> vector_field = ODEBlock(2, unit="mlp", unit_kwargs={"hidden": 16}, n_steps=4, T=1.0, skip_init=False)
    >>> vector_field(torch.randn(5, 2)).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from lightning_cnet._scripting import evaluated_forward_annotations, scriptable_graph
from lightning_cnet._validation import check_integer
from lightning_cnet.bases import Basis, NodeWeights, get_basis
from lightning_cnet.cost import (
    CHEAP_RESOLUTION,
    Cost,
    StageCost,
    check_cost,
    check_piece_count,
    check_step_count,
    scaled,
    unit_piece_bytes,
)
from lightning_cnet.integrators import ButcherTableau, Integrator, RKStagePlan, rk_stage_plan, validate_n_steps
from lightning_cnet.layers import ParameterChange, TimeDependent, TimeGate
from lightning_cnet.resolution import MAX_NAME_BYTES, RESOLUTION_PREFIX, StageResolution
from lightning_cnet.units import UnitFactory, build_unit

__all__ = ["BlockChange", "MAX_NAME_BYTES", "ODEBlock", "RESOLUTION_PREFIX", "RKStagePlan", "StageResolution",
           "check_noise_std", "rk_stage_plan"]


@dataclass(frozen=True, eq=False)
class BlockChange:
    """What a change of resolution did to one stage.

    Attributes:
        before: resolution before.
        after: resolution after.
        parameter_changes: per time-dependent layer, which new parameters replaced which old ones (optimizers use
            it to carry their state over).
    """

    before: StageResolution
    after: StageResolution
    parameter_changes: tuple[ParameterChange, ...]


class _FrozenStatistics:
    """While a step is recomputed for backward, leave the BatchNorm running statistics as the forward left them."""

    def __init__(self, block: ODEBlock) -> None:
        self.norms = [m for m in block.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.saved: list[tuple[float | None, torch.Tensor | None]] = []

    def __enter__(self) -> None:
        self.saved = [(norm.momentum, _clone(norm.num_batches_tracked)) for norm in self.norms]
        for norm in self.norms:
            norm.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for norm, (momentum, count) in zip(self.norms, self.saved):
            norm.momentum = momentum
            if count is not None and norm.num_batches_tracked is not None:
                norm.num_batches_tracked.copy_(count)


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


@evaluated_forward_annotations
class ODEBlock(nn.Module):
    """A ContinuousNet stage of constant width: an ODE in depth whose right-hand side is a residual unit.

    Args:
        width: channels (image states ``[B, C, H, W]``) or features (vector states ``[B, D]``) of the state.
        unit: the residual unit: a registered name (:func:`~lightning_cnet.units.list_units`), a unit class or a
            factory ``factory(width, *, n_basis, **unit_kwargs)``.
        unit_kwargs: keyword arguments of the unit (e.g. ``{"bias": True}``, ``{"hidden": 50}``).
        n_basis: number of pieces ``K`` of every time-dependent parameter.
        n_steps: number of integration steps ``N`` (default: ``n_basis``).
        scheme: a registered Runge-Kutta scheme (see :func:`~lightning_cnet.integrators.list_schemes`).
        basis: ``"piecewise_constant"``, ``"piecewise_linear"``, ``"legendre"`` (or a registered basis); a unit with
            BatchNorm needs a basis whose node weights form a partition of unity (not ``"legendre"``).
        T: physical depth of the stage (default: ``n_steps``, so that each Euler step is ``x + R(x)``). When the
            stage is refined during training, set it to the step count of the final model.
        skip_init: multiply ``R`` by a gate ``s(t)`` initialised to zero (the stage starts as the identity).
        recompute_steps: in training, recompute each step's activations in the backward pass instead of storing
            them (memory O(1) in the step count for the cost of one more forward).

    Example:
        >>> import torch
        >>> stage = ODEBlock(16, unit="bottleneck", n_basis=4, scheme="midpoint", T=4.0)
        >>> stage.function_evaluations
        8
    """

    def __init__(
        self,
        width: int,
        *,
        unit: str | UnitFactory = "preact_basic",
        unit_kwargs: dict[str, Any] | None = None,
        n_basis: int = 1,
        n_steps: int | None = None,
        scheme: str | ButcherTableau = "euler",
        basis: str | Basis = "piecewise_constant",
        T: float | None = None,
        skip_init: bool = True,
        recompute_steps: bool = False,
    ) -> None:
        super().__init__()
        get_basis(basis).validate_size(n_basis)
        n_steps = n_basis if n_steps is None else n_steps
        validate_n_steps(n_steps)
        resolution = StageResolution(n_basis, n_steps, scheme, basis, float(n_steps) if T is None else T)
        self.recompute_steps = recompute_steps
        _check_stage_size(unit, width, unit_kwargs, n_basis, n_steps, resolution.tableau, skip_init)
        self.unit = build_unit(unit, width, n_basis, unit_kwargs)
        self.gate = TimeGate(n_basis=n_basis) if skip_init else None
        for layer in self.time_layers():
            layer.check_basis(resolution.basis_family)
        self._take(resolution)
        self.register_state_dict_post_hook(_save_resolution)
        self.register_load_state_dict_pre_hook(_load_resolution)

    def _take(self, resolution: StageResolution) -> None:
        """Hold ``resolution`` and its integrator and plan from now on (the pieces already match it)."""
        integrator = resolution.integrator
        plan = integrator.plan(resolution.basis_family, resolution.n_basis)
        self._resolution, self._integrator, self._plan = resolution, integrator, plan

    # ------------------------------------------------------------------ resolution
    @property
    def resolution(self) -> StageResolution:
        """The current representation and manifestation."""
        return self._resolution

    @property
    def integrator(self) -> Integrator[Any]:
        """How the stage is integrated (:class:`~lightning_cnet.integrators.FixedStepRK` or
        :class:`~lightning_cnet.adaptive.AdaptiveRK`)."""
        return self._integrator

    @property
    def n_basis(self) -> int:
        """Number of pieces ``K``."""
        return self._resolution.n_basis

    @property
    def n_steps(self) -> int:
        """Number of integration steps ``N`` (adaptive steps: the first step is ``1 / N``)."""
        return self._resolution.n_steps

    @property
    def T(self) -> float:
        """Physical depth of the stage."""
        return self._resolution.T

    @property
    def basis(self) -> Basis:
        """The time basis of every time-dependent tensor."""
        return self._resolution.basis_family

    @property
    def tableau(self) -> ButcherTableau:
        """The Runge-Kutta scheme's tableau."""
        return self._resolution.tableau

    @property
    def scheme(self) -> str:
        """Name of the Runge-Kutta scheme."""
        return self._resolution.scheme

    @property
    def stage_resolutions(self) -> tuple[StageResolution, ...]:
        """``(resolution,)``: the per-stage view shared with :class:`~lightning_cnet.models.ContinuousNet`."""
        return (self.resolution,)

    @property
    def function_evaluations(self) -> int:
        """Evaluations of ``R`` per forward pass (adaptive steps: those of the last forward pass, 0 before any)."""
        return self._integrator.function_evaluations(self._plan)

    def time_layers(self) -> Iterator[TimeDependent]:
        """The layers whose tensors are stored as pieces (the unit's and the gate), in module order."""
        return (module for module in self.modules() if isinstance(module, TimeDependent))

    def set_manifestation(
        self,
        *,
        scheme: str | ButcherTableau | None = None,
        n_steps: int | None = None,
        integrator: Integrator[Any] | None = None,
    ) -> None:
        """Integrate another way from now on; the weights are untouched.

        Args:
            scheme: fixed steps of this scheme (``None``: keep the current integration).
            n_steps: steps (adaptive steps: the first step is ``1 / n_steps``).
            integrator: a :class:`~lightning_cnet.integrators.FixedStepRK` or an
                :class:`~lightning_cnet.adaptive.AdaptiveRK` (for evaluation), instead of ``scheme``.

        Raises:
            ValueError: unknown scheme, ``n_steps < 1`` or above :data:`~lightning_cnet.cost.MAX_STEPS_PER_STAGE`, an
                integrator that is not one of those; nothing is changed.
        """
        self._take(self._resolution.with_manifestation(scheme=scheme, n_steps=n_steps, integrator=integrator))

    @contextmanager
    def manifestation(
        self,
        *,
        scheme: str | ButcherTableau | None = None,
        n_steps: int | None = None,
        integrator: Integrator[Any] | None = None,
    ) -> Iterator[ODEBlock]:
        """Temporarily integrate another way (arguments as :meth:`set_manifestation`)."""
        previous = self._resolution, self._integrator, self._plan
        self.set_manifestation(scheme=scheme, n_steps=n_steps, integrator=integrator)
        try:
            yield self
        finally:
            self._resolution, self._integrator, self._plan = previous

    def refine(self, *, noise_std: float = 0.0, generator: torch.Generator | None = None,
               step_factor: int = 2) -> BlockChange:
        """Refine the time resolution in place: ``K -> K'`` (the basis'
        :meth:`~lightning_cnet.bases.Basis.refined_size`: ``2K``, ``2K - 1`` for linear), ``N -> step_factor * N``.

        ``theta(t)`` is unchanged as a function and ``T`` is kept, so the output changes only through the finer
        step, unless ``noise_std > 0`` multiplies the pieces of the unit's convolutions and linear maps by
        ``1 + noise_std * N(0, 1)`` (BatchNorm, LayerNorm and the gate are not perturbed).

        Args:
            noise_std: relative noise on the refined pieces.
            generator: random generator of the noise.
            step_factor: multiply the step count by this (``1`` keeps the steps).
        """
        check_noise_std(noise_std)
        check_integer("step_factor", step_factor)
        self.check_refine(step_factor=step_factor)
        before = self._resolution
        after = before.replace(n_basis=self.basis.refined_size(before.n_basis), n_steps=before.n_steps * step_factor)
        changes = self._resample(self.basis.refinement_matrix(before.n_basis))
        if noise_std > 0:
            for layer in self.time_layers():
                layer.perturb_(noise_std, generator)
        self._take(after)
        return BlockChange(before, after, changes)

    def refined_cost(self, refinements: int = 1, *, step_factor: int = 2) -> StageCost:
        """The cost of this stage after ``refinements`` refinements (see :mod:`lightning_cnet.cost`)."""
        n_basis = self.n_basis
        for _ in range(refinements):
            n_basis = self.basis.refined_size(n_basis)
        pieces = [t for layer in self.time_layers() for values in layer.pieces_by_name().values() for t in values]
        piece_bytes = math.ceil(sum(t.numel() * t.element_size() for t in pieces) / self.n_basis)
        return StageCost(n_basis, self.n_steps * step_factor**refinements, self.tableau.n_stages, piece_bytes)

    def check_refine(self, refinements: int = 1, *, step_factor: int = 2) -> None:
        """Raise :class:`~lightning_cnet.cost.ResolutionCostError` if ``refinements`` calls of :meth:`refine` would go
        beyond the bounds of :mod:`lightning_cnet.cost` or the memory available."""
        cost = self.refined_cost(refinements, step_factor=step_factor)
        check_step_count(cost.n_steps, "n_steps after refinement")
        check_piece_count(cost.n_basis, "n_basis after refinement")
        if cost.n_basis > CHEAP_RESOLUTION:
            check_cost(Cost((cost,)), what=f"refining {self.n_basis} to {cost.n_basis} pieces", warn=False,
                       device=next(self.parameters()).device)

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
            check_step_count(n_steps)

    def compress(self, *, n_basis: int | None = None, n_steps: int | None = None) -> BlockChange:
        """L2-project ``theta(t)`` (weights and BatchNorm statistics) onto ``n_basis`` pieces and/or integrate with
        ``n_steps`` steps, in place, without data.

        Raises:
            ValueError: a finer or invalid ``n_basis``, or ``n_steps < 1``; nothing is changed.
        """
        self.check_compress(n_basis, n_steps)
        before = self._resolution
        after = before.replace(**{name: value for name, value in (("n_basis", n_basis), ("n_steps", n_steps))
                                  if value is not None})
        changes: tuple[ParameterChange, ...] = ()
        if after.n_basis != before.n_basis:
            changes = self._resample(self.basis.projection_matrix(before.n_basis, after.n_basis))
        self._take(after)
        return BlockChange(before, after, changes)

    def _resample(self, matrix: torch.Tensor) -> tuple[ParameterChange, ...]:
        return tuple(layer.resample(matrix) for layer in list(self.time_layers()))

    # ------------------------------------------------------------------ checkpoints
    def refinements_to_match(self, n_basis: int) -> int:
        """How many refinements take this stage to ``n_basis`` pieces.

        Raises:
            ValueError: ``n_basis`` cannot be reached by refining the current basis.
        """
        reachable: list[int] = []
        current = self.n_basis
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

    def checkpoint_resolution(self, state_dict: dict[str, Any], prefix: str) -> StageResolution | None:
        """The resolution a state dict stores for this stage (at ``prefix``), checked; ``None`` if it stores none.

        Only the state dict is read, and nothing larger than the stored tensors is built: a claimed ``n_basis`` must
        be the number of pieces the state dict actually stores for the stage, ``n_steps`` and ``T`` are bounded
        (:mod:`lightning_cnet.cost`), so a tampered or foreign file is refused in milliseconds
        (:meth:`StageResolution.from_state_dict <lightning_cnet.resolution.StageResolution.from_state_dict>`).

        Raises:
            ValueError: an entry is missing, malformed or out of range (``T`` not finite and positive or above
                :data:`~lightning_cnet.cost.MAX_DEPTH`, ``n_steps`` not an integer in
                ``[1, MAX_STEPS_PER_STAGE]``, an unregistered scheme, another basis, an ``n_basis`` refinement cannot
                reach or that differs from the pieces stored).
        """
        resolution = StageResolution.from_state_dict(
            state_dict, prefix, basis=self.basis, check_pieces=partial(self._check_stored_pieces, state_dict, prefix))
        if resolution is not None:
            self.refinements_to_match(resolution.n_basis)
        return resolution

    def stored_piece_counts(self, state_dict: dict[str, Any], prefix: str) -> dict[str, list[int]]:
        """Per time-dependent layer of this stage, the piece indices a state dict stores for it (at ``prefix``), read
        from the keys alone (``<layer>.<piece list>.<index>[...]``); layers it stores nothing of are left out."""
        lists = {}
        for name, layer in self.named_modules():
            if isinstance(layer, TimeDependent):
                attribute = next((key for key, child in layer._modules.items()
                                  if isinstance(child, (nn.ParameterList, nn.ModuleList))), None)
                if attribute is not None:
                    lists[f"{prefix}{name}.{attribute}."] = name
        found: dict[str, set[int]] = {}
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            for start, name in lists.items():
                if key.startswith(start):
                    index = key[len(start):].split(".", 1)[0]
                    if index.isdigit():
                        found.setdefault(name, set()).add(int(index))
                    break
        return {name: sorted(indices) for name, indices in found.items()}

    def _check_stored_pieces(self, state_dict: dict[str, Any], prefix: str, n_basis: int, where: str) -> None:
        stored = self.stored_piece_counts(state_dict, prefix)
        if not stored:
            raise ValueError(f"{where} claims n_basis={n_basis} but stores none of the stage's weight pieces")
        for name, indices in stored.items():
            if indices != list(range(len(indices))) or len(indices) != n_basis:
                shown = f"{len(indices)}" if indices == list(range(len(indices))) else f"pieces {_ranges(indices)}"
                raise ValueError(f"{where} claims n_basis={n_basis} but stores {shown} for {prefix}{name}: the "
                                 "resolution does not match the tensors (a tampered or foreign file)")

    def load_resolution(self, resolution: StageResolution) -> None:
        """Take a (checked) stored resolution: refine to its ``n_basis``, take its manifestation and ``T``.

        Raises:
            ValueError: a resolution of another basis, or an ``n_basis`` refinement cannot reach.
        """
        if resolution.basis != self.basis.name:
            raise ValueError(f"a resolution of basis={resolution.basis!r} cannot be loaded into a stage of basis="
                             f"{self.basis.name!r}")
        for _ in range(self.refinements_to_match(resolution.n_basis)):
            self.refine(step_factor=1)
        self._take(resolution.replace(basis=self.basis))

    # ------------------------------------------------------------------ forward
    def _rate(self, nodes: NodeWeights, x: torch.Tensor) -> torch.Tensor:
        rate: torch.Tensor = self.unit(x, nodes, None if self.gate is None else self.gate(nodes))
        return rate

    def _recomputation_context(self) -> tuple[nullcontext[None], _FrozenStatistics]:
        return nullcontext(), _FrozenStatistics(self)

    def _segment(self, x: torch.Tensor, segment: Any) -> torch.Tensor:
        return self._integrator.integrate(self._rate, x, self._resolution.T, segment)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Integrate the stage from ``t = 0`` to ``t = 1``.

        Raises:
            RuntimeError: in training mode with an integrator that does not train (adaptive steps).
        """
        if self.training:
            if not self._integrator.trains:
                raise RuntimeError(
                    f"{self._integrator!r} is for evaluation, and this stage is in training mode: call .eval() first "
                    "(in training mode BatchNorm would learn from rejected steps), or train with fixed steps"
                )
            if self.recompute_steps and torch.is_grad_enabled():
                # compiled, the recomputation is part of the traced graph and updates no statistic: no context needed
                options: dict[str, Any] = {} if _compiling() else {"context_fn": self._recomputation_context}
                for segment in self._integrator.segments(self._plan):
                    x = checkpoint(self._segment, x, segment, use_reentrant=False, **options)
                return x
        return self._integrator.integrate(self._rate, x, self._resolution.T, self._plan)

    def __prepare_scriptable__(self) -> torch.fx.GraphModule:
        """What ``torch.jit.script(block)`` compiles: the block's ``torch.fx`` graph at its current manifestation
        (see :meth:`ContinuousNet.__prepare_scriptable__ <lightning_cnet.models.ContinuousNet.__prepare_scriptable__>`
        )."""
        return scriptable_graph(self)

    def extra_repr(self) -> str:
        r = self._resolution
        tolerances = f", rtol={r.rtol}, atol={r.atol}" if r.adaptive else ""
        return f"n_basis={r.n_basis}, n_steps={r.n_steps}, scheme={r.scheme!r}, basis={r.basis!r}, T={r.T}{tolerances}"


def _compiling() -> bool:
    """Whether TorchDynamo is tracing this call (``torch.compiler.is_compiling``, where this torch has it)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def check_noise_std(noise_std: float) -> None:
    """Raise ``ValueError`` unless ``noise_std`` is a finite number >= 0."""
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not 0 <= noise_std < math.inf:
        raise ValueError(f"noise_std={noise_std!r} is not valid: expected a finite number >= 0 (the paper used 0.1)")


def _check_stage_size(unit: str | UnitFactory, width: int, unit_kwargs: dict[str, Any] | None, n_basis: int,
                      n_steps: int, tableau: ButcherTableau, gated: bool) -> None:
    """Refuse a stage beyond the bounds of :mod:`lightning_cnet.cost`, or whose weights would not fit in memory,
    before any of it is built (a large one is measured with a one-piece probe of its unit)."""
    check_piece_count(n_basis)
    check_step_count(n_steps)
    if max(n_basis, n_steps) <= CHEAP_RESOLUTION:
        return
    stage = StageCost(n_basis, n_steps, tableau.n_stages, unit_piece_bytes(unit, width, unit_kwargs, gated))
    check_cost(Cost((stage,)), what=f"a stage of width {width} with n_basis={n_basis}, n_steps={n_steps}",
               fits=lambda share: f"n_basis={scaled(n_basis, share)} would fit", warn=False)


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 7] -> '0-2, 7'`` (at most a few runs)."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    shown = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:4]]
    return ", ".join(shown) + (", ..." if len(runs) > 4 else "")


def _save_resolution(module: ODEBlock, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: store the resolution as tensors next to the stage's parameters."""
    state_dict.update(module.resolution.to_state_dict(prefix))


def _load_resolution(module: ODEBlock, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: check the stored resolution, take it (refining first), and drop its entries."""
    resolution = module.checkpoint_resolution(state_dict, prefix)
    StageResolution.pop_state_dict(state_dict, prefix)
    if resolution is not None:
        module.load_resolution(resolution)
