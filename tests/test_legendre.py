"""The Legendre basis against numpy's Legendre series and an independent quadrature, in a stage, through refinement
and compression, and trained with the refinement callback."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from numpy.polynomial import legendre as numpy_legendre
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnet import ODEBlock, recalibrate_bn
from lightning_cnet.bases import get_basis
from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.units import PreActBasicUnit

LEGENDRE = get_basis("legendre")


def theta(coeffs: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``sum_k c_k P_k(2t - 1)`` by numpy, for coefficients ``[K, D]``: ``[len(t), D]``."""
    return np.stack([numpy_legendre.legval(2 * t - 1, coeffs[:, d]) for d in range(coeffs.shape[1])], axis=1)


def test_node_weights_are_the_shifted_legendre_polynomials() -> None:
    for t in [0.0, 0.125, 1 / 3, 0.5, 0.9, 1.0]:
        weights = dict(LEGENDRE.node_weights(6, Fraction(t)))
        expected = [numpy_legendre.legval(2 * t - 1, np.eye(6)[k]) for k in range(6)]
        assert [weights.get(k, 0.0) for k in range(6)] == pytest.approx(expected, abs=1e-14)
    assert LEGENDRE.node_weights(3, Fraction(1, 2)) == ((0, 1.0), (2, -0.5))  # P_1(0) = 0 is left out


def test_the_contract_it_declares() -> None:
    assert not LEGENDRE.partition_of_unity
    assert [LEGENDRE.degree(k) for k in (1, 4)] == [0, 3]
    assert LEGENDRE.breakpoints(5) == [0, 1] and LEGENDRE.coefficient_spans(2) == [(0, 1), (0, 1)]
    assert LEGENDRE.refined_size(3) == 6


@pytest.mark.parametrize("n_basis", [1, 3, 8])
def test_the_mass_matrix_is_exact(n_basis: int) -> None:
    """``integral_0^1 P_i(2t-1) P_j(2t-1) dt = delta_ij / (2i + 1)``: degree 2K - 2, beyond Simpson's rule."""
    expected = torch.diag(1.0 / (2 * torch.arange(n_basis, dtype=torch.float64) + 1))
    torch.testing.assert_close(LEGENDRE.mass_matrix(n_basis), expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize(("n_from", "n_to"), [(8, 3), (5, 1), (4, 4), (6, 5)])
def test_projection_is_exact_against_an_independent_quadrature(n_from: int, n_to: int) -> None:
    """The L2 projection's coefficients ``(2j + 1) integral theta P_j``, by numpy's 40-point Gauss-Legendre rule on
    theta evaluated by numpy: truncation."""
    coeffs = np.random.default_rng(0).normal(size=(n_from, 3))
    nodes, weights = numpy_legendre.leggauss(40)
    t, w = (nodes + 1) / 2, weights / 2
    values = theta(coeffs, t)
    expected = np.stack([(2 * j + 1) * (w * numpy_legendre.legval(2 * t - 1, np.eye(n_from)[j])) @ values
                         for j in range(n_to)])
    projected = LEGENDRE.apply(LEGENDRE.projection_matrix(n_from, n_to), torch.from_numpy(coeffs))
    torch.testing.assert_close(projected, torch.from_numpy(expected), atol=1e-13, rtol=0)
    torch.testing.assert_close(projected, torch.from_numpy(coeffs[:n_to]), atol=1e-13, rtol=0)


def test_refinement_raises_the_degree_and_keeps_theta() -> None:
    coeffs = torch.randn(3, 2, dtype=torch.float64)
    refined = LEGENDRE.apply(LEGENDRE.refinement_matrix(3), coeffs)
    assert refined.shape == (6, 2) and torch.equal(refined[3:], torch.zeros(3, 2, dtype=torch.float64))
    for t in [0.0, 0.3, 0.75, 1.0]:
        torch.testing.assert_close(LEGENDRE.evaluate(refined, t), LEGENDRE.evaluate(coeffs, t), atol=1e-14, rtol=0)
        torch.testing.assert_close(LEGENDRE.evaluate(coeffs, t), torch.from_numpy(theta(coeffs.numpy(),
                                                                                         np.array([t]))[0]))


# ---------------------------------------------------------------------- in a stage
def _stage(n_basis: int = 1, **options) -> ODEBlock:
    return ODEBlock(3, unit="mlp", unit_kwargs={"hidden": 8}, basis="legendre", n_basis=n_basis,
                    **{"n_steps": 4, "T": 1.0, "skip_init": False, **options})


def test_batchnorm_refuses_the_basis_in_one_line() -> None:
    with pytest.raises(ValueError) as error:
        ODEBlock(4, basis="legendre", n_basis=2)
    assert str(error.value).startswith("basis='legendre' is not valid for TimeBatchNorm2d: its node weights are not "
                                       "a partition of unity") and "\n" not in str(error.value)


def test_recalibration_refuses_a_stage_given_batchnorm_after_it_was_built() -> None:
    stage = ODEBlock(4, unit="mlp", basis="legendre", n_basis=2, skip_init=False)
    stage.unit = PreActBasicUnit(4, n_basis=2)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), stage)
    before = [piece.running_var.clone() for piece in stage.unit.norm1.pieces]
    with pytest.raises(ValueError, match="basis='legendre' is not valid for TimeBatchNorm2d"):
        recalibrate_bn(model, [torch.randn(2, 1, 5, 5)])
    assert all(torch.equal(a, b.running_var) for a, b in zip(before, stage.unit.norm1.pieces))


def test_every_coefficient_learns_and_refinement_keeps_the_function() -> None:
    stage = _stage(n_basis=2).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    stage(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())
    before = stage(x).detach()
    change = stage.refine(step_factor=1)
    assert (change.before.n_basis, change.after.n_basis, change.after.n_steps) == (2, 4, 4)
    torch.testing.assert_close(stage(x), before, atol=1e-14, rtol=0)
    stage.compress(n_basis=2)
    torch.testing.assert_close(stage(x), before, atol=1e-14, rtol=0)


def test_a_refined_checkpoint_loads_into_a_fresh_coarse_stage() -> None:
    trained = _stage()
    trained.refine()
    trained.refine(step_factor=1)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    fresh = _stage()
    fresh.load_state_dict(trained.state_dict())
    assert fresh.resolution == trained.resolution and (fresh.n_basis, fresh.n_steps) == (4, 8)
    x = torch.randn(4, 3)
    torch.testing.assert_close(fresh(x), trained(x))


# ---------------------------------------------------------------------- trained with the refinement callback
class Regression(pl.LightningModule):
    """Learn ``y = sin(3 x) x`` on 3 features with one Legendre stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = _stage(n_basis=1)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.02)


def test_training_refines_the_degree_through_the_callback() -> None:
    x = torch.randn(256, 3)
    data = DataLoader(TensorDataset(x, torch.sin(3 * x) * x), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(0))
    task = Regression()
    callback = DepthRefinementCallback([2, 4], step_factor=1, evaluate=False, verbose=False)
    trainer = pl.Trainer(max_epochs=6, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, train_dataloaders=data)
    assert [(r.n_basis, r.n_steps, r.basis) for r in task.stage.stage_resolutions] == [(4, 4, "legendre")]
    assert callback.level == 2 and callback.state_dict()["level"] == 2
    assert [entry["epoch"] for entry in callback.history] == [2, 4]
    per_epoch = [sum(task.losses[i:i + 4]) / 4 for i in range(0, len(task.losses), 4)]
    assert per_epoch[-1] < 0.5 * per_epoch[0]
