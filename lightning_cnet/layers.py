"""Layers whose parameters are functions of depth-time, the building blocks of residual units.

A time-dependent tensor ``theta(t) = sum_k phi_k(t) theta_k`` is stored as its ``K`` basis coefficients
("pieces"), each an ordinary tensor of the layer's shape: kernels in an ``nn.ParameterList``, BatchNorm as one
``nn.BatchNorm2d`` per piece. So every piece is what a ResNet block would hold, and the tools of the ecosystem
(``SyncBatchNorm`` conversion, ``channels_last``, safetensors, EMA) see ordinary tensors and modules. A layer is
called with the :data:`~lightning_cnet.bases.NodeWeights` of the current time (which pieces, with which
weights), computed once per resolution by the owning ODE block, so the forward pass does plain indexing.

Changing the resolution (refinement, compression) maps the pieces through a matrix ``[K_new, K_old]``
(:meth:`TimeDependent.resample`) and replaces them by new parameters; the returned :class:`ParameterChange` tells
optimizers which new parameter is made of which old ones.

Example:
    >>> import torch
    >>> conv = TimeConv2d(4, 4, n_basis=2)
    >>> conv(torch.randn(1, 4, 8, 8), ((1, 1.0),)).shape
    torch.Size([1, 4, 8, 8])
    >>> conv.n_basis, tuple(conv.weight[0].shape)
    (2, (4, 4, 3, 3))
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnet.bases import Basis, NodeWeights

#: A time-dependent tensor's ``K`` pieces: a layer's ``nn.ParameterList`` or a plain sequence of tensors.
Pieces = Sequence[torch.Tensor] | nn.ParameterList
_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True, eq=False)
class ParameterChange:
    """How a change of resolution replaced the parameters of one time-dependent layer.

    Attributes:
        old: the layer's parameters before, in module order.
        new: the layer's parameters after, in module order.
        sources: each new parameter -> the old parameters it is a linear combination of, with their coefficients (all
            of them with coefficient 0 for a new parameter that starts at zero).
    """

    old: tuple[nn.Parameter, ...]
    new: tuple[nn.Parameter, ...]
    sources: Mapping[nn.Parameter, tuple[tuple[nn.Parameter, float], ...]]


def at_time(pieces: Pieces, nodes: NodeWeights) -> torch.Tensor:
    """``sum_k w_k pieces[k]`` for the given node weights; plain indexing for a single piece."""
    index, weight = nodes[0]
    value = pieces[index] if weight == 1.0 else pieces[index] * weight
    for index, weight in nodes[1:]:
        value = value + pieces[index] * weight
    return value


def resample_pieces(pieces: Sequence[torch.Tensor], matrix: torch.Tensor) -> list[torch.Tensor]:
    """Map ``K_old`` pieces of one shape through ``matrix`` ``[K_new, K_old]`` (in float64), keeping dtype, device
    and a ``channels_last`` memory format."""
    stacked = torch.stack([piece.detach() for piece in pieces])
    mapped = Basis.apply(matrix, stacked).unbind(0)
    first = pieces[0]
    keep_channels_last = first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not (
        first.is_contiguous()
    )
    form = torch.channels_last if keep_channels_last else torch.contiguous_format
    return [tensor.clone(memory_format=form) for tensor in mapped]  # each piece owns its storage


def _sources(matrix: torch.Tensor, old: Sequence[nn.Parameter], row: int) -> tuple[tuple[nn.Parameter, float], ...]:
    """The old pieces a new one combines, with their coefficients; a new piece that starts at zero (a higher Legendre
    mode) is the zero combination of all of them, so that optimizers put it with them."""
    found = tuple((old[col], float(matrix[row, col])) for col in range(matrix.shape[1]) if matrix[row, col] != 0)
    return found or tuple((piece, 0.0) for piece in old)


def _weight_and_bias(
    weight: Pieces, bias: Pieces | None, nodes: NodeWeights,
    gain: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weighted layer's ``theta(t)``: weight and bias at the node weights, both scaled by ``gain`` if given."""
    weight_t = at_time(weight, nodes)
    bias_t = None if bias is None else at_time(bias, nodes)
    if gain is not None:
        weight_t = weight_t * gain
        bias_t = None if bias_t is None else bias_t * gain
    return weight_t, bias_t


class TimeDependent(nn.Module):
    """Base class for layers whose tensors are stored as ``K`` pieces.

    Subclasses list the names of their ``nn.ParameterList`` attributes in ``time_parameters`` (an entry may be
    ``None``, e.g. a missing bias) and those perturbed by refinement noise in ``noisy_parameters``; layers stored
    otherwise (BatchNorm) override :attr:`n_basis` and :meth:`resample`.
    """

    time_parameters: tuple[str, ...] = ()
    noisy_parameters: tuple[str, ...] = ()

    @property
    def n_basis(self) -> int:
        """Number of pieces ``K``."""
        return len(getattr(self, self.time_parameters[0]))

    def pieces_by_name(self) -> dict[str, list[torch.Tensor]]:
        """Every time-dependent tensor of the layer as its list of ``K`` pieces, by name."""
        return {name: list(pieces) for name in self.time_parameters if (pieces := getattr(self, name)) is not None}

    def resample(self, matrix: torch.Tensor) -> ParameterChange:
        """Replace every piece list by ``matrix @ pieces`` (``matrix`` ``[K_new, K_old]``), as new parameters.

        The new lists take the place of the old ones (same attribute names), so the order of ``parameters()`` is
        kept up to the number of pieces.
        """
        old = tuple(self.parameters())
        sources: dict[nn.Parameter, tuple[tuple[nn.Parameter, float], ...]] = {}
        for name in self.time_parameters:
            pieces = getattr(self, name)
            if pieces is None:
                continue
            tensors = resample_pieces(list(pieces), matrix)
            new = [nn.Parameter(tensor, requires_grad=pieces[0].requires_grad) for tensor in tensors]
            sources.update({param: _sources(matrix, pieces, row) for row, param in enumerate(new)})
            setattr(self, name, nn.ParameterList(new))
        return ParameterChange(old, tuple(self.parameters()), sources)

    def check_basis(self, basis: Basis) -> None:
        """Raise ``ValueError`` if the layer cannot be driven by the node weights of ``basis`` (every layer can, but
        those that mix what is not linear in the coefficients: :class:`TimeBatchNorm2d`)."""

    def perturb_(self, noise_std: float, generator: torch.Generator | None = None) -> None:
        """Multiply every piece of the ``noisy_parameters`` elementwise by ``1 + noise_std * N(0, 1)``."""
        with torch.no_grad():
            for name in self.noisy_parameters:
                for piece in getattr(self, name) or ():
                    noise = torch.randn(piece.shape, generator=generator, dtype=torch.float32)
                    piece.mul_(1.0 + noise_std * noise.to(piece))


def _pieces(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> nn.ParameterList:
    return nn.ParameterList(nn.Parameter(tensor) for tensor in tensors)


class TimeConv2d(TimeDependent):
    """A 2D convolution (stride 1, "same" padding) with kernel (and optional bias) ``theta(t)``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        n_basis: number of pieces ``K``.
        kernel_size: square kernel size (odd).
        groups: convolution groups (``in_channels`` for a depthwise convolution).
        bias: add a time-dependent bias.

    Each piece is initialised independently like a ResNet convolution (Kaiming normal, fan-out).

    Example:
        >>> import torch
        >>> depthwise = TimeConv2d(8, 8, n_basis=1, groups=8)
        >>> depthwise(torch.randn(2, 8, 5, 5), ((0, 1.0),)).shape
        torch.Size([2, 8, 5, 5])
    """

    time_parameters = ("weight", "bias")
    noisy_parameters = ("weight", "bias")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        n_basis: int,
        kernel_size: int = 3,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size!r} must be odd (the convolution keeps the spatial size)")
        self.padding = kernel_size // 2
        self.groups = groups
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        kernels = [torch.empty(shape) for _ in range(n_basis)]
        for kernel in kernels:
            nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")
        self.weight = _pieces(kernels)
        self.bias = _pieces(torch.zeros(out_channels) for _ in range(n_basis)) if bias else None

    def forward(self, x: torch.Tensor, nodes: NodeWeights, gain: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve with ``theta(t)``; ``gain`` (a scalar) scales the output by scaling the kernel."""
        weight, bias = _weight_and_bias(self.weight, self.bias, nodes, gain)
        return F.conv2d(x, weight, bias, padding=self.padding, groups=self.groups)


class TimeLinear(TimeDependent):
    """A linear map ``y = W(t) x + b(t)`` for states ``[..., in_features]``.

    Args:
        in_features: input size.
        out_features: output size.
        n_basis: number of pieces ``K``.
        bias: add a time-dependent bias.

    Pieces are initialised like ``nn.Linear`` (uniform with bound ``1/sqrt(in_features)``), independently.

    Example:
        >>> import torch
        >>> TimeLinear(3, 5, n_basis=2)(torch.randn(4, 3), ((0, 0.5), (1, 0.5))).shape
        torch.Size([4, 5])
    """

    time_parameters = ("weight", "bias")
    noisy_parameters = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, *, n_basis: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = _pieces(torch.empty(out_features, in_features).uniform_(-bound, bound) for _ in range(n_basis))
        self.bias = _pieces(torch.empty(out_features).uniform_(-bound, bound) for _ in range(n_basis)) if bias else None

    def forward(self, x: torch.Tensor, nodes: NodeWeights, gain: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``theta(t)``; ``gain`` (a scalar) scales the output by scaling the weights."""
        weight, bias = _weight_and_bias(self.weight, self.bias, nodes, gain)
        return F.linear(x, weight, bias)


class TimeLayerNorm(TimeDependent):
    """Layer normalisation over the last dimension with a time-dependent affine map.

    Args:
        normalized_shape: size of the last dimension.
        n_basis: number of pieces ``K``.
        eps: added to the variance.
    """

    time_parameters = ("weight", "bias")

    def __init__(self, normalized_shape: int, *, n_basis: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _pieces(torch.ones(normalized_shape) for _ in range(n_basis))
        self.bias = _pieces(torch.zeros(normalized_shape) for _ in range(n_basis))

    def forward(self, x: torch.Tensor, nodes: NodeWeights) -> torch.Tensor:
        weight = at_time(self.weight, nodes)
        return F.layer_norm(x, weight.shape, weight, at_time(self.bias, nodes), self.eps)


class TimeGate(TimeDependent):
    """A scalar gate ``s(t)``, initialised to zero ("skip-init": the residual unit starts switched off).

    Args:
        n_basis: number of pieces ``K``.
    """

    time_parameters = ("gate",)

    def __init__(self, *, n_basis: int) -> None:
        super().__init__()
        self.gate = _pieces(torch.zeros(()) for _ in range(n_basis))

    def forward(self, nodes: NodeWeights) -> torch.Tensor:
        """The gate value at the given time."""
        return at_time(self.gate, nodes)


class _StatisticsSums:
    """Node-weighted sums of batch means and variances per piece, while statistics are re-estimated.

    Each call's statistics are recorded as they are and summed (in float64) once, at the end: a call then costs a
    list append instead of a few small tensor operations.
    """

    def __init__(self, n_basis: int, num_features: int, device: torch.device) -> None:
        self.n_basis, self.num_features, self.device = n_basis, num_features, device
        self.records: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []

    def add(self, index: int, share: float, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Record a batch mean and variance reaching piece ``index`` with node weight ``share``."""
        self.records.append((index, share, mean, var))

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, mean, var)`` summed per piece: shapes ``[K]``, ``[K, C]``, ``[K, C]``."""
        weight = torch.zeros(self.n_basis, dtype=torch.float64, device=self.device)
        mean = torch.zeros(self.n_basis, self.num_features, dtype=torch.float64, device=self.device)
        var = torch.zeros_like(mean)
        if self.records:
            index = torch.tensor([r[0] for r in self.records], device=self.device)
            shares = torch.tensor([r[1] for r in self.records], dtype=torch.float64, device=self.device)
            weight.index_add_(0, index, shares)
            mean.index_add_(0, index, shares[:, None] * torch.stack([r[2] for r in self.records]).double())
            var.index_add_(0, index, shares[:, None] * torch.stack([r[3] for r in self.records]).double())
        return weight, mean, var


class TimeBatchNorm2d(TimeDependent):
    """Batch normalisation whose affine map and running statistics are functions of depth-time.

    Piece ``k`` is an ordinary ``nn.BatchNorm2d`` (``self.pieces[k]``): with a piecewise-constant basis every
    call is exactly that BatchNorm, so ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts the pieces (statistics
    kept) and ``torch.optim.swa_utils.update_bn`` re-estimates them. Where ``theta(t)`` mixes pieces (linear
    basis), the affine maps and (in evaluation) the running statistics are mixed with the node weights, and
    training updates each piece's statistics with its momentum scaled by its node weight; there the batch
    statistics are those of the process (not synchronised).

    Mixing running statistics needs node weights that form a partition of unity (a convex combination of variances
    is a variance, and a batch's statistics are shared out by the weights): a basis that is not one (``"legendre"``,
    whose weights take both signs) is refused by :meth:`check_basis`, which the ODE stage calls when it is built.

    Args:
        num_features: channels.
        n_basis: number of pieces ``K``.
        momentum: running-statistics momentum (PyTorch convention: weight of the new batch).
        eps: added to the variance.

    Example:
        >>> import torch
        >>> norm = TimeBatchNorm2d(4, n_basis=2)
        >>> norm(torch.randn(8, 4, 3, 3), ((0, 1.0),)).shape
        torch.Size([8, 4, 3, 3])
        >>> type(norm.pieces[1]).__name__
        'BatchNorm2d'
    """

    def __init__(self, num_features: int, *, n_basis: int, momentum: float | None = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.pieces = nn.ModuleList(nn.BatchNorm2d(num_features, eps=eps, momentum=momentum) for _ in range(n_basis))
        self._sums: _StatisticsSums | None = None

    @property
    def n_basis(self) -> int:
        return len(self.pieces)

    def norms(self) -> list[_BatchNorm]:
        """The pieces, each a BatchNorm (``nn.BatchNorm2d``, or ``nn.SyncBatchNorm`` after a conversion)."""
        return cast(list[_BatchNorm], list(self.pieces))

    def check_basis(self, basis: Basis) -> None:
        """Raise ``ValueError`` unless the node weights of ``basis`` form a partition of unity."""
        if not basis.partition_of_unity:
            raise ValueError(
                f"basis={basis.name!r} is not valid for TimeBatchNorm2d: its node weights are not a partition of unity "
                "(non-negative, summing to one), so running means and variances cannot be mixed with them; use a "
                "unit without BatchNorm (e.g. unit='mlp'), or a piecewise basis"
            )

    def pieces_by_name(self) -> dict[str, list[torch.Tensor]]:
        """The affine parameters and running statistics as lists of ``K`` pieces, by name."""
        return {name: [getattr(piece, name) for piece in self.norms()]
                for name in ("weight", "bias", "running_mean", "running_var")}

    def forward(self, x: torch.Tensor, nodes: NodeWeights) -> torch.Tensor:
        """Normalise with the parameters at the given time."""
        if len(nodes) == 1 and self._sums is None:
            normalised: torch.Tensor = self.pieces[nodes[0][0]](x)
            return normalised
        pieces = cast(list[_BatchNorm], [self.pieces[index] for index, _ in nodes])
        shares = [share for _, share in nodes]
        nodes_here = tuple(enumerate(shares))
        weight = at_time([piece.weight for piece in pieces], nodes_here)
        bias = at_time([piece.bias for piece in pieces], nodes_here)
        eps = pieces[0].eps
        if not self.training:
            mean = at_time([_running(piece)[0] for piece in pieces], nodes_here)
            var = at_time([_running(piece)[1] for piece in pieces], nodes_here)
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        if self._sums is not None and x.dtype in (torch.float32, torch.float64):
            return self._normalise_and_record(x, self._sums, nodes, weight, bias, eps)
        with torch.no_grad():
            batch_var, batch_mean = torch.var_mean(x.detach().to(torch.float64), dim=(0, 2, 3), correction=1)
            if self._sums is not None:
                for index, share in nodes:
                    self._sums.add(index, share, batch_mean, batch_var)
            else:
                for piece, share in zip(pieces, shares):
                    _update_running_statistics(piece, batch_mean, batch_var, share)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)

    @staticmethod
    def _normalise_and_record(x: torch.Tensor, sums: _StatisticsSums, nodes: NodeWeights, weight: torch.Tensor,
                              bias: torch.Tensor, eps: float) -> torch.Tensor:
        """While statistics are re-estimated: normalise with the batch statistics and add them to the sums of the
        pieces read. ``batch_norm`` computes them once and hands them over in fresh buffers (momentum 1: the batch
        mean and unbiased variance), which costs far less than a separate ``var_mean``."""
        batch_mean = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        batch_var = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        output = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
        for index, share in nodes:
            sums.add(index, share, batch_mean, batch_var)
        return output

    @contextmanager
    def estimating_statistics(self) -> Iterator[None]:
        """Re-estimate the running statistics from the training-mode calls made inside the block.

        Every call adds its batch mean and (unbiased) variance to each piece it reads, weighted by the node
        weight; on a normal exit each piece that was read gets the weighted average of what reached it (the
        others keep theirs). Used by :func:`lightning_cnet.recalibrate_bn`.
        """
        sums = self._sums = _StatisticsSums(self.n_basis, self.num_features, _running(self.norms()[0])[0].device)
        try:
            yield
            with torch.no_grad():
                weight, mean, var = sums.totals()
                for index, piece in enumerate(self.norms()):
                    if weight[index] > 0:
                        running_mean, running_var, _ = _running(piece)
                        running_mean.copy_(mean[index] / weight[index])
                        running_var.copy_(var[index] / weight[index])
        finally:
            self._sums = None

    def resample(self, matrix: torch.Tensor) -> ParameterChange:
        """Build ``K_new`` BatchNorms (of the pieces' class) whose affine maps and statistics are ``matrix @ pieces``;
        a mapped variance is clamped to stay positive."""
        old_pieces = self.norms()
        old = tuple(self.parameters())
        template = old_pieces[0]
        values = {
            name: resample_pieces([getattr(piece, name) for piece in old_pieces], matrix)
            for name in ("weight", "bias", "running_mean", "running_var")
        }
        sources: dict[nn.Parameter, tuple[tuple[nn.Parameter, float], ...]] = {}
        new_pieces = []
        for row in range(matrix.shape[0]):
            piece = _empty_like(template)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(piece, name).copy_(values[name][row])
                _running(piece)[1].clamp_(min=piece.eps)
                counts = [_running(old_pieces[col])[2] for col in range(matrix.shape[1]) if matrix[row, col]]
                _running(piece)[2].copy_(max(counts))
            for name in ("weight", "bias"):
                getattr(piece, name).requires_grad_(getattr(template, name).requires_grad)
                sources[getattr(piece, name)] = _sources(matrix, [getattr(p, name) for p in old_pieces], row)
            new_pieces.append(piece)
        self.pieces = nn.ModuleList(new_pieces)
        return ParameterChange(old, tuple(self.parameters()), sources)


def _running(norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm piece's running mean, running variance and batch count (every piece of a
    :class:`TimeBatchNorm2d` tracks running statistics, so none of them is ``None``)."""
    return (cast(torch.Tensor, norm.running_mean), cast(torch.Tensor, norm.running_var),
            cast(torch.Tensor, norm.num_batches_tracked))


def _update_running_statistics(
    norm: nn.modules.batchnorm._BatchNorm, batch_mean: torch.Tensor, batch_var: torch.Tensor, share: float
) -> None:
    """Move a BatchNorm's running statistics towards a batch's by its momentum times ``share``.

    With ``momentum=None`` (a cumulative average, as ``torch.optim.swa_utils.update_bn`` sets) each call counts as
    one batch. Updated through ``.data``, so that, like the in-kernel update of a plain BatchNorm call, it does not
    bump the version of buffers an earlier call saved for backward.
    """
    running_mean, running_var, count = _running(norm)
    if norm.momentum is None:
        count.data.add_(1)
        factor = share / float(count)
    else:
        factor = norm.momentum * share
    running_mean.data.lerp_(batch_mean.to(running_mean.dtype), factor)
    running_var.data.lerp_(batch_var.to(running_var.dtype), factor)


def _empty_like(norm: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    """A new BatchNorm of the same class, options, device, dtype and mode (a SyncBatchNorm keeps its group)."""
    options: dict[str, Any] = {"eps": norm.eps, "momentum": norm.momentum, "affine": norm.affine,
                               "track_running_stats": norm.track_running_stats}
    if isinstance(norm, nn.SyncBatchNorm):
        options["process_group"] = norm.process_group
    piece = type(norm)(norm.num_features, **options)
    running_mean = _running(norm)[0]
    piece.to(device=running_mean.device, dtype=running_mean.dtype)
    return piece.train(norm.training)
