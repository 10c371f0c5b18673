"""The continuous-in-depth stage: ``dx/dt = T * s(t) * R(x; theta(t))`` on ``t in [0, 1]``.

``R`` is any residual unit (:mod:`lightning_cnet.units`; default: the pre-activation basic unit), ``s(t)`` an
optional skip-init gate. Every parameter of ``R`` and of the gate (and the BatchNorm running statistics) is a
function of depth-time in a :mod:`~lightning_cnet.bases` basis of ``n_basis`` pieces. The stage is integrated
with ``n_steps`` steps of an explicit Runge-Kutta ``scheme``; ``T`` is the physical depth. Scheme and step count
can change after training (a different *manifestation* of the same model).

Euler with a piecewise-constant basis and ``n_basis = n_steps = T = N`` is exactly a ResNet stage of ``N``
blocks of the unit.

The stage's resolution (``n_basis``, ``n_steps``, ``scheme``, ``basis``, ``T``) travels in its state dict as
tensors (``resolution.*``); loading a state dict of a finer stage refines this one first, after checking every
entry, so a freshly built coarse model loads a refined checkpoint.

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
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from lightning_cnet._scripting import evaluated_forward_annotations, scriptable_graph
from lightning_cnet.bases import Basis, NodeWeights, get_basis
from lightning_cnet.cost import (
    CHEAP_RESOLUTION,
    Cost,
    StageCost,
    check_cost,
    check_depth,
    check_piece_count,
    check_step_count,
    scaled,
    unit_piece_bytes,
)
from lightning_cnet.integrators import SCHEMES, ButcherTableau, get_scheme, rk_integrate, validate_n_steps
from lightning_cnet.layers import ParameterChange, TimeDependent, TimeGate
from lightning_cnet.units import UnitFactory, build_unit

RKStagePlan = tuple[tuple[NodeWeights, ...], ...]
"""Per integration step, the node weights read by each Runge-Kutta stage."""

RESOLUTION_PREFIX = "resolution."
"""State-dict keys of a stage's resolution: ``<stage>.resolution.{n_basis, n_steps, T, scheme, basis}``."""

#: Longest scheme or basis name a checkpoint may store (registered names are a few characters).
MAX_NAME_BYTES = 64


@dataclass(frozen=True)
class StageResolution:
    """How one ODE stage is represented (``n_basis``, ``basis``, ``T``) and integrated (``n_steps``, ``scheme``)."""

    n_basis: int
    n_steps: int
    scheme: str
    basis: str
    T: float


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


def rk_stage_plan(basis: Basis, n_basis: int, tableau: ButcherTableau, n_steps: int) -> RKStagePlan:
    """Which pieces every Runge-Kutta stage reads, computed exactly.

    RK stage ``j`` of step ``i`` sits at ``t = (i + c_j) / n_steps``. A stage at the end of its step (``c_j = 1``)
    takes the left limit, so it reads the piece its step ends in (the open-interval rule).
    """
    return tuple(
        tuple(
            basis.node_weights(n_basis, Fraction(step, n_steps) + node / n_steps, left_limit=node == 1)
            for node in tableau.c
        )
        for step in range(n_steps)
    )


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
            if count is not None:
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
        basis: ``"piecewise_constant"`` or ``"piecewise_linear"`` (or a registered basis).
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
        scheme: str = "euler",
        basis: str = "piecewise_constant",
        T: float | None = None,
        skip_init: bool = True,
        recompute_steps: bool = False,
    ) -> None:
        super().__init__()
        self.basis = get_basis(basis)
        self.basis.validate_size(n_basis)
        n_steps = n_basis if n_steps is None else n_steps
        validate_n_steps(n_steps)
        self.tableau = get_scheme(scheme)
        self.n_steps = n_steps
        self.T = check_depth(float(n_steps) if T is None else T)
        self.recompute_steps = recompute_steps
        _check_stage_size(unit, width, unit_kwargs, n_basis, n_steps, self.tableau, skip_init)
        self.unit = build_unit(unit, width, n_basis, unit_kwargs)
        self.gate = TimeGate(n_basis=n_basis) if skip_init else None
        self._update_plan()
        self.register_state_dict_post_hook(_save_resolution)
        self.register_load_state_dict_pre_hook(_load_resolution)

    # ------------------------------------------------------------------ resolution
    @property
    def n_basis(self) -> int:
        """Number of pieces ``K``."""
        return next(self.time_layers()).n_basis

    @property
    def scheme(self) -> str:
        """Name of the Runge-Kutta scheme."""
        return self.tableau.name

    @property
    def resolution(self) -> StageResolution:
        """The current representation and manifestation."""
        return StageResolution(self.n_basis, self.n_steps, self.scheme, self.basis.name, self.T)

    @property
    def stage_resolutions(self) -> tuple[StageResolution, ...]:
        """``(resolution,)``: the per-stage view shared with :class:`~lightning_cnet.models.ContinuousNet`."""
        return (self.resolution,)

    @property
    def function_evaluations(self) -> int:
        """Evaluations of ``R`` per forward pass."""
        return self.n_steps * self.tableau.n_stages

    def time_layers(self) -> Iterator[TimeDependent]:
        """The layers whose tensors are stored as pieces (the unit's and the gate), in module order."""
        return (module for module in self.modules() if isinstance(module, TimeDependent))

    def set_manifestation(self, *, scheme: str | ButcherTableau | None = None, n_steps: int | None = None) -> None:
        """Integrate with another scheme and/or step count from now on; the weights are untouched.

        Raises:
            ValueError: unknown scheme, ``n_steps < 1`` or above :data:`~lightning_cnet.cost.MAX_STEPS_PER_STAGE`;
                nothing is changed.
        """
        tableau = self.tableau if scheme is None else get_scheme(scheme)
        if n_steps is not None:
            validate_n_steps(n_steps)
            check_step_count(n_steps)
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

        ``theta(t)`` is unchanged as a function and ``T`` is kept, so the output changes only through the finer
        step, unless ``noise_std > 0`` multiplies the pieces of the unit's convolutions and linear maps by
        ``1 + noise_std * N(0, 1)`` (BatchNorm, LayerNorm and the gate are not perturbed).
        """
        check_noise_std(noise_std)
        self.check_refine()
        before = self.resolution
        changes = self._resample(self.basis.refinement_matrix(self.n_basis))
        if noise_std > 0:
            for layer in self.time_layers():
                layer.perturb_(noise_std, generator)
        self.n_steps *= 2
        self._update_plan()
        return BlockChange(before, self.resolution, changes)

    def refined_cost(self, refinements: int = 1) -> StageCost:
        """The cost of this stage after ``refinements`` refinements (see :mod:`lightning_cnet.cost`)."""
        n_basis = self.n_basis
        for _ in range(refinements):
            n_basis = self.basis.refined_size(n_basis)
        pieces = [t for layer in self.time_layers() for values in layer.pieces_by_name().values() for t in values]
        piece_bytes = math.ceil(sum(t.numel() * t.element_size() for t in pieces) / self.n_basis)
        return StageCost(n_basis, self.n_steps * 2**refinements, self.tableau.n_stages, piece_bytes)

    def check_refine(self, refinements: int = 1) -> None:
        """Raise :class:`~lightning_cnet.cost.ResolutionCostError` if ``refinements`` calls of :meth:`refine` would go
        beyond the bounds of :mod:`lightning_cnet.cost` or the memory available."""
        cost = self.refined_cost(refinements)
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
        before = self.resolution
        changes: tuple[ParameterChange, ...] = ()
        if n_basis is not None and n_basis != self.n_basis:
            changes = self._resample(self.basis.projection_matrix(self.n_basis, n_basis))
        if n_steps is not None:
            self.n_steps = n_steps
        self._update_plan()
        return BlockChange(before, self.resolution, changes)

    def _resample(self, matrix: torch.Tensor) -> tuple[ParameterChange, ...]:
        return tuple(layer.resample(matrix) for layer in list(self.time_layers()))

    def _update_plan(self) -> None:
        self._plan: RKStagePlan = rk_stage_plan(self.basis, self.n_basis, self.tableau, self.n_steps)

    # ------------------------------------------------------------------ checkpoints
    def refinements_to_match(self, n_basis: int) -> int:
        """How many refinements take this stage to ``n_basis`` pieces.

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

    def checkpoint_resolution(self, state_dict: dict[str, Any], prefix: str) -> StageResolution | None:
        """The resolution a state dict stores for this stage (at ``prefix``), checked; ``None`` if it stores none.

        Only the state dict is read, and nothing larger than the stored tensors is built: a claimed ``n_basis`` must
        be the number of pieces the state dict actually stores for the stage, ``n_steps`` and ``T`` are bounded
        (:mod:`lightning_cnet.cost`), so a tampered or foreign file is refused in milliseconds.

        Raises:
            ValueError: an entry is missing, malformed or out of range (``T`` not finite and positive or above
                :data:`~lightning_cnet.cost.MAX_DEPTH`, ``n_steps`` not an integer in
                ``[1, MAX_STEPS_PER_STAGE]``, an unregistered scheme, another basis, an ``n_basis`` refinement cannot
                reach or that differs from the pieces stored).
        """
        keys = {name: prefix + RESOLUTION_PREFIX + name for name in ("n_basis", "n_steps", "T", "scheme", "basis")}
        present = {name: state_dict[key] for name, key in keys.items() if key in state_dict}
        if not present:
            return None
        where = f"the checkpoint's stage {prefix.rstrip('.') or '(root)'}"
        if missing := sorted(keys.keys() - present.keys()):
            raise ValueError(f"{where} lacks {', '.join(keys[name] for name in missing)}")
        basis, scheme = (_decode_name(present[name], keys[name]) for name in ("basis", "scheme"))
        n_basis, n_steps = (_integer(present[name], keys[name]) for name in ("n_basis", "n_steps"))
        depth = _real(present["T"], keys["T"])
        if basis != self.basis.name:
            raise ValueError(
                f"{where} uses basis={basis!r} but this model uses {self.basis.name!r}; build the model with "
                f"basis={basis!r}"
            )
        if scheme not in SCHEMES:
            raise ValueError(f"{where} uses scheme={scheme!r}, which is not registered: expected one of "
                             f"{SCHEMES.names()}")
        if n_steps < 1:
            raise ValueError(f"{where} has n_steps={n_steps}: expected an integer >= 1")
        check_step_count(n_steps, f"{where}: n_steps")
        if not (math.isfinite(depth) and depth > 0):
            raise ValueError(f"{where} has T={depth}: expected a finite positive physical depth")
        check_depth(depth, f"{where}: T")
        self._check_stored_pieces(state_dict, prefix, n_basis, where)
        self.refinements_to_match(n_basis)
        return StageResolution(n_basis, n_steps, scheme, basis, depth)

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
        """Take a (checked) stored resolution: refine to its ``n_basis``, take its manifestation and ``T``."""
        for _ in range(self.refinements_to_match(resolution.n_basis)):
            self.refine()
        self.set_manifestation(scheme=resolution.scheme, n_steps=resolution.n_steps)
        self.T = resolution.T

    # ------------------------------------------------------------------ forward
    def _rate(self, nodes: NodeWeights, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x, nodes, None if self.gate is None else self.gate(nodes))

    def _recomputation_context(self) -> tuple[nullcontext, _FrozenStatistics]:
        return nullcontext(), _FrozenStatistics(self)

    def _step(self, x: torch.Tensor, step_plan: tuple[NodeWeights, ...]) -> torch.Tensor:
        return rk_integrate(self._rate, x, self.tableau, self.T / self.n_steps, (step_plan,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Integrate the stage from ``t = 0`` to ``t = 1``."""
        if self.recompute_steps and self.training and torch.is_grad_enabled():
            # compiled, the recomputation is part of the traced graph and updates no statistic: no context needed
            options = {} if _compiling() else {"context_fn": self._recomputation_context}
            for step_plan in self._plan:
                x = checkpoint(self._step, x, step_plan, use_reentrant=False, **options)
            return x
        return rk_integrate(self._rate, x, self.tableau, self.T / self.n_steps, self._plan)

    def __prepare_scriptable__(self) -> torch.fx.GraphModule:
        """What ``torch.jit.script(block)`` compiles: the block's ``torch.fx`` graph at its current manifestation
        (see :meth:`ContinuousNet.__prepare_scriptable__ <lightning_cnet.models.ContinuousNet.__prepare_scriptable__>`
        )."""
        return scriptable_graph(self)

    def extra_repr(self) -> str:
        r = self.resolution
        return f"n_basis={r.n_basis}, n_steps={r.n_steps}, scheme={r.scheme!r}, basis={r.basis!r}, T={r.T}"


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


def _encode_name(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("utf-8")), dtype=torch.uint8)


def _decode_name(value: Any, key: str) -> str:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"{key} must be a 1-D uint8 tensor holding a name, got {_describe(value)}")
    if value.numel() > MAX_NAME_BYTES:
        raise ValueError(f"{key} holds {value.numel()} bytes: expected a name of at most {MAX_NAME_BYTES}")
    try:
        return bytes(value.tolist()).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{key} does not hold a UTF-8 name") from None


def _integer(value: Any, key: str) -> int:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dtype.is_floating_point or value.is_complex():
        raise ValueError(f"{key} must be a one-element integer tensor, got {_describe(value)}")
    return int(value.item())


def _real(value: Any, key: str) -> float:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"{key} must be a one-element tensor, got {_describe(value)}")
    return float(value.item())


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _save_resolution(module: ODEBlock, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: store the resolution as tensors next to the stage's parameters."""
    resolution = module.resolution
    key = prefix + RESOLUTION_PREFIX
    state_dict[key + "n_basis"] = torch.tensor(resolution.n_basis, dtype=torch.int64)
    state_dict[key + "n_steps"] = torch.tensor(resolution.n_steps, dtype=torch.int64)
    state_dict[key + "T"] = torch.tensor(resolution.T, dtype=torch.float64)
    state_dict[key + "scheme"] = _encode_name(resolution.scheme)
    state_dict[key + "basis"] = _encode_name(resolution.basis)


def _load_resolution(module: ODEBlock, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: check the stored resolution, take it (refining first), and drop its entries."""
    resolution = module.checkpoint_resolution(state_dict, prefix)
    for name in ("n_basis", "n_steps", "T", "scheme", "basis"):
        state_dict.pop(prefix + RESOLUTION_PREFIX + name, None)
    if resolution is not None:
        module.load_resolution(resolution)
