"""ContinuousNet: a ResNet whose stages are ODEs in depth, usable as a drop-in vision backbone.

``stem (3x3 conv) -> ODE stage (A) -> stitch -> ODE stage (2A) -> stitch -> ODE stage (4A) -> head``.
Stitches are ordinary stride-2 pre-activation residual blocks with a 1x1 strided shortcut; the head is
``BN -> ReLU -> global average pool -> Linear``.

Builders follow torchvision (keyword-only options, ``weights=None``) and the backbone methods follow timm
(``forward_features``, ``forward_head``, ``reset_classifier``, ``num_features``, ``feature_info``).

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

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_cnet.layers import ParameterMap
from lightning_cnet.integrators import get_scheme, validate_n_steps
from lightning_cnet.ode_block import BlockChange, ODEBlock, StageResolution

PerStage = int | Sequence[int] | None


@dataclass
class ResolutionChange:
    """What :meth:`ContinuousNet.refine` or :meth:`ContinuousNet.compress` did.

    Attributes:
        before: per-stage resolution before.
        after: per-stage resolution after.
        parameters_before: number of parameters before.
        parameters_after: number of parameters after.
        parameter_map: replaced parameter -> (successor, coefficient map ``[K_new, K_old]``).
    """

    before: tuple[StageResolution, ...]
    after: tuple[StageResolution, ...]
    parameters_before: int
    parameters_after: int
    parameter_map: ParameterMap = field(repr=False)

    def __str__(self) -> str:
        def joined(resolutions: tuple[StageResolution, ...], name: str) -> str:
            return "-".join(str(getattr(r, name)) for r in resolutions)

        return (
            f"n_basis {joined(self.before, 'n_basis')} -> {joined(self.after, 'n_basis')}, "
            f"n_steps {joined(self.before, 'n_steps')} -> {joined(self.after, 'n_steps')}, "
            f"parameters {self.parameters_before:,} -> {self.parameters_after:,}"
        )


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
        return self.shortcut(x) + y


def _per_stage(value: PerStage, n_stages: int, name: str) -> list[Any]:
    if value is None or isinstance(value, (int, float)):
        return [value] * n_stages
    values = list(value)
    if len(values) != n_stages:
        raise ValueError(f"{name}={value!r} must be one value or {n_stages} values (one per stage)")
    return values


class ContinuousNet(nn.Module):
    """A continuous-in-depth ResNet for image classification.

    Args:
        widths: channels of each ODE stage (the paper: ``A, 2A, 4A``).
        in_chans: input channels.
        num_classes: output classes; ``0`` gives a backbone with no classifier.
        scheme: Runge-Kutta scheme of every stage.
        n_steps: integration steps per stage (one value, or one per stage).
        n_basis: basis coefficients per stage (default: ``n_steps``).
        basis: ``"piecewise_constant"`` or ``"piecewise_linear"``.
        T: physical depth per stage (default: ``n_steps``, so Euler steps are ``x + R(x)``).
        skip_init: gate each residual unit by ``s(t)`` initialised to zero.
        bias: time-dependent convolution biases.
        bn_momentum: BatchNorm momentum inside the ODE stages.
        checkpoint_steps: recompute each step's activations in backward to save memory.

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
        skip_init: bool = True,
        bias: bool = False,
        bn_momentum: float = 0.1,
        checkpoint_steps: bool = False,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths={widths!r} must be a non-empty list of positive integers")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 0")
        steps = _per_stage(n_steps, len(widths), "n_steps")
        pieces = [s if k is None else k for s, k in zip(steps, _per_stage(n_basis, len(widths), "n_basis"))]
        depths = _per_stage(T, len(widths), "T")
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.stages = nn.ModuleList(
            ODEBlock(
                width, n_basis=k, n_steps=n, scheme=scheme, basis=basis, T=t, skip_init=skip_init, bias=bias,
                bn_momentum=bn_momentum, checkpoint_steps=checkpoint_steps,
            )
            for width, n, k, t in zip(widths, steps, pieces, depths)
        )
        self.stitches = nn.ModuleList(Stitch(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.norm = nn.BatchNorm2d(widths[-1])
        self.num_features = widths[-1]
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            {"num_chs": width, "reduction": 2**index, "module": f"stages.{index}"}
            for index, width in enumerate(widths)
        ]
        self.register_load_state_dict_pre_hook(_match_checkpoint_resolution)

    # ------------------------------------------------------------------ forward
    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after each ODE stage (channels and reductions in :attr:`feature_info`)."""
        features = []
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            if index:
                x = self.stitches[index - 1](x)
            x = stage(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map ``[B, num_features, H', W']``, normalised and activated."""
        return torch.relu(self.norm(self.forward_stages(x)[-1]))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool a feature map; return the pooled features if ``pre_logits``, else the logits."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (``0``: none)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 0")
        self.num_classes = num_classes
        device = self.norm.weight.device
        self.fc = nn.Linear(self.num_features, num_classes, device=device) if num_classes else nn.Identity()

    # ------------------------------------------------------------------ resolution
    @property
    def resolution(self) -> tuple[StageResolution, ...]:
        """Per-stage representation and manifestation."""
        return tuple(stage.resolution for stage in self.stages)

    @property
    def function_evaluations(self) -> int:
        """Evaluations of residual units per forward pass, summed over stages."""
        return sum(stage.function_evaluations for stage in self.stages)

    def set_manifestation(self, *, scheme: str | None = None, n_steps: PerStage = None) -> None:
        """Integrate every stage with another scheme and/or step count from now on.

        Args:
            scheme: a registered scheme name.
            n_steps: one step count, or one per stage.

        Raises:
            ValueError: an unknown scheme or an invalid step count; no stage is changed.
        """
        steps = _per_stage(n_steps, len(self.stages), "n_steps")
        if scheme is not None:
            get_scheme(scheme)
        for n in steps:
            if n is not None:
                validate_n_steps(n)
        for stage, n in zip(self.stages, steps):
            stage.set_manifestation(scheme=scheme, n_steps=n)

    @contextmanager
    def manifestation(self, *, scheme: str | None = None, n_steps: PerStage = None) -> Iterator[ContinuousNet]:
        """Temporarily integrate with another scheme and/or step count; restored on exit.

        Example:
            >>> net = get_model("cnet_digits", n_steps=4)
            >>> with net.manifestation(scheme="rk4", n_steps=2):
            ...     net.resolution[0].scheme
            'rk4'
            >>> net.resolution[0].scheme
            'euler'
        """
        previous = [(stage.tableau, stage.n_steps) for stage in self.stages]
        self.set_manifestation(scheme=scheme, n_steps=n_steps)
        try:
            yield self
        finally:
            for stage, (old_tableau, old_steps) in zip(self.stages, previous):
                stage.set_manifestation(scheme=old_tableau, n_steps=old_steps)

    def refine(self, *, noise_std: float = 0.0, generator: torch.Generator | None = None) -> ResolutionChange:
        """Refine every stage in place: ``K -> 2K`` (``2K - 1`` for linear), ``N -> 2N``, ``T`` fixed.

        Args:
            noise_std: multiply the refined convolution coefficients by ``1 + noise_std * N(0, 1)``.
            generator: random generator for the noise.
        """
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std!r} is not valid: expected a value >= 0")
        parameters_before = self._count_parameters()
        changes = [stage.refine(noise_std=noise_std, generator=generator) for stage in self.stages]
        return self._report(changes, parameters_before)

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
        for stage, k, n in zip(self.stages, pieces, steps):
            stage.check_compress(k, n)
        parameters_before = self._count_parameters()
        changes = [stage.compress(n_basis=k, n_steps=n) for stage, k, n in zip(self.stages, pieces, steps)]
        return self._report(changes, parameters_before)

    def _count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _report(self, block_changes: list[BlockChange], parameters_before: int) -> ResolutionChange:
        parameter_map: ParameterMap = {}
        for block_change in block_changes:
            parameter_map.update(block_change.parameter_map)
        return ResolutionChange(
            before=tuple(c.before for c in block_changes),
            after=tuple(c.after for c in block_changes),
            parameters_before=parameters_before,
            parameters_after=self._count_parameters(),
            parameter_map=parameter_map,
        )

    def pop_load_refinements(self) -> ParameterMap:
        """Parameter maps of refinements made while loading a finer checkpoint, cleared once read.

        An optimizer built before the load still holds the coarse tensors; this map says which new
        tensor replaced each of them.
        """
        parameter_map: ParameterMap = {}
        for stage in self.stages:
            for block_change in stage.load_refinements:
                parameter_map.update(block_change.parameter_map)
            stage.load_refinements.clear()
        return _compose(parameter_map)


def _compose(parameter_map: ParameterMap) -> ParameterMap:
    """Follow chains ``a -> b -> c`` of successive refinements so that every old tensor maps to its
    final successor with the product of the coefficient maps."""
    successors = {new for new, _ in parameter_map.values()}
    composed: ParameterMap = {}
    for old, (new, matrix) in parameter_map.items():
        if old in successors:
            continue
        while new in parameter_map:
            new, step = parameter_map[new]
            matrix = step @ matrix
        composed[old] = (new, matrix)
    return composed


def _match_checkpoint_resolution(model: ContinuousNet, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: check every stage can reach the checkpoint's resolution, then refine them all."""
    counts = [stage.pending_refinements(state_dict, f"{prefix}stages.{i}.") for i, stage in enumerate(model.stages)]
    for stage, count in zip(model.stages, counts):
        for _ in range(count):
            stage.load_refinements.append(stage.refine())


# ---------------------------------------------------------------------- registry and builders
_MODELS: dict[str, Callable[..., ContinuousNet]] = {}


def register_model(builder: Callable[..., ContinuousNet]) -> Callable[..., ContinuousNet]:
    """Add a builder to the registry under its function name."""
    _MODELS[builder.__name__] = builder
    return builder


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def get_model(name: str, **kwargs: Any) -> ContinuousNet:
    """Build a registered model by name.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        builder = _MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model {name!r} is not known: expected one of {list_models()}") from None
    return builder(**kwargs)


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
