"""What a resolution costs before it is built or run, and the bounds that keep a mistyped number from hanging the
process or exhausting its memory.

The cost of a ContinuousNet grows linearly with its resolution:

* weights: ``K`` pieces per stage, each the size of one residual unit's parameters and BatchNorm statistics, built in
  0.5-1.0 ms each;
* the step plan: one small Python record per Runge-Kutta stage of every step (120-330 bytes measured with
  ``tracemalloc``; counted as :data:`PLAN_BYTES_PER_EVALUATION`), built in 11-42 microseconds each;
* residual-unit evaluations per forward pass: ``N`` times the scheme's stages, per stage; the time of a forward pass
  grows with them (on one CPU thread of a busy machine, one evaluation of a batch costs 0.3-1.0 ms for
  ``cnet_digits`` at 8x8 and batch 64, 5-13 ms at 28x28 and batch 128, 18-41 ms for ``cnet_cifar`` at 32x32 and batch
  128);
* in training, the activations kept for backward: measured per sample and per step by four small forward passes
  of the model itself at the input size (:func:`activation_bytes`), plus gradients and optimizer state
  (:data:`TRAINING_COPIES` copies of the weights). Activations plus gradients come within 1-9% of the measured peak
  of a training step (``cnet_digits`` and ``cnet_cifar``, Euler, midpoint and RK4, 2-8 steps).

The figures come from ``python benchmarks/cost_bounds.py --export`` (see ``benchmarks/README.md``).

:func:`estimate_cost` adds these up for a model, at another manifestation or after refinements if asked;
:func:`check_cost` refuses what does not fit in :data:`MEMORY_FRACTION` of the memory available on the device (the
message says why and what would fit) and warns above :data:`WARN_EVALUATIONS_PER_STAGE` evaluations per stage. Hard
bounds hold whatever the memory: :data:`MAX_STEPS_PER_STAGE`, :data:`MAX_PIECES_PER_STAGE`, :data:`MAX_DEPTH`
(and :data:`MAX_EXPORT_EVALUATIONS` for an unrolled export). They are module attributes: raise them where a study
really needs more.

Example:
    >>> from lightning_cnet import get_model
    >>> cost = estimate_cost(get_model("cnet_digits", scheme="rk4", n_steps=2), refinements=2)
    >>> cost.function_evaluations, [stage.n_basis for stage in cost.stages]
    (96, [8, 8, 8])
    >>> check_step_count(10**6)
    Traceback (most recent call last):
    ...
    lightning_cnet.cost.ResolutionCostError: n_steps=1000000 is too many steps per stage: expected at most 65536 ...
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_cnet.ode_block import ODEBlock

#: Most integration steps per stage: a forward pass of 65,536 RK4 steps per stage evaluates the unit 786,432 times
#: (minutes per batch even for ``cnet_digits`` at 8x8) and its step plan takes ~100 MB per stage.
MAX_STEPS_PER_STAGE = 65_536
#: Most weight pieces per stage: each is a full copy of the unit's parameters and its own BatchNorm modules, built
#: in 0.5-1.0 ms (``cnet_digits``: 3 stages of 30,000 pieces took 79 s), so 4,096 pieces take 2-4 s per stage.
MAX_PIECES_PER_STAGE = 4_096
#: Weight pieces per stage above which building or refining warns (about 3 s for ``cnet_digits``).
WARN_PIECES_PER_STAGE = 1_024
#: Largest physical depth ``T`` of a stage: 10**6 residual blocks' worth; far beyond it, ``T / N * R(x)`` overflows
#: float32 (``3.4e38``) as soon as a gate opens.
MAX_DEPTH = 1e6
#: Residual-unit evaluations per stage and forward pass above which a warning names the cost (1,024 RK4 steps).
WARN_EVALUATIONS_PER_STAGE = 4_096
#: Most evaluations of an exported (unrolled) graph: ``torch.export`` takes 12-57 ms and ~0.2 MB of memory per
#: evaluation (measured for ``cnet_digits``: 768 evaluations in 22 s), so 2,048 take about a minute.
MAX_EXPORT_EVALUATIONS = 2_048
#: Bytes of step plan per Runge-Kutta stage of a step (measured: 120-330).
PLAN_BYTES_PER_EVALUATION = 400
#: Copies of the weights a training step holds: the weights, their gradients, two optimizer moments (Adam).
TRAINING_COPIES = 4
#: Refuse an estimate above this share of the available memory.
MEMORY_FRACTION = 0.9
#: A stage with at most this many pieces and steps is not estimated when it is built (its weights are those of a
#: 64-block ResNet stage at most); larger ones are, with a one-piece probe of the unit.
CHEAP_RESOLUTION = 64


class ResolutionCostError(ValueError):
    """A resolution (steps, pieces, refinements, depth) that cannot fit, or is beyond a hard bound."""


class ResolutionCostWarning(UserWarning):
    """A resolution that fits but whose forward pass is very slow."""


# ---------------------------------------------------------------------- hard bounds
def check_step_count(n_steps: int, argument: str = "n_steps") -> None:
    """Raise :class:`ResolutionCostError` if ``n_steps`` exceeds :data:`MAX_STEPS_PER_STAGE` (an integer >= 1 is
    assumed; :func:`~lightning_cnet.integrators.validate_n_steps` checks that)."""
    if n_steps > MAX_STEPS_PER_STAGE:
        raise ResolutionCostError(
            f"{argument}={n_steps} is too many steps per stage: expected at most {MAX_STEPS_PER_STAGE} "
            f"(lightning_cnet.cost.MAX_STEPS_PER_STAGE); a forward pass would evaluate the residual unit {n_steps} "
            f"times per stage and its step plan alone would take about "
            f"{format_bytes(n_steps * PLAN_BYTES_PER_EVALUATION)} per scheme stage"
        )


def check_piece_count(n_basis: int, argument: str = "n_basis", note: str = "") -> None:
    """Raise :class:`ResolutionCostError` if ``n_basis`` exceeds :data:`MAX_PIECES_PER_STAGE` (``note`` follows the
    value in the message)."""
    if n_basis > MAX_PIECES_PER_STAGE:
        raise ResolutionCostError(
            f"{argument}={n_basis}{note} is too many weight pieces per stage: expected at most {MAX_PIECES_PER_STAGE} "
            "(lightning_cnet.cost.MAX_PIECES_PER_STAGE); every piece is a full copy of the residual unit's weights, "
            f"built in about a millisecond: {n_basis} take ~{n_basis * 0.9 / 1000:.0f} s per stage"
        )


def check_depth(depth: Any, argument: str = "T") -> float:
    """``depth`` as a float if it is a finite number in ``(0, MAX_DEPTH]``.

    Raises:
        ValueError: anything else (a bool, a string, ``nan``, ``inf``, ``<= 0``, ``> MAX_DEPTH``).
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not (math.isfinite(depth) and depth > 0):
        raise ValueError(f"{argument}={depth!r} is not valid: expected a finite positive physical depth")
    if depth > MAX_DEPTH:
        raise ValueError(f"{argument}={depth!r} is not valid: expected a physical depth of at most {MAX_DEPTH:g} "
                         "(lightning_cnet.cost.MAX_DEPTH); the step T/n_steps would overflow float32 activations")
    return float(depth)


def check_export_evaluations(evaluations: int, n_steps: int, scheme: str) -> None:
    """Raise :class:`ResolutionCostError` if an unrolled export of ``evaluations`` unit evaluations is beyond
    :data:`MAX_EXPORT_EVALUATIONS`, naming the largest step count that is not."""
    if evaluations > MAX_EXPORT_EVALUATIONS:
        per_step = max(evaluations // max(n_steps, 1), 1)
        raise ResolutionCostError(
            f"exporting {scheme} with n_steps={n_steps} unrolls {evaluations} residual-unit evaluations into one graph "
            f"(about {evaluations * 20 / 1000:.0f} s and {format_bytes(evaluations * 200_000)} to trace); expected "
            f"at most {MAX_EXPORT_EVALUATIONS} (lightning_cnet.cost.MAX_EXPORT_EVALUATIONS): n_steps <= "
            f"{MAX_EXPORT_EVALUATIONS // per_step} for {scheme}"
        )


# ---------------------------------------------------------------------- estimates
@dataclass(frozen=True)
class StageCost:
    """The cost of one ODE stage at one resolution.

    Attributes:
        n_basis: weight pieces.
        n_steps: integration steps.
        evaluations_per_step: the scheme's Runge-Kutta stages.
        piece_bytes: bytes of one piece of every time-dependent tensor (BatchNorm statistics included).
    """

    n_basis: int
    n_steps: int
    evaluations_per_step: int
    piece_bytes: int

    @property
    def evaluations(self) -> int:
        """Residual-unit evaluations per forward pass."""
        return self.n_steps * self.evaluations_per_step

    @property
    def parameter_bytes(self) -> int:
        return self.n_basis * self.piece_bytes

    @property
    def plan_bytes(self) -> int:
        return self.evaluations * PLAN_BYTES_PER_EVALUATION


@dataclass(frozen=True)
class Cost:
    """Memory and evaluations of a model at one resolution.

    Attributes:
        stages: per ODE stage.
        other_bytes: parameters and buffers outside the stages (stem, stitches, head).
        activation_bytes: activations a training step keeps for backward at the estimated batch (0: not estimated).
        training: weights count :data:`TRAINING_COPIES` times (gradients, optimizer state).
    """

    stages: tuple[StageCost, ...]
    other_bytes: int = 0
    activation_bytes: int = 0
    training: bool = False

    @property
    def function_evaluations(self) -> int:
        """Residual-unit evaluations per forward pass, all stages."""
        return sum(stage.evaluations for stage in self.stages)

    @property
    def parameter_bytes(self) -> int:
        return self.other_bytes + sum(stage.parameter_bytes for stage in self.stages)

    @property
    def plan_bytes(self) -> int:
        return sum(stage.plan_bytes for stage in self.stages)

    @property
    def memory_bytes(self) -> int:
        """Estimated peak: weights (times :data:`TRAINING_COPIES` in training), step plans and activations."""
        copies = TRAINING_COPIES if self.training else 1
        return self.parameter_bytes * copies + self.plan_bytes + self.activation_bytes

    def describe(self) -> str:
        """One phrase: what the memory is made of."""
        steps = "-".join(str(stage.n_steps) for stage in self.stages)
        pieces = "-".join(str(stage.n_basis) for stage in self.stages)
        parts = [f"{format_bytes(self.parameter_bytes)} of weights ({pieces} pieces)"]
        if self.training:
            parts[0] += f" x{TRAINING_COPIES} with gradients and optimizer state"
        parts.append(f"{format_bytes(self.plan_bytes)} of step plans ({steps} steps)")
        if self.activation_bytes:
            parts.append(f"{format_bytes(self.activation_bytes)} of activations kept for backward")
        return ", ".join(parts)


def _ode_blocks(model: nn.Module) -> list[ODEBlock]:
    from lightning_cnet.ode_block import ODEBlock

    return [module for module in model.modules() if isinstance(module, ODEBlock)]


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _piece_bytes(block: ODEBlock) -> int:
    """Bytes of one piece of every time-dependent tensor of an ODE stage."""
    total = _tensor_bytes(t for layer in block.time_layers() for pieces in layer.pieces_by_name().values()
                          for t in pieces)
    return math.ceil(total / block.n_basis)


def unit_piece_bytes(unit: Any, width: int, unit_kwargs: dict[str, Any] | None, gated: bool) -> int:
    """Bytes of one piece of a unit's weights (and of the gate), from a one-piece unit built for the purpose on the
    CPU; the random number generator is left as it was, so building the real stage afterwards gives the same
    weights."""
    from lightning_cnet.units import build_unit

    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        probe = build_unit(unit, width, 1, unit_kwargs)
    element = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    return _tensor_bytes([*probe.parameters(), *probe.buffers()]) + (element if gated else 0)


def estimate_cost(
    model: nn.Module,
    *,
    n_steps: int | Sequence[int | None] | None = None,
    scheme: str | None = None,
    refinements: int = 0,
    batch_shape: Sequence[int] | None = None,
    training: bool = False,
    step_factor: int = 2,
) -> Cost:
    """The cost of ``model`` (a ContinuousNet, an ODE stage, or any module holding ODE stages) at a resolution.

    Args:
        model: the model as it is now.
        n_steps: steps per stage instead of the current ones (one value or one per stage).
        scheme: a scheme instead of the current one.
        refinements: estimate after this many refinements (``K -> 2K`` or ``2K - 1``, ``N -> step_factor * N``).
        batch_shape: the input batch ``[B, C, H, W]``; with ``training``, the activations are measured.
        training: count gradients, optimizer state and activations.
        step_factor: what each refinement multiplies the step count by.
    """
    from lightning_cnet.integrators import get_scheme

    blocks = _ode_blocks(model)
    steps = [n_steps] * len(blocks) if n_steps is None or isinstance(n_steps, int) else list(n_steps)
    stages = []
    for block, n in zip(blocks, steps):
        tableau = block.tableau if scheme is None else get_scheme(scheme)
        k, n = block.n_basis, block.n_steps if n is None else n
        for _ in range(refinements):
            k = block.basis.refined_size(k)
        stages.append(StageCost(k, n * step_factor**refinements, tableau.n_stages, _piece_bytes(block)))
    stage_bytes = sum(_tensor_bytes([*block.parameters(), *block.buffers()]) for block in blocks)
    other = max(_tensor_bytes([*model.parameters(), *model.buffers()]) - stage_bytes, 0)
    activations = 0
    if training and batch_shape is not None and blocks:
        largest = max(stage.n_steps for stage in stages)
        try:
            activations = activation_bytes(model, batch_shape, n_steps=largest, scheme=scheme)
        except (RuntimeError, ValueError, TypeError):  # a model that does not take such a batch: not estimated
            activations = 0
    return Cost(tuple(stages), other, activations, training)


def activation_bytes(model: nn.Module, batch_shape: Sequence[int], *, n_steps: int, scheme: str | None = None) -> int:
    """Bytes a training forward pass at ``batch_shape`` and ``n_steps`` per stage keeps for backward, measured.

    Four forward passes of the model itself, with batches of 1 and 2 samples at 1 and 2 steps per stage, count the
    bytes autograd saves (``torch.autograd.graph.saved_tensors_hooks``; each storage once, the parameters not);
    the saved bytes are bilinear in batch size and steps, so the four points give them at ``batch_shape`` and
    ``n_steps``. The passes run on copies of the buffers (BatchNorm statistics are not touched) and leave the
    manifestation as it was. Stages that recompute their steps keep only each step's input: this counts what they
    save, a lower bound.
    """
    from torch.func import functional_call

    batch, *sample = (int(size) for size in batch_shape)
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.get_default_dtype()
    own = {id(tensor) for tensor in [*model.parameters(), *model.buffers()]}
    was_training = model.training
    blocks = _ode_blocks(model)
    manifestations = [block.resolution.integrator for block in blocks]

    def saved(samples: int, steps: int) -> int:
        storages: dict[int, int] = {}  # a tensor saved by two operations (ReLU's output, the next conv's input) once

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in own and id(tensor) not in copies:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        buffers = {name: value.clone() for name, value in model.named_buffers()}
        copies = {id(value) for value in buffers.values()}
        for block in blocks:
            block.set_manifestation(scheme=scheme, n_steps=steps)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.enable_grad():
            functional_call(model, buffers, (torch.zeros(samples, *sample, device=device, dtype=dtype),), strict=False)
        return sum(storages.values())

    try:
        model.train()
        a, b, c, d = (saved(samples, steps) for samples, steps in ((1, 1), (1, 2), (2, 1), (2, 2)))
    finally:
        model.train(was_training)
        for block, integrator in zip(blocks, manifestations):
            block.set_manifestation(integrator=integrator)
    per_step_per_sample = (d - c) - (b - a)
    per_step = (b - a) - per_step_per_sample
    per_sample = (c - a) - per_step_per_sample
    fixed = a - per_step - per_sample - per_step_per_sample
    return max(fixed + per_step * n_steps + per_sample * batch + per_step_per_sample * n_steps * batch, 0)


def training_batch_shape(datamodule: Any) -> tuple[int, int, int, int] | None:
    """``(batch_size, in_chans, image_size, image_size)`` of a data module that says so (the package's data modules
    do: ``batch_size`` (or ``hparams.batch_size``), ``in_chans``, ``image_size``); ``None`` for one that does not."""
    if datamodule is None:
        return None
    hparams = getattr(datamodule, "hparams", {}) or {}
    values = []
    for name in ("batch_size", "in_chans", "image_size"):
        value = getattr(datamodule, name, None)
        value = hparams.get(name) if value is None and hasattr(hparams, "get") else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return None
        values.append(value)
    batch, channels, size = values
    return batch, channels, size, size


# ---------------------------------------------------------------------- memory
def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes of memory available to this process on ``device`` (``None``: unknown, nothing is refused).

    CUDA: the free device memory plus what torch's allocator holds unused. CPU: the kernel's ``MemAvailable``, or
    less where a cgroup limit (a container, a batch job) leaves less.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    candidates = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (Path("/sys/fs/cgroup") / limit_file).read_text().strip()
            usage = int((Path("/sys/fs/cgroup") / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(int(limit) - usage, 0)
    return None


def format_bytes(size: float) -> str:
    """``1536 -> '1.5 KB'`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_cost(
    cost: Cost,
    *,
    what: str,
    device: torch.device | str | None = None,
    fits: Callable[[float], str] | None = None,
    warn: bool = True,
) -> None:
    """Refuse a cost that does not fit; warn about a very slow one.

    Args:
        cost: the estimate.
        what: what is asked, for the messages (e.g. ``"n_steps=30000"``).
        device: where the memory is needed (default: the CPU).
        fits: given the share of the estimate that fits (``< 1``), what would, e.g. ``"n_steps=8192 would fit"``.
        warn: warn (:class:`ResolutionCostWarning`) above :data:`WARN_EVALUATIONS_PER_STAGE` evaluations per stage.

    Raises:
        ResolutionCostError: a stage beyond :data:`MAX_STEPS_PER_STAGE` or :data:`MAX_PIECES_PER_STAGE`, or an
            estimate above :data:`MEMORY_FRACTION` of the available memory.
    """
    for stage in cost.stages:
        check_step_count(stage.n_steps, f"{what}: n_steps")
        check_piece_count(stage.n_basis, f"{what}: n_basis")
    available = available_memory(device)
    if available is not None and cost.memory_bytes > MEMORY_FRACTION * available:
        share = MEMORY_FRACTION * available / cost.memory_bytes
        hint = f"; {fits(share)}" if fits is not None else ""
        where = torch.device("cpu" if device is None else device)
        raise ResolutionCostError(
            f"{what} does not fit in memory: about {format_bytes(cost.memory_bytes)} needed, "
            f"{format_bytes(available)} available on {where.type}{hint} ({cost.describe()})"
        )
    if not warn:
        return
    busiest = max((stage.evaluations for stage in cost.stages), default=0)
    pieces = max((stage.n_basis for stage in cost.stages), default=0)
    slow = []
    if busiest > WARN_EVALUATIONS_PER_STAGE:
        slow.append(f"a forward pass evaluates the residual unit {cost.function_evaluations} times ({busiest} in one "
                    f"stage, above {WARN_EVALUATIONS_PER_STAGE}; on one CPU thread about "
                    f"{cost.function_evaluations * 0.5 / 1000:.0f} s per batch of 64 8x8 digits)")
    if pieces > WARN_PIECES_PER_STAGE:
        slow.append(f"{pieces} weight pieces in a stage (above {WARN_PIECES_PER_STAGE}) take about "
                    f"{pieces * len(cost.stages) * 0.9 / 1000:.0f} s to build or refine")
    if slow:
        warnings.warn(f"{what}: expect it to be slow: {'; '.join(slow)}", ResolutionCostWarning, stacklevel=3)


def scaled(value: int, share: float, minimum: int = 1) -> int:
    """The largest power of two ``<= value * share`` (at least ``minimum``): a resolution that fits."""
    target = max(value * share, minimum)
    return max(int(2 ** math.floor(math.log2(target))), minimum)
