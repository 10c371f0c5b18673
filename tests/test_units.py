"""Residual units: hand-built ResNet stages, a unit defined only here, a linear vector field, the registries."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from refinement_support import TinyDigits, trainer_options
from torch import nn

from lightning_cnet import (
    ODEBlock,
    get_model,
    list_bases,
    list_models,
    list_schemes,
    list_units,
    register_basis,
    register_model,
    register_scheme,
    register_unit,
)
from lightning_cnet.bases import BASES, PiecewiseConstantBasis
from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.integrators import SCHEMES
from lightning_cnet.layers import TimeBatchNorm2d, TimeConv2d
from lightning_cnet.models import MODELS
from lightning_cnet.module import ContinuousNetClassifier
from lightning_cnet.units import UNITS, BottleneckUnit, ResidualUnit, build_unit


# ---------------------------------------------------------------------- Euler == a bottleneck ResNet stage
class PreActBottleneck(nn.Module):
    """A hand-written pre-activation bottleneck block:
    ``x + gate * conv(relu(bn(conv(relu(bn(conv(relu(bn(x))))))))``."""

    def __init__(self, channels: int, inner: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, inner, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(inner), nn.Conv2d(inner, inner, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(inner), nn.Conv2d(inner, channels, 1, bias=False)
        self.gate = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return x + self.gate * self.conv3(F.relu(self.bn3(y)))


def _bottleneck_stage_like(block: ODEBlock) -> nn.Sequential:
    unit = block.unit
    stage = nn.Sequential(*(PreActBottleneck(unit.norm1.num_features, unit.norm2.num_features)
                            for _ in range(block.n_basis))).double()
    with torch.no_grad():
        for k, reference in enumerate(stage):
            for ours, theirs in ((unit.norm1, reference.bn1), (unit.norm2, reference.bn2), (unit.norm3, reference.bn3)):
                theirs.load_state_dict(ours.pieces[k].state_dict())
            for ours, theirs in ((unit.conv1, reference.conv1), (unit.conv2, reference.conv2),
                                 (unit.conv3, reference.conv3)):
                theirs.weight.copy_(ours.weight[k])
            reference.gate.copy_(block.gate.gate[k])
    return stage


def test_euler_bottleneck_block_is_a_bottleneck_resnet_stage(randomize) -> None:
    n = 3
    block = randomize(ODEBlock(8, unit="bottleneck", unit_kwargs={"width_factor": 0.5}, n_basis=n, T=n)).double()
    assert isinstance(block.unit, BottleneckUnit) and block.unit.norm2.num_features == 4
    reference = _bottleneck_stage_like(block)
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    weights = torch.randn_like(x)
    ours, theirs = block(x), reference(x)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    for k, ref in enumerate(reference):
        for ours_conv, ref_conv in ((block.unit.conv1, ref.conv1), (block.unit.conv3, ref.conv3)):
            torch.testing.assert_close(ours_conv.weight[k].grad, ref_conv.weight.grad, atol=1e-10, rtol=0)
        torch.testing.assert_close(block.unit.norm3.pieces[k].running_var, ref.bn3.running_var, atol=1e-14, rtol=0)
        torch.testing.assert_close(block.gate.gate[k].grad, ref.gate.grad, atol=1e-10, rtol=0)
    block.eval(), reference.eval()
    torch.testing.assert_close(block(x), reference(x), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------- a unit defined only here
class DepthwiseSeparableUnit(ResidualUnit):
    """``BN -> ReLU -> depthwise 3x3 -> BN -> ReLU -> pointwise 1x1``, from the library's time-dependent layers."""

    def __init__(self, channels: int, *, n_basis: int) -> None:
        super().__init__()
        self.norm1 = TimeBatchNorm2d(channels, n_basis=n_basis)
        self.depthwise = TimeConv2d(channels, channels, n_basis=n_basis, groups=channels)
        self.norm2 = TimeBatchNorm2d(channels, n_basis=n_basis)
        self.pointwise = TimeConv2d(channels, channels, n_basis=n_basis, kernel_size=1)

    def residual(self, x, nodes):
        y = self.depthwise(torch.relu(self.norm1(x, nodes)), nodes)
        return self.pointwise(torch.relu(self.norm2(y, nodes)), nodes)


def test_a_user_unit_trains_through_refinements_compresses_and_round_trips(tmp_path) -> None:
    pl.seed_everything(0)
    task = ContinuousNetClassifier("cnet_digits", unit=DepthwiseSeparableUnit, scheme="midpoint", n_steps=1, T=4.0,
                                   lr=0.05, lr_schedule="constant")
    callback = DepthRefinementCallback([1, 2], noise_std=0.1, evaluate=False)
    trainer = pl.Trainer(**trainer_options(callbacks=[callback], max_epochs=3, limit_train_batches=3,
                                           limit_val_batches=0))
    trainer.fit(task, datamodule=TinyDigits())
    assert [r.n_basis for r in task.model.resolution] == [4, 4, 4]
    # every piece trained: the two pieces split from one at the last refinement moved apart
    depthwise = task.model.stages[0].unit.depthwise.weight
    assert not torch.equal(depthwise[0], depthwise[1])

    path = tmp_path / "refined.ckpt"
    trainer.save_checkpoint(path)
    fresh = ContinuousNetClassifier("cnet_digits", unit=DepthwiseSeparableUnit, scheme="euler", n_steps=1)
    # a unit given as a class is pickled into the hyperparameters, so this (trusted) file needs weights_only=False;
    # a registered unit name keeps checkpoints loadable with weights_only=True
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    x = torch.randn(5, 1, 8, 8)
    task.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), task(x), atol=0, rtol=0)
        assert fresh.model.resolution == task.model.resolution

        halved = task.model.stages[0].unit.depthwise.weight
        pairs = [(halved[2 * i] + halved[2 * i + 1]) / 2 for i in range(2)]
        fresh.model.compress(n_basis=2)
        for k in range(2):  # projection onto half the pieces averages neighbouring pairs
            torch.testing.assert_close(fresh.model.stages[0].unit.depthwise.weight[k], pairs[k], atol=1e-6, rtol=0)
        assert fresh(x).shape == (5, 10)


# ---------------------------------------------------------------------- a vector field of known solution
@pytest.mark.parametrize(("scheme", "order"), [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk3", 3), ("rk4", 4),
                                               ("rk4_38", 4)])
def test_mlp_unit_integrates_a_linear_field_to_the_tableau_order(scheme: str, order: int) -> None:
    """One linear layer, ``dx/dt = T A x``: the exact solution is ``expm(T A) x0``; the error must fall as h^order."""
    a = torch.tensor([[0.0, 1.0], [-4.0, -0.3]], dtype=torch.float64)
    x0 = torch.tensor([[1.0, 0.5], [-0.2, 1.0]], dtype=torch.float64)
    depth = 1.5
    exact = x0 @ torch.linalg.matrix_exp(depth * a).T
    block = ODEBlock(2, unit="mlp", unit_kwargs={"layers": 1, "bias": False}, n_basis=1, scheme=scheme, T=depth,
                     skip_init=False).double()
    with torch.no_grad():
        block.unit.linears[0].weight[0].copy_(a)
    steps = [8, 16, 32, 64]
    errors = []
    for n in steps:
        with torch.no_grad(), block.manifestation(n_steps=n):
            errors.append((block(x0) - exact).norm().item())
    slope = -(math.log(errors[-1]) - math.log(errors[0])) / (math.log(steps[-1]) - math.log(steps[0]))
    assert abs(slope - order) < 0.3, (scheme, errors)


def test_vector_model_of_ode_blocks_is_refined_by_the_callback() -> None:
    """A stack of ODE blocks with MLP units and no stem or stitches: the callback refines each block."""

    class VectorTask(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.field = nn.Sequential(ODEBlock(4, unit="mlp", n_steps=1, T=1.0), ODEBlock(4, unit="mlp", n_steps=1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.field(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 4))
    task = VectorTask()
    trainer = pl.Trainer(**trainer_options(callbacks=[DepthRefinementCallback([1], evaluate=False)], max_epochs=2))
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=8))
    assert [block.resolution.n_basis for block in task.field] == [2, 2]
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == len(list(task.parameters()))


# ---------------------------------------------------------------------- selection and registries
def test_units_are_selected_by_name_class_or_factory() -> None:
    assert list_units() == ["bottleneck", "mlp", "preact_basic"]
    by_name = get_model("cnet_digits", unit="bottleneck", n_steps=2)
    assert all(isinstance(stage.unit, BottleneckUnit) for stage in by_name.stages)
    by_factory = get_model("cnet_digits", unit=lambda width, *, n_basis: BottleneckUnit(width, n_basis=n_basis))
    assert by_factory(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"unit='nope' is not known: expected one of \['bottleneck', 'mlp', "):
        ODEBlock(4, unit="nope")
    with pytest.raises(ValueError, match="returned Linear, expected .* time-dependent|lightning_cnet.layers"):
        build_unit(lambda width, *, n_basis: nn.Linear(width, width), 4, 2)
    with pytest.raises(ValueError, match=r"n_basis=3; found piece counts \[1\]"):
        build_unit(lambda width, *, n_basis: BottleneckUnit(width, n_basis=1), 4, 3)


@pytest.mark.parametrize(("register", "listing", "existing"), [
    (lambda overwrite: register_unit("preact_basic", BottleneckUnit, overwrite=overwrite), list_units, "preact_basic"),
    (lambda overwrite: register_scheme("euler", a=[[0]], b=[1], overwrite=overwrite), list_schemes, "euler"),
    (lambda overwrite: register_basis(PiecewiseConstantBasis(), overwrite=overwrite), list_bases, "piecewise_constant"),
    (lambda overwrite: register_model(get_model.__globals__["cnet_digits"], overwrite=overwrite), list_models,
     "cnet_digits"),
])
def test_one_registry_pattern(monkeypatch, register, listing, existing) -> None:
    with pytest.raises(ValueError, match=f"'{existing}' is already registered; pass overwrite=True"):
        register(False)
    before = listing()
    for registry in (UNITS, SCHEMES, BASES, MODELS):  # the overwrite must not leak into other tests
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    register(True)
    assert listing() == before and existing in before
