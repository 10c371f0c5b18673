"""The hand-written pre-activation ResNet that a ContinuousNet with Euler steps computes, module per block.

With Euler steps, a piecewise-constant basis and ``n_basis = n_steps = T = N``, ``cnet_cifar`` is exactly a
pre-activation ResNet with ``N`` basic blocks per stage: :func:`resnet_from` builds that ResNet from plain
``nn.Conv2d`` / ``nn.BatchNorm2d`` modules and loads it with the ContinuousNet's weights (the skip-init gate folded
into the second kernel of each block). It is the limit the ContinuousNet's Euler overhead is measured against.

Example:
    >>> from lightning_cnet.models import get_model
    >>> cnet = get_model("cnet_cifar", n_steps=2)
    >>> resnet = resnet_from(cnet)
    >>> images = torch.randn(2, 3, 32, 32)
    >>> check_same_output(cnet, resnet, images) < 1e-5
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_cnet.models import ContinuousNet
from lightning_cnet.ode_block import ODEBlock
from lightning_cnet.units import PreActBasicUnit


class PreActBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))``: a pre-activation basic block of constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return x + out


class PreActDownBlock(nn.Module):
    """A stride-2 pre-activation block with a strided 1x1 shortcut (the ContinuousNet's stitch)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.norm1(x)))
        out = self.conv2(self.relu(self.norm2(out)))
        return self.shortcut(x) + out


class PreActResNet(nn.Module):
    """stem -> [N blocks] -> down block -> [N blocks] -> down block -> [N blocks] -> BN-ReLU-pool-linear."""

    def __init__(self, widths: list[int], blocks_per_stage: int, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.stages = nn.ModuleList(
            nn.Sequential(*(PreActBlock(width) for _ in range(blocks_per_stage))) for width in widths
        )
        self.downs = nn.ModuleList(PreActDownBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norm = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            if index:
                x = self.downs[index - 1](x)
            x = stage(x)
        x = torch.relu(self.norm(x)).mean(dim=(2, 3))
        return self.fc(x)


def _check_resnet_like(stage: ODEBlock, n_blocks: int) -> None:
    r = stage.resolution
    if (r.scheme, r.basis, r.n_basis, r.n_steps, r.T) != ("euler", "piecewise_constant", n_blocks, n_blocks, n_blocks):
        raise ValueError(f"no equivalent ResNet for a stage at {r}: expected euler, piecewise_constant, K = N = T")
    if not isinstance(stage.unit, PreActBasicUnit) or stage.unit.conv1.bias is not None:
        raise ValueError("the reference ResNet has pre-activation basic blocks without convolution biases")


@torch.no_grad()
def blocks_from(stage: ODEBlock) -> nn.Sequential:
    """The ``N`` ResNet blocks that an Euler stage with ``K = N = T`` computes, holding its pieces."""
    n_blocks = stage.n_steps
    _check_resnet_like(stage, n_blocks)
    unit = stage.unit
    blocks = nn.Sequential(*(PreActBlock(unit.norm1.num_features) for _ in range(n_blocks)))
    for k, block in enumerate(blocks):
        for bn, time_bn in ((block.bn1, unit.norm1.pieces[k]), (block.bn2, unit.norm2.pieces[k])):
            bn.load_state_dict(time_bn.state_dict())
            bn.momentum, bn.eps = time_bn.momentum, time_bn.eps
        block.conv1.weight.copy_(unit.conv1.weight[k])
        gain = 1.0 if stage.gate is None else stage.gate.gate[k]
        block.conv2.weight.copy_(unit.conv2.weight[k] * gain)
    return blocks.to(unit.conv1.weight[0].device)


@torch.no_grad()
def resnet_from(cnet: ContinuousNet) -> PreActResNet:
    """The ResNet that computes what ``cnet`` (Euler, piecewise constant, ``K = N = T``) computes."""
    widths = [stage.unit.conv1.weight[0].shape[1] for stage in cnet.stages]
    resnet = PreActResNet(widths, 0, cnet.stem.in_channels, cnet.num_classes)
    resnet.stages = nn.ModuleList(blocks_from(stage) for stage in cnet.stages)
    resnet.stem.load_state_dict(cnet.stem.state_dict())
    for down, stitch in zip(resnet.downs, cnet.stitches):
        down.load_state_dict(stitch.state_dict())
    resnet.norm.load_state_dict(cnet.norm.state_dict())
    resnet.fc.load_state_dict(cnet.fc.state_dict())
    return resnet.to(cnet.stem.weight.device)


@torch.no_grad()
def ungated_copy(cnet: nn.Module) -> nn.Module:
    """A copy of ``cnet`` (a ContinuousNet or an ODEBlock) without skip-init gates that computes the same function:
    each gate piece folded into the last kernel piece of its unit (a preact_basic unit)."""
    copied = copy.deepcopy(cnet)
    stages = [copied] if isinstance(copied, ODEBlock) else list(copied.stages)
    for stage in stages:
        if stage.gate is not None:
            for kernel, gate in zip(stage.unit.conv2.weight, stage.gate.gate):
                kernel.mul_(gate)
            stage.gate = None
    return copied


@torch.no_grad()
def randomise_(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm affine map, running statistic and skip-init gate a random non-trivial value,
    so that the equality checks exercise all of them."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        parts = name.split(".")
        leaf = parts[-2] if parts[-1].isdigit() else parts[-1]  # a piece of a time-dependent tensor: "<name>.<k>"
        if leaf in ("gate", "running_var") or (leaf == "weight" and tensor.dim() <= 1 and "fc" not in name):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        elif leaf in ("bias", "running_mean") and "fc" not in name:
            tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))


def check_same_output(a: nn.Module, b: nn.Module, inputs: torch.Tensor, tolerance: float = 1e-5) -> float:
    """Largest absolute difference of two models' outputs in eval and in training mode (on copies, so that no
    running statistic moves); raise ``AssertionError`` if they are not close."""
    worst = 0.0
    with torch.no_grad():
        for training in (False, True):
            out_a = copy.deepcopy(a).train(training)(inputs)
            out_b = copy.deepcopy(b).train(training)(inputs)
            difference = (out_a.float() - out_b.float()).abs().max().item()
            if not torch.allclose(out_a.float(), out_b.float(), rtol=tolerance, atol=tolerance):
                raise AssertionError(
                    f"{type(a).__name__} and {type(b).__name__} differ (training={training}): max |diff| = "
                    f"{difference:.3g}"
                )
            worst = max(worst, difference)
    return worst
