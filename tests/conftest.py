"""Shared test fixtures: a fixed seed per test, a small thread pool, an isolated scheme registry, and a
hand-written ResNet stage to compare ODE blocks with."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnet import integrators
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
    monkeypatch.setattr(integrators, "_SCHEMES", registry)
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


def _resnet_stage_like(block: ODEBlock) -> nn.Sequential:
    """A stage of ``K`` hand-written basic blocks holding piece ``k`` of the ODE block's weights."""
    channels = block.norm1.weight.shape[1]
    has_bias = block.conv1.bias is not None
    stage = nn.Sequential(
        *(
            PreActivationBasicBlock(
                channels, bias=has_bias, gated=block.gate is not None, momentum=block.norm1.momentum
            )
            for _ in range(block.n_basis)
        )
    ).to(block.conv1.weight.dtype)
    with torch.no_grad():
        for k, reference in enumerate(stage):
            for ours, theirs in ((block.norm1, reference.bn1), (block.norm2, reference.bn2)):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(theirs, name).copy_(getattr(ours, name)[k])
            for ours, theirs in ((block.conv1, reference.conv1), (block.conv2, reference.conv2)):
                theirs.weight.copy_(ours.weight[k])
                if has_bias:
                    theirs.bias.copy_(ours.bias[k])
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
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                tensor.uniform_(0.5, 2.0)
            elif leaf in ("running_mean", "bias"):
                tensor.normal_(0.0, 0.2)
            elif leaf == "gate":
                tensor.uniform_(0.5, 1.0)
            elif leaf == "weight" and tensor.dim() <= 2:  # BatchNorm scales [K, C] or [C]
                tensor.uniform_(0.5, 1.5)
    return module


@pytest.fixture
def randomize() -> Callable[[nn.Module], nn.Module]:
    """Randomise BatchNorm affines and statistics, biases and gates of a module in place."""
    return _randomize_
