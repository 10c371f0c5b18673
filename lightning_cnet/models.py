"""ContinuousNet: a ResNet whose stages are ODEs in depth, usable as a drop-in vision backbone.

``stem (3x3 conv) -> ODE stage (A) -> stitch -> ODE stage (2A) -> stitch -> ODE stage (4A) -> head``.
Stitches are ordinary stride-2 pre-activation residual blocks with a 1x1 strided shortcut; the head is
``BN -> ReLU -> global average pool -> Linear``.

Builders follow torchvision (keyword-only options, ``weights=None``) and the backbone methods follow timm
(``forward_features``, ``forward_head``, ``reset_classifier``, ``num_features``, ``feature_info``,
``forward_intermediates``, ``prune_intermediate_layers``, ``set_grad_checkpointing``, ``no_weight_decay``,
``group_matcher``); :mod:`lightning_cnet.timm_support` registers the builders with timm.

Example:
    >>> import torch
    >>> model = get_model("cnet_cifar", num_classes=10, scheme="rk4", n_steps=2)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> with model.manifestation(scheme="euler", n_steps=8):
    ...     model.function_evaluations
    24
    >>> print(model.refine())
    n_basis 2-2-2 -> 4-4-4, n_steps 2-2-2 -> 4-4-4, parameters 267,616 -> 462,054
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules.batchnorm import _NormBase

from lightning_cnet._scripting import evaluated_forward_annotations, scriptable_graph
from lightning_cnet._transaction import restored_on_error
from lightning_cnet._validation import check_integer
from lightning_cnet.cost import (
    CHEAP_RESOLUTION,
    Cost,
    StageCost,
    check_cost,
    check_piece_count,
    check_step_count,
    estimate_cost,
    scaled,
    unit_piece_bytes,
)
from lightning_cnet.integrators import ButcherTableau, Integrator, get_scheme, validate_n_steps
from lightning_cnet.layers import ParameterChange, TimeGate, TimeLayerNorm
from lightning_cnet.ode_block import BlockChange, ODEBlock, check_noise_std
from lightning_cnet.registry import Registry
from lightning_cnet.resolution import StageResolution
from lightning_cnet.units import UnitFactory

PerStage = int | Sequence[int] | None
Indices = int | Sequence[int] | None
"""Which feature maps to take, as timm counts them: ``None`` all, ``n`` the last ``n``, or a sequence of indices
(negative ones from the end)."""

#: Pooling choices of the classifier head (timm's ``global_pool``): average, or none (feature maps out).
GLOBAL_POOLS = ("avg", "")


@dataclass
class ResolutionChange:
    """What :meth:`ContinuousNet.refine` or :meth:`ContinuousNet.compress` did.

    Attributes:
        before: per-stage resolution before.
        after: per-stage resolution after.
        parameters_before: number of parameters before.
        parameters_after: number of parameters after.
        parameter_changes: per time-dependent layer, which new parameters replaced which old ones.
    """

    before: tuple[StageResolution, ...]
    after: tuple[StageResolution, ...]
    parameters_before: int
    parameters_after: int
    parameter_changes: tuple[ParameterChange, ...] = field(repr=False)

    def __str__(self) -> str:
        def joined(resolutions: tuple[StageResolution, ...], name: str) -> str:
            return "-".join(str(getattr(r, name)) for r in resolutions)

        return (
            f"n_basis {joined(self.before, 'n_basis')} -> {joined(self.after, 'n_basis')}, "
            f"n_steps {joined(self.before, 'n_steps')} -> {joined(self.after, 'n_steps')}, "
            f"parameters {self.parameters_before:,} -> {self.parameters_after:,}"
        )


@evaluated_forward_annotations
class Stitch(nn.Module):
    """A downsampling pre-activation residual block between two ODE stages (not an ODE).

    Args:
        in_channels: input width.
        out_channels: output width.
        stride: spatial stride of the first convolution and of the 1x1 shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.relu(self.norm1(x)))
        y = self.conv2(self.relu(self.norm2(y)))
        out: torch.Tensor = self.shortcut(x) + y
        return out


def _per_stage(value: float | Sequence[float] | None, n_stages: int, name: str) -> list[Any]:
    if value is None or isinstance(value, (int, float)):
        return [value] * n_stages
    values = list(value)
    if len(values) != n_stages:
        raise ValueError(f"{name}={value!r} must be one value or {n_stages} values (one per stage)")
    return values


@evaluated_forward_annotations
class ContinuousNet(nn.Module):
    """A continuous-in-depth ResNet for image classification.

    Args:
        widths: channels of each ODE stage (the paper: ``A, 2A, 4A``).
        in_chans: input channels.
        num_classes: output classes; ``0`` gives a backbone with no classifier.
        scheme: Runge-Kutta scheme of every stage.
        n_steps: integration steps per stage (one value, or one per stage).
        n_basis: basis coefficients per stage (default: ``n_steps``).
        basis: ``"piecewise_constant"``, ``"piecewise_linear"`` or ``"legendre"`` (with a unit without BatchNorm).
        T: physical depth per stage (default: ``n_steps``, so Euler steps are ``x + R(x)``; for a model refined
            during training, give the step count of the final model).
        unit: the residual unit of every stage: a registered name (``"preact_basic"``, ``"bottleneck"``, see
            :func:`~lightning_cnet.units.list_units`), a unit class or a factory.
        unit_kwargs: keyword arguments of the unit (e.g. ``{"bias": True, "bn_momentum": 0.05}``).
        skip_init: gate each residual unit by ``s(t)`` initialised to zero.
        recompute_steps: recompute each step's activations in backward to save memory.

    Example:
        >>> net = ContinuousNet((8, 16), in_chans=1, num_classes=10, scheme="midpoint", n_steps=2)
        >>> [info["num_chs"] for info in net.feature_info]
        [8, 16]
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        *,
        in_chans: int = 3,
        num_classes: int = 10,
        scheme: str = "euler",
        n_steps: PerStage = 1,
        n_basis: PerStage = None,
        basis: str = "piecewise_constant",
        T: float | Sequence[float] | None = None,
        unit: str | UnitFactory = "preact_basic",
        unit_kwargs: dict[str, Any] | None = None,
        skip_init: bool = True,
        recompute_steps: bool = False,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths={widths!r} must be a non-empty list of positive integers")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 0")
        steps = _per_stage(n_steps, len(widths), "n_steps")
        for n in steps:
            validate_n_steps(n)
        pieces = [s if k is None else k for s, k in zip(steps, _per_stage(n_basis, len(widths), "n_basis"))]
        depths = _per_stage(T, len(widths), "T")
        _check_model_size(widths, steps, pieces, scheme, unit, unit_kwargs, skip_init, tied=n_basis is None)
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.stages = nn.ModuleList(
            ODEBlock(
                width, unit=unit, unit_kwargs=unit_kwargs, n_basis=k, n_steps=n, scheme=scheme, basis=basis, T=t,
                skip_init=skip_init, recompute_steps=recompute_steps,
            )
            for width, n, k, t in zip(widths, steps, pieces, depths)
        )
        self.stitches = nn.ModuleList(Stitch(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.norm: nn.Module = nn.BatchNorm2d(widths[-1])
        self.num_features = widths[-1]
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            {"num_chs": width, "reduction": 2**index, "module": f"stages.{index}"}
            for index, width in enumerate(widths)
        ]
        self.register_load_state_dict_pre_hook(_check_stage_resolutions)

    # ------------------------------------------------------------------ forward
    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after each ODE stage (channels and reductions in :attr:`feature_info`)."""
        if not is_fx_symbolic_tracing():
            self._check_input(x)
        features = []
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            if index:
                x = self.stitches[index - 1](x)
            x = stage(x)
            features.append(x)
        return features

    def _check_input(self, x: torch.Tensor) -> None:
        expected = self.stem.in_channels
        if x.dim() != 4 or x.shape[1] != expected:
            raise ValueError(
                f"{type(self).__name__} expects images [batch, {expected}, height, width], got a tensor of shape "
                f"{list(x.shape)}; build the model with in_chans={x.shape[1] if x.dim() == 4 else '...'} for such data"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map ``[B, num_features, H', W']``, normalised and activated."""
        return self._final_norm(self.forward_stages(x)[-1])

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(BN(x))`` of the head; nothing once :meth:`prune_intermediate_layers` removed the norm."""
        return x if isinstance(self.norm, nn.Identity) else torch.relu(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool a feature map (unless :attr:`global_pool` is ``""``); return the pooled features if ``pre_logits``,
        else the logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def __prepare_scriptable__(self) -> torch.fx.GraphModule:
        """What ``torch.jit.script(model)`` compiles: the model's ``torch.fx`` graph at its current manifestation
        (:func:`~lightning_cnet._scripting.scriptable_graph`). The scripted module computes ``forward`` only; it
        shares this model's parameters. Scripting a module that holds a ContinuousNet replaces it there by that
        graph (torch's ``__prepare_scriptable__`` protocol): script a ``copy.deepcopy`` to keep yours eager."""
        return scriptable_graph(self)

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (``0``: none), as timm's models do.

        Args:
            num_classes: outputs of the new classifier; ``0`` removes it (``forward`` returns pooled features).
            global_pool: ``"avg"`` (global average pooling) or ``""`` (no pooling: ``forward`` returns the feature
                map; needs ``num_classes=0``); ``None`` keeps the current pooling.

        Raises:
            ValueError: a negative ``num_classes``, an unknown ``global_pool``, or ``""`` with a classifier; nothing
                is changed.

        Example:
            >>> net = get_model("cnet_digits")
            >>> net.reset_classifier(0, global_pool="")
            >>> net(torch.randn(2, 1, 8, 8)).shape
            torch.Size([2, 32, 2, 2])
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 0")
        pool = self.global_pool if global_pool is None else global_pool
        if pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r} is not supported: expected 'avg', '' (no pooling) or None")
        if pool == "" and num_classes:
            raise ValueError(
                f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}: a linear "
                "classifier takes pooled features; pass global_pool='avg'"
            )
        self.num_classes = num_classes
        self.global_pool = pool
        device = self.stem.weight.device
        self.fc = nn.Linear(self.num_features, num_classes, device=device) if num_classes else nn.Identity()

    # ------------------------------------------------------------------ timm-style backbone
    #: Pooling of :meth:`forward_head`: ``"avg"`` or ``""`` (none); set by :meth:`reset_classifier`.
    global_pool: str = "avg"

    @property
    def in_chans(self) -> int:
        """Input channels."""
        return self.stem.in_channels

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the classifier reads (timm's name; the same as :attr:`num_features`)."""
        return self.num_features

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The feature maps after the chosen ODE stages (the entries of :attr:`feature_info`), as timm's models.

        Args:
            x: images ``[B, in_chans, H, W]``.
            indices: which stages: ``None`` all, ``n`` the last ``n``, or a sequence of indices (negative ones from
                the end).
            norm: apply the head's ``ReLU(BN(.))`` to the last stage's map when it is taken.
            stop_early: run no stage after the last one taken.
            output_fmt: ``"NCHW"`` (the only layout).
            intermediates_only: return the list of maps only.

        Returns:
            The maps in stage order, or ``(features, maps)`` where ``features`` is :meth:`forward_features`'s output
            (the raw map of the last stage run, if ``stop_early`` stopped before the end).

        Raises:
            ValueError: an index out of range or another ``output_fmt``.

        Example:
            >>> net = get_model("cnet_cifar").eval()
            >>> [tuple(m.shape) for m in net.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)]
            [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported: expected 'NCHW'")
        take, last = _stage_indices(len(self.stages), indices)
        n_run = last + 1 if stop_early else len(self.stages)
        intermediates = []
        x = self.stem(x)
        for index in range(n_run):
            if index:
                x = self.stitches[index - 1](x)
            x = self.stages[index](x)
            if index in take:
                intermediates.append(self._final_norm(x) if norm and index == len(self.stages) - 1 else x)
        if intermediates_only:
            return intermediates
        return (self._final_norm(x) if n_run == len(self.stages) else x), intermediates

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and stitches) after the last one :meth:`forward_intermediates` will take, in place.

        Args:
            indices: the stages that will be taken (as in :meth:`forward_intermediates`).
            prune_norm: drop the head's BatchNorm too (it is dropped anyway when stages are dropped).
            prune_head: drop the classifier and pooling (dropped anyway when stages are dropped).

        Returns:
            The absolute indices of the stages that will be taken.

        Example:
            >>> net = get_model("cnet_cifar")
            >>> net.prune_intermediate_layers([0, 1])
            [0, 1]
            >>> len(net.stages), net.num_features
            (2, 32)
        """
        take, last = _stage_indices(len(self.stages), indices)
        prune_end = last < len(self.stages) - 1
        self.stages = self.stages[: last + 1]
        self.stitches = self.stitches[:last]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each integration step's activations in backward (timm's gradient checkpointing): sets every
        stage's ``recompute_steps``, so activation memory no longer grows with the step count."""
        for stage in self._blocks():
            stage.recompute_steps = bool(enable)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether every stage recomputes its steps in backward (see :meth:`set_grad_checkpointing`)."""
        return all(getattr(stage, "recompute_steps", False) for stage in self.stages)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters weight decay should leave alone: the affine maps of every normalisation layer
        (each BatchNorm piece of the stages, the stitches' and the head's BatchNorm, LayerNorm pieces) and the
        skip-init gates. ``timm.optim.create_optimizer_v2`` puts them in its ``weight_decay=0`` group.

        Example:
            >>> sorted(get_model("cnet_digits").no_weight_decay())[:2]
            ['norm.bias', 'norm.weight']
        """
        names: set[str] = set()
        for module_name, module in self.named_modules():
            if isinstance(module, (_NormBase, nn.LayerNorm, nn.GroupNorm, TimeLayerNorm, TimeGate)):
                prefix = f"{module_name}." if module_name else ""
                names.update(prefix + name for name, _ in module.named_parameters())
        return names

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups in depth order for timm's layer-wise learning-rate decay: the stem, then each stage
        and the stitch after it, the head's norm with the last stage (``coarse`` makes no difference: a stage is
        one ODE)."""
        return {"stem": r"^stem", "blocks": [(r"^stages\.(\d+)", None), (r"^stitches\.(\d+)", (0,)),
                                             (r"^norm", (99999,))]}

    # ------------------------------------------------------------------ resolution
    def _blocks(self) -> list[ODEBlock]:
        """The stages (``nn.ModuleList`` is not generic: every stage is an :class:`ODEBlock`)."""
        return cast(list[ODEBlock], list(self.stages))

    @property
    def resolution(self) -> tuple[StageResolution, ...]:
        """Per-stage representation and manifestation."""
        return tuple(stage.resolution for stage in self._blocks())

    @property
    def stage_resolutions(self) -> tuple[StageResolution, ...]:
        """Per-stage resolution (the same as :attr:`resolution`; :class:`ODEBlock` has it too)."""
        return self.resolution

    @property
    def function_evaluations(self) -> int:
        """Evaluations of residual units per forward pass, summed over stages."""
        return sum(stage.function_evaluations for stage in self._blocks())

    def set_manifestation(
        self,
        *,
        scheme: str | ButcherTableau | None = None,
        n_steps: PerStage = None,
        integrator: Integrator[Any] | None = None,
    ) -> None:
        """Integrate every stage another way from now on.

        Args:
            scheme: fixed steps of this registered scheme.
            n_steps: one step count, or one per stage.
            integrator: instead of ``scheme``, a :class:`~lightning_cnet.integrators.FixedStepRK` or an
                :class:`~lightning_cnet.adaptive.AdaptiveRK` (steps chosen to a tolerance, for evaluation); its
                ``n_steps``, if given, is every stage's.

        Raises:
            ValueError: an unknown scheme, an invalid step count (one above
                :data:`~lightning_cnet.cost.MAX_STEPS_PER_STAGE` too) or integrator; no stage is changed.

        Warns:
            ResolutionCostWarning: more than :data:`~lightning_cnet.cost.WARN_EVALUATIONS_PER_STAGE` residual
                evaluations in a stage per forward pass.
        """
        steps = _per_stage(n_steps, len(self.stages), "n_steps")
        for n in steps:
            if n is not None:
                validate_n_steps(n)
        after = [stage.resolution.with_manifestation(scheme=scheme, n_steps=n, integrator=integrator)
                 for stage, n in zip(self._blocks(), steps)]
        costs = tuple(StageCost(r.n_basis, r.n_steps, r.tableau.n_stages, 0) for r in after)
        check_cost(Cost(costs), what=f"the manifestation n_steps={'-'.join(str(c.n_steps) for c in costs)}")
        for stage, n in zip(self._blocks(), steps):
            stage.set_manifestation(scheme=scheme, n_steps=n, integrator=integrator)

    @contextmanager
    def manifestation(
        self,
        *,
        scheme: str | ButcherTableau | None = None,
        n_steps: PerStage = None,
        integrator: Integrator[Any] | None = None,
    ) -> Iterator[ContinuousNet]:
        """Temporarily integrate another way (arguments as :meth:`set_manifestation`); restored on exit.

        Example:
            >>> from lightning_cnet.adaptive import AdaptiveRK
            >>> net = get_model("cnet_digits", n_steps=4)
            >>> with net.manifestation(scheme="rk4", n_steps=2):
            ...     net.resolution[0].scheme
            'rk4'
            >>> with net.manifestation(integrator=AdaptiveRK("dopri5", rtol=1e-4, atol=1e-6)):
            ...     net.resolution[0].describe()
            'n_steps=4 n_basis=4 dopri5 rtol=0.0001 atol=1e-06'
            >>> net.resolution[0].scheme
            'euler'
        """
        previous = [stage.resolution.integrator for stage in self._blocks()]
        self.set_manifestation(scheme=scheme, n_steps=n_steps, integrator=integrator)
        try:
            yield self
        finally:
            for stage, old in zip(self._blocks(), previous):
                stage.set_manifestation(integrator=old)

    @contextmanager
    def stages_off(self) -> Iterator[ContinuousNet]:
        """Temporarily replace every ODE stage by the identity: the stem, stitches and head alone.

        The baseline every claim about depth is measured against: if a model is about as accurate with its stages
        off, its ODE stages do not do the work and invariance to the manifestation says nothing.

        Example:
            >>> net = get_model("cnet_digits").eval()
            >>> x = torch.randn(2, 1, 8, 8)
            >>> with net.stages_off():
            ...     off = net(x)
            >>> torch.allclose(off, net(x))  # a fresh model's gates are zero: its stages are the identity already
            True
        """
        stages = self.stages
        self.stages = nn.ModuleList(nn.Identity() for _ in stages)
        try:
            yield self
        finally:
            self.stages = stages

    def refine(self, *, noise_std: float = 0.0, generator: torch.Generator | None = None,
               step_factor: int = 2) -> ResolutionChange:
        """Refine every stage in place: ``K -> 2K`` (``2K - 1`` for linear; the basis decides),
        ``N -> step_factor * N``, ``T`` fixed.

        Args:
            noise_std: multiply the refined convolution coefficients by ``1 + noise_std * N(0, 1)``.
            generator: random generator for the noise.
            step_factor: multiply every step count by this (``1`` keeps the steps).
        """
        check_noise_std(noise_std)
        check_integer("step_factor", step_factor)
        self.check_refine(step_factor=step_factor)
        parameters_before = self._count_parameters()
        changes = [stage.refine(noise_std=noise_std, generator=generator, step_factor=step_factor)
                   for stage in self._blocks()]
        return self._report(changes, parameters_before)

    def check_refine(self, refinements: int = 1, *, training: bool = False,
                     batch_shape: Sequence[int] | None = None, device: torch.device | str | None = None,
                     step_factor: int = 2) -> None:
        """Raise :class:`~lightning_cnet.cost.ResolutionCostError` (a ``ValueError``) if ``refinements`` more
        refinements would take a stage beyond the bounds of :mod:`lightning_cnet.cost` or the model beyond the memory
        available; warn if its forward pass would be very slow.

        Args:
            refinements: how many refinements ahead.
            training: count gradients, optimizer state and (with ``batch_shape``) the activations of a training
                step at the refined step count.
            batch_shape: the training batch ``[B, C, H, W]``.
            device: where the memory is needed (default: where the model's weights are).
            step_factor: the step count of each refinement is multiplied by this.
        """
        cost = estimate_cost(self, refinements=refinements, batch_shape=batch_shape, training=training,
                             step_factor=step_factor)
        steps = "-".join(str(stage.n_steps) for stage in cost.stages)

        def fits(share: float) -> str:  # each refinement about doubles pieces, steps and activations
            return f"about {max(refinements + math.floor(math.log2(share)), 0)} refinement(s) would fit"

        what = f"{refinements} refinement(s) ahead (to n_steps {steps}{', training' if training else ''})"
        check_cost(cost, what=what, device=self.stem.weight.device if device is None else device, fits=fits)

    def compress(self, *, n_basis: PerStage = None, n_steps: PerStage = None) -> ResolutionChange:
        """Project every stage onto fewer basis coefficients and/or integrate with fewer steps, in place.

        The weights *and* the BatchNorm statistics are L2-projected; no data is needed.

        Args:
            n_basis: coefficients per stage (one value or one per stage); ``None`` keeps them.
            n_steps: steps per stage; ``None`` keeps them.

        Raises:
            ValueError: a finer or invalid ``n_basis`` or ``n_steps < 1``; no stage is changed.
        """
        pieces = _per_stage(n_basis, len(self.stages), "n_basis")
        steps = _per_stage(n_steps, len(self.stages), "n_steps")
        for stage, k, n in zip(self._blocks(), pieces, steps):
            stage.check_compress(k, n)
        parameters_before = self._count_parameters()
        changes = [stage.compress(n_basis=k, n_steps=n) for stage, k, n in zip(self._blocks(), pieces, steps)]
        return self._report(changes, parameters_before)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: a failed load leaves the model exactly as it was.

        A state dict of a finer model (refined during training) is loaded into a freshly built coarse one: every
        stage's stored resolution is checked first, then the stages are refined to it, then the tensors copied.
        """
        with restored_on_error(self):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _report(self, block_changes: list[BlockChange], parameters_before: int) -> ResolutionChange:
        return ResolutionChange(
            before=tuple(c.before for c in block_changes),
            after=tuple(c.after for c in block_changes),
            parameters_before=parameters_before,
            parameters_after=self._count_parameters(),
            parameter_changes=tuple(change for c in block_changes for change in c.parameter_changes),
        )


def _stage_indices(n_stages: int, indices: Indices) -> tuple[list[int], int]:
    """The absolute indices ``indices`` names among ``n_stages`` feature maps, and the largest (timm's rule).

    Raises:
        ValueError: an index out of range, or a count not in ``[1, n_stages]``.

    Example:
        >>> _stage_indices(3, None), _stage_indices(3, 2), _stage_indices(3, [0, -1])
        (([0, 1, 2], 2), ([1, 2], 2), ([0, 2], 2))
    """
    if indices is None:
        indices = n_stages
    if isinstance(indices, bool):
        raise ValueError(f"indices={indices!r} is not valid: expected a count of last stages or a sequence of indices")
    if isinstance(indices, int):
        if not 0 < indices <= n_stages:
            raise ValueError(f"indices={indices} takes the last {indices} stages: expected 1 to {n_stages}")
        taken = list(range(n_stages - indices, n_stages))
    else:
        taken = []
        for index in indices:
            valid = isinstance(index, int) and not isinstance(index, bool) and -n_stages <= index < n_stages
            if not valid:
                raise ValueError(f"stage index {index!r} is out of range: expected -{n_stages} to {n_stages - 1}")
            taken.append(index % n_stages)
        if not taken:
            raise ValueError("indices=[] takes no stage: expected at least one index")
    return taken, max(taken)


def _check_model_size(widths: list[int], steps: list[int], pieces: list[int], scheme: str, unit: Any,
                      unit_kwargs: dict[str, Any] | None, gated: bool, *, tied: bool) -> None:
    """Refuse a model whose stages would not fit in memory, before any is built; warn about a very slow forward
    pass (see :mod:`lightning_cnet.cost`)."""
    tableau = get_scheme(scheme)
    if max([*steps, *(k for k in pieces if isinstance(k, int))]) <= CHEAP_RESOLUTION:
        return
    for n, k in zip(steps, pieces):
        check_step_count(n)
        check_piece_count(k, "n_basis", " (n_basis defaults to n_steps)" if tied else "")
    stages = tuple(StageCost(k, n, tableau.n_stages, unit_piece_bytes(unit, width, unit_kwargs, gated))
                   for width, n, k in zip(widths, steps, pieces))
    name = "n_steps" if tied else "n_basis"
    largest = max(steps) if tied else max(pieces)
    check_cost(Cost(stages), what=f"{name}={largest}", fits=lambda share: f"{name}={scaled(largest, share)} would fit")


def _check_stage_resolutions(model: ContinuousNet, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: check the stored resolution of every stage before any stage changes (each stage then takes
    its own in its pre-hook)."""
    for index, stage in enumerate(model._blocks()):
        stage.checkpoint_resolution(state_dict, f"{prefix}stages.{index}.")


# ---------------------------------------------------------------------- registry and builders
MODELS: Registry[Callable[..., ContinuousNet]] = Registry("model")
"""The registered model builders."""


def register_model(
    builder: Callable[..., ContinuousNet] | None = None, *, name: str | None = None, overwrite: bool = False
) -> Any:
    """Register a model builder, under its function name unless ``name`` is given; usable as a decorator.

    Example:
        >>> @register_model(name="cnet_tiny")
        ... def tiny(**kwargs):
        ...     return ContinuousNet((4, 8), **kwargs)
        >>> "cnet_tiny" in list_models("cnet_t*")
        True
    """

    def add(function: Callable[..., ContinuousNet]) -> Callable[..., ContinuousNet]:
        return MODELS.register(name or function.__name__, function, overwrite=overwrite)

    return add if builder is None else add(builder)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return MODELS.names(pattern)


def get_model(name: str, **kwargs: Any) -> ContinuousNet:
    """Build a registered model by name.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    return MODELS.get(name)(**kwargs)


def _build(widths: tuple[int, ...], weights: None, defaults: dict[str, Any], kwargs: dict[str, Any]) -> ContinuousNet:
    if weights is not None:
        raise ValueError(f"weights={weights!r}: no pretrained weights are published yet; expected weights=None")
    return ContinuousNet(widths, **{**defaults, **kwargs})


@register_model
def cnet_cifar(*, weights: None = None, **kwargs: Any) -> ContinuousNet:
    """The paper's CIFAR-sized ContinuousNet: widths 16-32-64 (``A = 16``), 3 input channels, 10 classes.

    Args:
        weights: pretrained weights; none are published, so only ``None`` is accepted.
        **kwargs: any :class:`ContinuousNet` argument (``num_classes``, ``in_chans``, ``scheme``,
            ``n_steps``, ``n_basis``, ``basis``, ``T``, ...).
    """
    return _build((16, 32, 64), weights, {"in_chans": 3, "num_classes": 10}, kwargs)


@register_model
def cnet_cifar_wide(*, weights: None = None, **kwargs: Any) -> ContinuousNet:
    """A wide ContinuousNet (widths 64-128-256, ``A = 64``) as in the paper's CIFAR-100 runs.

    Args:
        weights: pretrained weights; only ``None`` is accepted.
        **kwargs: any :class:`ContinuousNet` argument.
    """
    return _build((64, 128, 256), weights, {"in_chans": 3, "num_classes": 100}, kwargs)


@register_model
def cnet_digits(*, weights: None = None, **kwargs: Any) -> ContinuousNet:
    """A small ContinuousNet (widths 8-16-32, one input channel) for 8x8 to 32x32 digit images.

    Args:
        weights: pretrained weights; only ``None`` is accepted.
        **kwargs: any :class:`ContinuousNet` argument.
    """
    return _build((8, 16, 32), weights, {"in_chans": 1, "num_classes": 10}, kwargs)
