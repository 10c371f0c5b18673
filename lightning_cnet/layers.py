"""Layers whose parameters are functions of depth-time.

Every time-dependent tensor stores its ``K`` basis coefficients on dimension 0. A layer is called with
the :data:`~lightning_cnet.bases.NodeWeights` of the current time (which coefficients, with which
weights), computed once per resolution by the owning block, so the forward pass does plain indexing.

Example:
    >>> import torch
    >>> conv = TimeConv2d(4, 4, n_basis=2)
    >>> conv(torch.randn(1, 4, 8, 8), ((1, 1.0),)).shape
    torch.Size([1, 4, 8, 8])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnet.bases import Basis, NodeWeights

ParameterMap = dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor]]
"""``old parameter -> (new parameter, coefficient map [K_new, K_old])`` after a change of resolution."""


Coefficients = torch.Tensor | Sequence[torch.Tensor]
"""A tensor with ``K`` coefficients on dim 0, or the sequence of its ``K`` slices."""


def at_time(coeffs: Coefficients, weights: NodeWeights) -> torch.Tensor:
    """``sum_k w_k coeffs[k]`` for the given node weights; plain indexing for a single piece."""
    (index, weight), *rest = weights
    value = coeffs[index] if weight == 1.0 else coeffs[index] * weight
    for index, weight in rest:
        value = value + coeffs[index] * weight
    return value


class TimeDependent(nn.Module):
    """Base class for layers whose listed parameters and buffers carry ``K`` coefficients on dim 0."""

    time_parameters: tuple[str, ...] = ()
    time_buffers: tuple[str, ...] = ()
    _slices: dict[str, tuple[torch.Tensor, ...]] | None = None

    def coefficients(self, name: str) -> Coefficients:
        """The time-dependent parameter ``name``, or its slices while :meth:`sliced` is active."""
        slices = self._slices
        return getattr(self, name) if slices is None else slices[name]

    @contextmanager
    def sliced(self) -> Iterator[None]:
        """Split every time-dependent parameter into its ``K`` slices once (``unbind(0)``) for the duration.

        A forward pass that reads a parameter's coefficients many times (once per Runge-Kutta stage) then
        builds one backward node per parameter, which stacks the slices' gradients, instead of one per
        read, each of which scatters into a zero-filled ``[K, ...]`` tensor. Values are the same either
        way; gradients too, up to the order in which one coefficient's contributions are summed.

        Example:
            >>> conv = TimeConv2d(4, 4, n_basis=2)
            >>> with conv.sliced():
            ...     len(conv.coefficients("weight"))
            2
        """
        self._slices = {
            name: tensor.unbind(0) for name in self.time_parameters if (tensor := getattr(self, name)) is not None
        }
        try:
            yield
        finally:
            self._slices = None

    @property
    def n_basis(self) -> int:
        """Number of basis coefficients ``K``."""
        return getattr(self, self.time_parameters[0]).shape[0]

    def resample(self, matrix: torch.Tensor) -> ParameterMap:
        """Map every time-dependent tensor through ``matrix`` ``[K_new, K_old]``.

        Parameters are replaced by new ``nn.Parameter`` objects under the same names (so their position
        in ``parameters()`` is kept); buffers are replaced in place of the old ones.

        Returns:
            The map from each replaced parameter to its successor and ``matrix``.
        """
        replaced: ParameterMap = {}
        with torch.no_grad():
            for name in self.time_parameters:
                old = getattr(self, name)
                if old is None:
                    continue
                new = nn.Parameter(Basis.apply(matrix, old.detach()), requires_grad=old.requires_grad)
                setattr(self, name, new)
                replaced[old] = (new, matrix)
            for name in self.time_buffers:
                setattr(self, name, Basis.apply(matrix, getattr(self, name)))
        return replaced


class TimeConv2d(TimeDependent):
    """A 2D convolution with weights (and optional bias) ``theta(t)``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        n_basis: number of basis coefficients ``K``.
        kernel_size: square kernel size.
        bias: add a time-dependent bias.

    Each coefficient is initialised independently like a ResNet convolution (Kaiming normal, fan-out).
    """

    time_parameters = ("weight", "bias")

    def __init__(
        self, in_channels: int, out_channels: int, *, n_basis: int, kernel_size: int = 3, bias: bool = False
    ) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(n_basis, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(n_basis, out_channels)) if bias else None
        for coeff in self.weight.data:
            nn.init.kaiming_normal_(coeff, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, weights: NodeWeights, gain: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve with ``theta(t)``; ``gain`` (a scalar) scales the output by scaling the kernel."""
        weight = at_time(self.coefficients("weight"), weights)
        bias = None if self.bias is None else at_time(self.coefficients("bias"), weights)
        if gain is not None:
            weight = weight * gain
            bias = None if bias is None else bias * gain
        return F.conv2d(x, weight, bias, padding=self.padding)

    def perturb_(self, noise_std: float, generator: torch.Generator | None = None) -> None:
        """Multiply every coefficient elementwise by ``1 + noise_std * N(0, 1)`` (refinement noise)."""
        with torch.no_grad():
            for tensor in (self.weight, self.bias):
                if tensor is not None:
                    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                    tensor.mul_(1.0 + noise_std * noise.to(tensor))


class TimeBatchNorm2d(TimeDependent):
    """Batch normalisation with affine parameters and running statistics per basis coefficient.

    With a piecewise-constant basis each piece is an ordinary ``BatchNorm2d``. Where ``theta(t)`` mixes
    coefficients (linear basis), evaluation uses the mixed statistics and training updates each
    coefficient's statistics with the momentum scaled by its weight.

    Args:
        num_features: channels.
        n_basis: number of basis coefficients ``K``.
        momentum: running-statistics momentum (PyTorch convention: weight of the new batch).
        eps: added to the variance.
    """

    time_parameters = ("weight", "bias")
    time_buffers = ("running_mean", "running_var")

    def __init__(self, num_features: int, *, n_basis: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_basis, num_features))
        self.bias = nn.Parameter(torch.zeros(n_basis, num_features))
        self.register_buffer("running_mean", torch.zeros(n_basis, num_features))
        self.register_buffer("running_var", torch.ones(n_basis, num_features))

    def forward(self, x: torch.Tensor, weights: NodeWeights, track_stats: bool = True) -> torch.Tensor:
        """Normalise with the parameters at the given time.

        Args:
            x: input ``[B, C, H, W]``.
            weights: node weights of the current time.
            track_stats: in training, update the running statistics (off while a checkpointed step is
                recomputed, so statistics are updated once per forward).
        """
        weight = at_time(self.coefficients("weight"), weights)
        bias = at_time(self.coefficients("bias"), weights)
        if not self.training:
            mean = at_time(self.running_mean, weights)
            var = at_time(self.running_var, weights)
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        if len(weights) == 1:
            # A recomputed step passes the statistics with momentum 0 (left as they are), so that it saves the
            # same tensors for backward as the original forward did.
            index = weights[0][0]
            momentum = self.momentum if track_stats else 0.0
            return F.batch_norm(
                x, self.running_mean[index], self.running_var[index], weight, bias, True, momentum, self.eps
            )
        if track_stats:
            # Updated through ``.data`` so that, like the in-kernel update above, it does not bump the version
            # of buffers that earlier single-coefficient calls saved for backward.
            running_mean, running_var = self.running_mean.data, self.running_var.data
            with torch.no_grad():
                batch_var, batch_mean = torch.var_mean(x.detach().to(running_mean.dtype), dim=(0, 2, 3), correction=1)
                for index, share in weights:
                    running_mean[index].lerp_(batch_mean, self.momentum * share)
                    running_var[index].lerp_(batch_var, self.momentum * share)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    def resample(self, matrix: torch.Tensor) -> ParameterMap:
        """As :meth:`TimeDependent.resample`; a projected variance is clamped to stay positive."""
        replaced = super().resample(matrix)
        self.running_var.clamp_(min=self.eps)
        return replaced


class TimeGate(TimeDependent):
    """A scalar gate ``s(t)`` per basis coefficient, initialised to zero ("skip-init").

    Args:
        n_basis: number of basis coefficients ``K``.
    """

    time_parameters = ("gate",)

    def __init__(self, *, n_basis: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(n_basis))

    def forward(self, weights: NodeWeights) -> torch.Tensor:
        """The gate value at the given time."""
        return at_time(self.coefficients("gate"), weights)
