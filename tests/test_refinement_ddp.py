"""DepthRefinementCallback under DDP: two CPU ranks (gloo) started with ``ddp_spawn``, and ``lightning.pytorch``."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from refinement_support import ConsistencyCallback, TinyDigits, make_task, n_steps, trainer_options
from torch.nn.parallel import DistributedDataParallel

from lightning_cnet.callbacks import DepthRefinementCallback


class RankAgreement(pl.Callback):
    """In each rank: DDP registers exactly the model's tensors, and all ranks hold identical parameters
    and identical gradients (checked after the refinement and at the end of every epoch)."""

    def _assert_same_on_all_ranks(self, tensors: list[torch.Tensor], what: str) -> None:
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        for other in gathered[1:]:
            assert torch.equal(gathered[0], other), f"{what} differ across ranks"

    def on_train_epoch_start(self, trainer, pl_module):
        wrapper = trainer.strategy.model
        assert isinstance(wrapper, DistributedDataParallel) and wrapper.module is pl_module
        assert [id(p) for p in wrapper.parameters()] == [id(p) for p in pl_module.parameters()]
        self._assert_same_on_all_ranks(list(pl_module.parameters()), "parameters after refinement")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._assert_same_on_all_ranks([p.grad for p in pl_module.parameters()], "gradients")

    def on_train_epoch_end(self, trainer, pl_module):
        self._assert_same_on_all_ranks(list(pl_module.parameters()), "parameters")


class RankSeed(DepthRefinementCallback):
    """Noise seeded differently on each rank: DDP's broadcast must make the ranks agree anyway."""

    def _generator(self, level):
        return torch.Generator().manual_seed(1000 * level + dist.get_rank())


@pytest.mark.slow
def test_ddp_spawn_ranks_agree_after_refinement():
    task = make_task()
    callback = RankSeed([1], noise_std=0.1, eval_batches=1)
    trainer = pl.Trainer(**trainer_options(
        strategy="ddp_spawn", devices=2, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
        callbacks=[callback, ConsistencyCallback(), RankAgreement()],
    ))
    trainer.fit(task, datamodule=TinyDigits())
    assert n_steps(task) == [2, 2, 2]  # rank 0's refined weights were handed back to this process


def test_lightning_namespace_trains_through_refinement():
    L = pytest.importorskip("lightning.pytorch")
    from refinement_support import OptimizerConsistency

    from lightning_cnet.lightning import ContinuousNetClassifier
    from lightning_cnet.lightning import DepthRefinementCallback as LightningCallback

    class Consistency(OptimizerConsistency, L.Callback):
        pass

    dm = TinyDigits()
    for callback in (LightningCallback([1, 2], noise_std=0.1), DepthRefinementCallback([1, 2])):
        task = make_task(ContinuousNetClassifier)
        assert isinstance(task, L.LightningModule) and not isinstance(task, pl.LightningModule)
        consistency = Consistency()
        trainer = L.Trainer(**trainer_options(max_epochs=3, limit_train_batches=3,
                                              callbacks=[callback, consistency]))
        trainer.fit(task, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
        assert n_steps(task) == [4, 4, 4] and consistency.checks >= 9
        assert [entry["epoch"] for entry in callback.history] == [1, 2]
        assert 0.0 <= callback.history[0]["val_acc_after"] <= 1.0
