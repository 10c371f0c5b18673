"""Shared test fixtures: a fixed seed per test, a small thread pool, an isolated scheme registry, and a
hand-written ResNet stage to compare ODE blocks with."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnet import integrators
from lightning_cnet.layers import TimeBatchNorm2d, TimeDependent
from lightning_cnet.ode_block import ODEBlock

torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation on a busy machine

BUILTIN_SCHEMES = ("euler", "midpoint", "heun", "rk3", "rk4", "rk4_38")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def isolated_schemes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A scheme registry holding only the built-in schemes; whatever a test registers is dropped after it."""
    registry = {name: integrators.get_scheme(name) for name in BUILTIN_SCHEMES}
    monkeypatch.setattr(integrators.SCHEMES, "_entries", registry)
    yield registry


class PreActivationBasicBlock(nn.Module):
    """A hand-written ResNet basic block, ``x + gate * conv(relu(bn(conv(relu(bn(x))))))``."""

    def __init__(self, channels: int, *, bias: bool, gated: bool, momentum: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, momentum=momentum)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(channels, momentum=momentum)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.gate = nn.Parameter(torch.ones(())) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return x + (y if self.gate is None else self.gate * y)


def _copy_norm(ours: nn.BatchNorm2d, theirs: nn.BatchNorm2d) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(theirs, name).copy_(getattr(ours, name))


def _copy_conv(ours: Any, k: int, theirs: nn.Conv2d) -> None:
    theirs.weight.copy_(ours.weight[k])
    if ours.bias is not None:
        theirs.bias.copy_(ours.bias[k])


def _resnet_stage_like(block: ODEBlock) -> nn.Sequential:
    """A stage of ``K`` hand-written basic blocks holding piece ``k`` of the ODE block's weights."""
    unit = block.unit
    channels = unit.norm1.num_features
    has_bias = unit.conv1.bias is not None
    stage = nn.Sequential(
        *(
            PreActivationBasicBlock(
                channels, bias=has_bias, gated=block.gate is not None, momentum=unit.norm1.pieces[0].momentum
            )
            for _ in range(block.n_basis)
        )
    ).to(unit.conv1.weight[0].dtype)
    with torch.no_grad():
        for k, reference in enumerate(stage):
            _copy_norm(unit.norm1.pieces[k], reference.bn1)
            _copy_norm(unit.norm2.pieces[k], reference.bn2)
            _copy_conv(unit.conv1, k, reference.conv1)
            _copy_conv(unit.conv2, k, reference.conv2)
            if block.gate is not None:
                reference.gate.copy_(block.gate.gate[k])
    return stage


@pytest.fixture
def resnet_stage_like() -> Callable[[ODEBlock], nn.Sequential]:
    """Build a hand-written ResNet stage with an Euler/piecewise-constant ODE block's per-piece weights."""
    return _resnet_stage_like


def _randomize_(module: nn.Module) -> nn.Module:
    """Give every BatchNorm-like affine, running statistic, bias and gate of ``module`` random values, so
    that no parameter sits at an initial value that hides a mistake (zero gate, unit variance, ...)."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            parts = name.split(".")
            leaf = parts[-2] if parts[-1].isdigit() else parts[-1]  # pieces of a time-dependent tensor: "<name>.<k>"
            if leaf == "running_var":
                tensor.uniform_(0.5, 2.0)
            elif leaf in ("running_mean", "bias"):
                tensor.normal_(0.0, 0.2)
            elif leaf == "gate":
                tensor.uniform_(0.5, 1.0)
            elif leaf == "weight" and tensor.dim() <= 1:  # BatchNorm scales [C]
                tensor.uniform_(0.5, 1.5)
    return module


def stacked_time_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every time-dependent tensor of ``module``, its pieces stacked on dim 0 (``[K, ...]``), as copies by name.

    Reads the storage directly (piece lists, one BatchNorm per piece), so tests can compare the stacked
    coefficients with hand-computed maps.
    """
    stacked = {}
    for name, layer in module.named_modules():
        if isinstance(layer, TimeBatchNorm2d):
            for field in ("weight", "bias", "running_mean", "running_var"):
                stacked[f"{name}.{field}"] = torch.stack([getattr(p, field).detach() for p in layer.pieces]).clone()
        elif isinstance(layer, TimeDependent):
            for field in layer.time_parameters:
                pieces = getattr(layer, field)
                if pieces is not None:
                    stacked[f"{name}.{field}"] = torch.stack([p.detach() for p in pieces]).clone()
    return stacked


@pytest.fixture
def randomize() -> Callable[[nn.Module], nn.Module]:
    """Randomise BatchNorm affines and statistics, biases and gates of a module in place."""
    return _randomize_
