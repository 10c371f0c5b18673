"""NonFiniteGuard: stop with one message, never checkpoint a non-finite state, roll back exactly (through a
refinement too), in both Lightning namespaces; and the pieces it is built from."""

from __future__ import annotations

import doctest
import importlib.util
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from refinement_support import BATCH, TRAIN, TinyDigits, make_task, n_steps, trainer_options
from torch import nn

from lightning_cnet.callbacks import (
    DepthRefinementCallback,
    NonFiniteError,
    NonFiniteGuard,
    finite,
    nonfinite_guard,
    snapshot,
)
from lightning_cnet.callbacks.nonfinite_guard import (
    TrainingStateSnapshot,
    all_finite,
    describe_last_refinement,
    describe_resolution,
    nonfinite_names,
    scale_learning_rates,
)
from lightning_cnet.module import ContinuousNetClassifier

BATCHES_PER_EPOCH = TRAIN // BATCH  # 6
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- helpers
def training_state(pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Independent copies of every parameter, buffer and optimizer state tensor, by name, and the learning rates."""
    names = {id(p): name for name, p in pl_module.named_parameters()}
    named = [*pl_module.named_parameters(), *pl_module.named_buffers()]
    return {
        "tensors": {name: tensor.detach().clone() for name, tensor in named},
        "optimizer": {(names[id(p)], key): v.detach().clone() if isinstance(v, torch.Tensor) else v
                      for p, state in optimizer.state.items() for key, v in state.items()},
        "lr": [group["lr"] for group in optimizer.param_groups],
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["tensors"].keys() == b["tensors"].keys() and a["optimizer"].keys() == b["optimizer"].keys()
    for name, tensor in a["tensors"].items():
        assert torch.equal(tensor, b["tensors"][name]), name
    for key, value in a["optimizer"].items():
        other = b["optimizer"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def first_conv_weight(pl_module: nn.Module) -> torch.Tensor:
    """Piece 0 of the first stage's first kernel."""
    return pl_module.model.stages[0].unit.conv1.weight[0]


def nan_weight(pl_module: nn.Module, batch: Any) -> None:
    with torch.no_grad():
        first_conv_weight(pl_module).view(-1)[0] = float("nan")


def nan_images(pl_module: nn.Module, batch: Any) -> None:
    batch[0].fill_(float("nan"))


class Corrupt(pl.Callback):
    """At the start of the batches of the given global steps: record the training state, then corrupt it."""

    def __init__(self, steps: set[int], corrupt: Any = nan_weight) -> None:
        self.steps, self.corrupt = steps, corrupt
        self.before: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.before[trainer.global_step] = training_state(pl_module, trainer.optimizers[0])
            self.corrupt(pl_module, batch)


class RecordAfter(pl.Callback):
    """Placed after the guard: the training state at the end of every batch, by the step the batch started at."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, Any]] = {}
        self.epoch_lr: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[len(self.after)] = training_state(pl_module, trainer.optimizers[0])

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_lr[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]


def fit(task: Any, callbacks: list[pl.Callback], **options: Any) -> pl.Trainer:
    trainer = pl.Trainer(**trainer_options(callbacks=callbacks, **options))
    trainer.fit(task, datamodule=TinyDigits())
    return trainer


def checkpoint_files(directory: Path) -> dict[str, dict[str, Any]]:
    return {path.name: torch.load(path, weights_only=True) for path in sorted(directory.glob("*.ckpt"))}


def nonfinite_in(checkpoint: dict[str, Any]) -> list[str]:
    return [key for key, value in checkpoint["state_dict"].items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.isfinite().all()]


class LrJump(pl.Callback):
    """Set a huge learning rate from the given epoch on (training then diverges within a few steps)."""

    def __init__(self, epoch: int, lr: float = 1e4) -> None:
        self.epoch, self.lr = epoch, lr

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize("kwargs, message", [
    ({"on_nonfinite": "skip"}, "on_nonfinite='skip' is not known"),
    ({"max_rollbacks": 0}, "max_rollbacks=0 is not valid: expected an integer >= 1"),
    ({"max_rollbacks": 1.5}, "max_rollbacks=1.5"),
    ({"max_rollbacks": True}, "max_rollbacks=True"),
    ({"check_every_n_steps": 0}, "check_every_n_steps=0"),
    ({"check_every_n_steps": "2"}, "check_every_n_steps='2'"),
    ({"lr_factor": 0.0}, "lr_factor=0.0 must be a number in (0, 1]"),
    ({"lr_factor": 1.5}, "lr_factor=1.5"),
    ({"lr_factor": math.nan}, "lr_factor=nan"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError) as error:
        NonFiniteGuard(**kwargs)
    assert message in str(error.value)


def test_rollback_under_a_sharding_strategy_is_refused_at_setup():
    class FakeFSDPStrategy:  # named like Lightning's sharding strategy: only the class name is read
        pass

    FakeFSDPStrategy.__name__ = "FSDPStrategy"
    trainer = type("T", (), {"strategy": FakeFSDPStrategy(), "callbacks": []})()
    with pytest.raises(MisconfigurationException, match="does not support strategy FSDPStrategy"):
        NonFiniteGuard("rollback").setup(trainer, None, "fit")
    NonFiniteGuard("stop").setup(trainer, None, "fit")  # stopping works under any strategy


# ---------------------------------------------------------------------- stop
def test_nan_weight_mid_fit_stops_with_one_message_after_the_refinement():
    task = make_task()
    guard = NonFiniteGuard()
    step = BATCHES_PER_EPOCH + 2  # epoch 1, batch 2: after the refinement at epoch 1
    with pytest.raises(NonFiniteError) as error:
        fit(task, [DepthRefinementCallback([1], eval_batches=1), Corrupt({step}), guard])
    message = str(error.value)
    assert error.value.epoch == 1 and error.value.global_step == step + 1  # the step was taken, then checked
    assert message.startswith(f"NonFiniteGuard stopped training at epoch 1, global step {step + 1} "
                              "(after the optimizer step of batch 2 of the epoch): non-finite loss")
    assert message.count("n_steps=2 n_basis=2 euler") == 3  # the three stages at their refined resolution
    assert "last refinement at epoch 1 (n_steps 1-1-1 -> 2-2-2)" in message
    total = len(list(task.parameters()))  # the NaN weight spread to every parameter in the step
    assert f"parameters ({total} of {total} tensors: model.stem.weight, " in message
    assert "clip gradients (Trainer(gradient_clip_val=...)) or use NonFiniteGuard(on_nonfinite='rollback')" in message
    assert "loss" in error.value.found and "parameters" in error.value.found
    assert n_steps(task) == [2, 2, 2]


def test_nonfinite_state_before_any_refinement_says_so():
    with pytest.raises(NonFiniteError) as error:
        fit(make_task(), [DepthRefinementCallback([2], eval_batches=1), Corrupt({1}), NonFiniteGuard()])
    assert "epoch 0, global step 2" in str(error.value) and "no refinement yet" in str(error.value)
    assert "n_steps=1 n_basis=1 euler" in str(error.value)


class InfLossTask(ContinuousNetClassifier):
    """Adds +inf to the loss at one step: the gradients (of the finite part) and the update stay finite."""

    inf_at = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + float("inf") if self.trainer.global_step == self.inf_at else loss


def test_inf_loss_stops_although_gradients_and_parameters_are_finite():
    task = make_task(InfLossTask)
    with pytest.raises(NonFiniteError) as error:
        fit(task, [NonFiniteGuard()])
    assert error.value.found == ("loss",) and error.value.global_step == InfLossTask.inf_at + 1
    assert all(p.isfinite().all() for p in task.parameters())  # only the loss was non-finite


def test_loss_of_an_unchecked_batch_is_caught_at_the_next_check():
    task = make_task(InfLossTask)
    with pytest.raises(NonFiniteError) as error:
        fit(task, [NonFiniteGuard(check_every_n_steps=4)])
    # batches 1..4 end at global steps 1..4; the inf loss of the 4th batch (step 3 -> 4) is seen at the 4th check
    assert error.value.found == ("loss",) and error.value.global_step == 4
    task.inf_at = 1  # the 2nd batch: not a check batch; its loss is folded into the check after the 4th batch
    with pytest.raises(NonFiniteError) as error:
        fit(task, [NonFiniteGuard(check_every_n_steps=4)])
    assert error.value.found == ("loss",) and error.value.global_step == 4


# ---------------------------------------------------------------------- checkpoints
def test_inf_batchnorm_statistics_are_never_checkpointed(tmp_path):
    """A huge learning rate with gradient clipping fills BatchNorm running_var with inf while the loss and the
    parameters are still finite (the fault seen without the guard); the guard stops before any checkpoint."""
    def run(directory: Path, callbacks: list[pl.Callback]) -> None:
        checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_acc", mode="max", save_last=True)
        fit(make_task(lr=1e4), [*callbacks, checkpoint], max_epochs=2, gradient_clip_val=1.0,
            enable_checkpointing=True)

    run(tmp_path / "unguarded", [])
    unguarded = checkpoint_files(tmp_path / "unguarded")
    assert {"last.ckpt", "epoch=0-step=6.ckpt"} <= unguarded.keys()
    assert all(any("running_var" in key for key in nonfinite_in(ckpt)) for ckpt in unguarded.values())

    with pytest.raises(NonFiniteError) as error:
        run(tmp_path / "guarded", [NonFiniteGuard()])
    assert "buffers (" in str(error.value) and "running_var" in str(error.value)
    assert "clip gradients" not in str(error.value)  # already on: not suggested
    assert error.value.global_step < BATCHES_PER_EPOCH  # stopped in epoch 0, before its checkpoint
    assert checkpoint_files(tmp_path / "guarded") == {}


def test_divergence_after_a_good_epoch_keeps_only_finite_checkpoints(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_last=True)
    with pytest.raises(NonFiniteError) as error:
        fit(make_task(), [LrJump(1), NonFiniteGuard(), checkpoint], max_epochs=3, gradient_clip_val=1.0,
            enable_checkpointing=True)
    assert error.value.epoch == 1
    files = checkpoint_files(tmp_path)
    assert files.keys() == {"epoch=0-step=6.ckpt", "last.ckpt"}
    assert all(not nonfinite_in(ckpt) and ckpt["global_step"] == BATCHES_PER_EPOCH for ckpt in files.values())


def test_checkpoint_of_a_state_changed_after_the_last_check_is_refused(tmp_path):
    class InfVariance(pl.Callback):  # runs before the guard and ModelCheckpoint at the end of batch 3
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                pl_module.model.norm.running_var.fill_(float("inf"))

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    with pytest.raises(NonFiniteError) as error:
        fit(make_task(), [InfVariance(), NonFiniteGuard(check_every_n_steps=100), checkpoint],
            enable_checkpointing=True)
    assert error.value.found == ("checkpoint tensors",) and error.value.global_step == 3
    assert "state_dict.model.norm.running_var" in str(error.value) and "was therefore not written" in str(error.value)
    files = checkpoint_files(tmp_path)
    assert files and all(not nonfinite_in(ckpt) for ckpt in files.values())
    assert files["last.ckpt"]["global_step"] == 2


# ---------------------------------------------------------------------- rollback
def test_rollback_restores_the_state_before_the_nan_halves_the_lr_and_finishes():
    task = make_task(lr_schedule="cosine")
    step = 3
    corrupt, after, guard = Corrupt({step}), RecordAfter(), NonFiniteGuard("rollback", verbose=False)
    trainer = fit(task, [guard, corrupt, after])
    assert trainer.global_step == 3 * BATCHES_PER_EPOCH  # the run went on to the end
    assert [(r["epoch"], r["global_step"], r["restored_step"]) for r in guard.rollbacks] == [(0, step + 1, step)]
    restored, expected = after.after[step], corrupt.before[step]
    assert torch.isnan(first_conv_weight(task)).sum() == 0 and restored["lr"] == [0.025]
    expected["lr"] = [0.025]  # the only difference: the halved learning rate
    assert_same_state(restored, expected)
    # the cosine schedule (T_max = 3 epochs) continues from the halved rate: lr_e = 0.5 * 0.05 * (1 + cos(pi e / 3)) / 2
    assert after.epoch_lr[1] == pytest.approx(0.025 * (1 + math.cos(math.pi / 3)) / 2, rel=1e-12)
    assert after.epoch_lr[2] == pytest.approx(0.025 * (1 + math.cos(2 * math.pi / 3)) / 2, rel=1e-12)
    assert not torch.equal(first_conv_weight(task), restored["tensors"]["model.stages.0.unit.conv1.weight.0"])
    assert all(p.isfinite().all() for p in task.parameters())


def test_rollback_right_after_a_refinement_restores_the_refined_state():
    """The snapshot of the coarse model cannot be restored into the refined one: the guard must have taken a
    fresh snapshot of the refined state before the first step of epoch 1."""
    task = make_task()
    step = BATCHES_PER_EPOCH  # the first step after the refinement at epoch 1
    corrupt, after, guard = Corrupt({step}), RecordAfter(), NonFiniteGuard("rollback", verbose=False)
    # the guard snapshots at the start of the batch, before Corrupt records the state and writes the NaN
    fit(task, [DepthRefinementCallback([1], eval_batches=1), guard, corrupt, after], max_epochs=2)
    assert n_steps(task) == [2, 2, 2] and len(task.model.stages[0].unit.conv1.weight) == 2
    assert [r["restored_step"] for r in guard.rollbacks] == [step]
    expected = corrupt.before[step]
    expected["lr"] = [0.025]
    assert_same_state(after.after[step], expected)
    assert all(p.isfinite().all() for p in task.parameters())


def test_exhausted_rollbacks_stop_with_the_message():
    after = RecordAfter()
    guard = NonFiniteGuard("rollback", max_rollbacks=2, verbose=False)
    with pytest.raises(NonFiniteError) as error:  # every batch from step 2 on is NaN
        fit(make_task(), [Corrupt(set(range(2, 100)), nan_images), guard, after])
    assert [r["global_step"] for r in guard.rollbacks] == [3, 4] and error.value.global_step == 5
    assert [r["lr"] for r in guard.rollbacks] == [[0.025], [0.0125]]
    assert "after 2 rollbacks (max_rollbacks=2)" in str(error.value) and "non-finite loss" in str(error.value)
    assert "n_steps=1 n_basis=1 euler" in str(error.value)


def test_exhausted_rollbacks_leave_the_last_good_state_in_memory():
    """The run stops, but whoever catches the error holds a finite model: the state that last passed a check (the
    start of step 2, before the NaN batches), with the learning rate of the second rollback."""
    task = make_task()
    corrupt, guard = Corrupt(set(range(2, 100)), nan_images), NonFiniteGuard("rollback", max_rollbacks=2, verbose=False)
    trainer = pl.Trainer(**trainer_options(callbacks=[corrupt, guard]))
    with pytest.raises(NonFiniteError) as error:
        trainer.fit(task, datamodule=TinyDigits())
    assert "the model and optimizer hold the state of global step 2 again" in str(error.value)
    expected = corrupt.before[2]
    assert_same_state(training_state(task, trainer.optimizers[0]), expected)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0125  # halved twice, not a third time
    assert all(p.isfinite().all() and p.grad is None for p in task.parameters())


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_rollbacks_are_counted_across_a_resume(tmp_path):
    guard = NonFiniteGuard("rollback", max_rollbacks=2, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    fit(make_task(), [Corrupt({2}), guard, checkpoint], max_epochs=1, enable_checkpointing=True)
    assert len(guard.rollbacks) == 1
    resumed = NonFiniteGuard("rollback", max_rollbacks=2, verbose=False)
    with pytest.raises(NonFiniteError) as error:
        trainer = pl.Trainer(**trainer_options(max_epochs=2, enable_checkpointing=True, callbacks=[
            Corrupt({7, 8}), resumed, ModelCheckpoint(dirpath=tmp_path / "resumed", save_top_k=-1)]))
        trainer.fit(make_task(), datamodule=TinyDigits(), ckpt_path=tmp_path / "epoch=0-step=6.ckpt")
    assert [r["global_step"] for r in resumed.rollbacks] == [3, 8] and error.value.global_step == 9
    assert resumed.rollbacks[1]["lr"] == [0.0125]  # the halved rate of the first run was resumed, then halved


# ---------------------------------------------------------------------- DDP
class RankOneInfLoss(ContinuousNetClassifier):
    """An infinite loss on rank 1 only, at global step 2: the (all-reduced) gradients stay finite, so only rank 1
    can see that anything is wrong."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + float("inf") if self.trainer.global_step == 2 and self.global_rank == 1 else loss


class RanksAgree(pl.Callback):
    """At the end of training: every rank rolled back once and holds the same parameters."""

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist

        guard = next(callback for callback in trainer.callbacks if isinstance(callback, NonFiniteGuard))
        assert [r["global_step"] for r in guard.rollbacks] == [3]
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], other) for other in gathered[1:]), "the ranks diverged"


@pytest.mark.slow
def test_ddp_ranks_roll_back_together_when_only_one_rank_sees_an_inf_loss():
    """The decision is all-reduced: rank 0 saw nothing wrong and must roll back too, or the ranks diverge."""
    trainer = pl.Trainer(**trainer_options(
        strategy="ddp_spawn", devices=2, max_epochs=1, limit_train_batches=4, limit_val_batches=1,
        callbacks=[NonFiniteGuard("rollback", verbose=False), RanksAgree()],
    ))
    trainer.fit(make_task(RankOneInfLoss), datamodule=TinyDigits())  # RanksAgree asserts in both ranks
    assert trainer.state.status == "finished"  # an assertion failing in a rank would have ended the fit


# ---------------------------------------------------------------------- lightning.pytorch
def test_lightning_namespace_stops_and_rolls_back():
    L = pytest.importorskip("lightning.pytorch")
    from lightning_cnet.lightning import ContinuousNetClassifier as LightningClassifier
    from lightning_cnet.lightning import NonFiniteError as LightningNonFiniteError
    from lightning_cnet.lightning import NonFiniteGuard as LightningGuard

    class Inject(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                nan_weight(pl_module, batch)

    assert LightningNonFiniteError is NonFiniteError and issubclass(LightningGuard, L.Callback)
    dm = TinyDigits()
    for mode in ("stop", "rollback"):
        task = make_task(LightningClassifier)
        trainer = L.Trainer(**trainer_options(max_epochs=1, callbacks=[Inject(), LightningGuard(mode, verbose=False)]))
        if mode == "stop":
            with pytest.raises(NonFiniteError, match="epoch 0, global step 3"):
                trainer.fit(task, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
        else:
            trainer.fit(task, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
            assert trainer.global_step == BATCHES_PER_EPOCH and all(p.isfinite().all() for p in task.parameters())


# ---------------------------------------------------------------------- the pieces
def test_all_finite_is_exact_on_true_and_confirmed_by_names():
    finite, nan, inf = torch.ones(5), torch.tensor([0.0, math.nan]), torch.tensor([-math.inf, 1.0])
    huge = torch.full((4,), 3e38)  # finite, but its 2-norm overflows
    assert bool(all_finite([finite, finite.double(), finite.bfloat16()], CPU))
    assert not bool(all_finite([finite, nan], CPU)) and not bool(all_finite([inf], CPU))
    assert bool(all_finite([], CPU))
    assert not bool(all_finite([huge], CPU)) and nonfinite_names([("huge", huge)]) == []
    assert nonfinite_names([("a", finite), ("b", nan), ("c", inf), ("d", huge)]) == ["b", "c"]
    assert bool(all_finite([torch.full((10_000,), 60_000.0, dtype=torch.float16)], CPU))  # norm above fp16's max


def test_snapshot_restores_in_place_and_follows_new_optimizer_state():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    adam = torch.optim.Adam(net.parameters(), lr=0.1)
    snapshot = TrainingStateSnapshot(net, [adam])  # before the first step: no optimizer state yet
    weight, running_var = net[0].weight, net[1].running_var
    expected = {name: t.clone() for name, t in net.state_dict().items()}
    net(torch.randn(8, 3)).square().sum().backward()
    adam.step()
    exp_avg = adam.state[weight]["exp_avg"]
    snapshot.restore()
    assert net[0].weight is weight and net[1].running_var is running_var  # same objects
    assert all(torch.equal(t, expected[name]) for name, t in net.state_dict().items())
    assert not adam.state  # the state created after the snapshot is gone, as in a fresh optimizer

    net(torch.randn(8, 3)).square().sum().backward()
    adam.step()
    kept = {name: t.clone() for name, t in net.state_dict().items()}
    kept_state = {key: v.clone() for key, v in adam.state[weight].items()}
    snapshot.refresh()
    exp_avg = adam.state[weight]["exp_avg"]
    net(torch.randn(8, 3)).square().sum().backward()
    adam.step()
    snapshot.restore()
    assert all(torch.equal(t, kept[name]) for name, t in net.state_dict().items())
    assert adam.state[weight]["exp_avg"] is exp_avg  # restored in place
    assert all(torch.equal(adam.state[weight][key], value) for key, value in kept_state.items())
    assert snapshot.matches(net, [adam])
    net[0].weight = nn.Parameter(torch.zeros(4, 3))  # a refinement replaces parameters by new objects
    assert not snapshot.matches(net, [adam])


def test_scale_learning_rates_sticks_with_a_multistep_schedule():
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.8)
    steps = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[2], gamma=0.1)
    sgd.step()
    steps.step()
    scale_learning_rates([sgd], [steps], 0.5)
    assert sgd.param_groups[0]["lr"] == 0.4 and sgd.param_groups[0]["initial_lr"] == 0.4
    assert steps.base_lrs == [0.4] and steps.get_last_lr() == [0.4]
    sgd.step()
    steps.step()  # epoch 2: the milestone multiplies the halved rate
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.04, rel=1e-12)


def test_describe_resolution_and_refinement_are_duck_typed():
    class Stage:
        def __init__(self, n: int) -> None:
            self.n_steps, self.n_basis, self.scheme = n, n, "rk4"

    class Net(nn.Module):
        resolution = (Stage(2), Stage(4))

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Net()

    assert describe_resolution(Outer()) == "backbone: [n_steps=2 n_basis=2 rk4, n_steps=4 n_basis=4 rk4]"
    assert describe_resolution(nn.Linear(1, 1)).startswith("unknown")
    refiner = type("Refiner", (), {"history": [{"epoch": 2}, {"epoch": 5, "n_steps_before": [[1, 1]],
                                                              "n_steps_after": [[2, 2]]}]})()
    assert describe_last_refinement([object(), refiner]) == "last refinement at epoch 5 (n_steps 1-1 -> 2-2)"
    assert describe_last_refinement([type("Fresh", (), {"history": []})()]) == "no refinement yet"
    assert describe_last_refinement([object()]) is None


@pytest.mark.parametrize("module", [nonfinite_guard, finite, snapshot], ids=lambda module: module.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_overhead_benchmark_smoke_mode_runs(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("guard_overhead", REPO / "benchmarks" / "guard_overhead.py")
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "guard_overhead", benchmark)  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)
    monkeypatch.setattr(sys, "argv", ["guard_overhead.py", "--smoke"])
    lightning_logger = logging.getLogger("pytorch_lightning")
    monkeypatch.setattr(lightning_logger, "level", lightning_logger.level)  # main() quietens Lightning
    benchmark.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("cnet_digits", "cnet_cifar"))]
    assert len(rows) == 2 and all(row.count("x [") == 3 and row.count("%") == 2 for row in rows)
