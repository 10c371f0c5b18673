"""DepthRefinementCallback on one CPU process: schedule, optimizer surgery, precision, checkpoints, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from refinement_support import (
    ConsistencyCallback,
    TinyDigits,
    digits_tensors,
    make_task,
    n_steps,
    stack_pieces,
    trainer_options,
)
from torch import nn

from lightning_cnet.callbacks import DepthRefinementCallback, RefinementSchedule, replace_parameters
from lightning_cnet.layers import ParameterChange, TimeBatchNorm2d
from lightning_cnet.module import ContinuousNetClassifier


def fit(task, callbacks, **options):
    trainer = pl.Trainer(**trainer_options(callbacks=callbacks, **options))
    trainer.fit(task, datamodule=TinyDigits())
    return trainer


class StateSnapshot(pl.Callback):
    """Placed before the refinement callback: copies parameters and optimizer state by name."""

    def __init__(self) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.state: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        epoch = trainer.current_epoch
        self.params[epoch] = stack_pieces({name: p.detach().clone() for name, p in pl_module.named_parameters()})
        self.state[epoch] = stack_pieces({
            name: {k: v.clone() for k, v in optimizer.state.get(p, {}).items()}
            for name, p in pl_module.named_parameters()
        })


class EpochStartProbe(StateSnapshot):
    """Placed after the refinement callback: keeps the parameters, optimizer state and LR of each epoch start."""

    def __init__(self) -> None:
        super().__init__()
        self.lr: dict[int, float] = {}
        self.scheduler_epoch: dict[int, int] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        optimizer = trainer.optimizers[0]
        epoch = trainer.current_epoch
        self.lr[epoch] = optimizer.param_groups[0]["lr"]
        if trainer.lr_scheduler_configs:
            self.scheduler_epoch[epoch] = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def refined_names(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in before if after[name].shape[0] != before[name].shape[0]]


# ---------------------------------------------------------------------- schedule
@pytest.mark.parametrize("refine_at", [[-1], [1.5], [1.0], [2, 1], [1, 1], [True], ["2"]])
def test_bad_schedule_is_refused_at_construction(refine_at):
    with pytest.raises(ValueError, match="refine_at"):
        DepthRefinementCallback(refine_at)


def test_bad_arguments_are_refused_at_construction():
    for kwargs in ({"max_n_steps": 0}, {"max_refinements": -1}, {"optimizer_state": "keep"}, {"noise_std": -0.1}):
        with pytest.raises(ValueError):
            DepthRefinementCallback([1], **kwargs)


def test_schedule_levels_for_epochs_fractions_and_callables():
    assert [RefinementSchedule([1, 3]).target_level(e) for e in range(5)] == [0, 1, 1, 2, 2]
    fractions = RefinementSchedule([0.25, 0.5, 0.75])
    fractions.resolve(max_epochs=8)
    assert fractions.epochs == [2, 4, 6]
    every_other = RefinementSchedule(lambda epoch: epoch % 2 == 1, max_refinements=2)
    assert [every_other.target_level(e) for e in range(7)] == [0, 1, 1, 2, 2, 2, 2]
    assert RefinementSchedule([0, 1, 2]).target_level(5, cap=1) == 1
    colliding = RefinementSchedule([0.5, 0.55])
    with pytest.raises(ValueError, match="strictly increasing"):
        colliding.resolve(max_epochs=4)


def test_fractions_without_max_epochs_fail_at_setup():
    task = make_task()
    callback = DepthRefinementCallback([0.5])
    with pytest.raises(MisconfigurationException, match="max_epochs"):
        fit(task, [callback], max_epochs=-1, max_steps=4)


def test_caps_stop_refining():
    task = make_task()
    callback = DepthRefinementCallback([0, 1, 2], max_n_steps=3, evaluate=False)
    fit(task, [callback], max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    assert n_steps(task) == [2, 2, 2]
    assert [entry["epoch"] for entry in callback.history] == [0]


# ---------------------------------------------------------------------- optimizer and schedule
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_trains_exactly_the_refined_parameters(optimizer):
    task = make_task(optimizer=optimizer, lr=0.01 if optimizer == "adamw" else 0.05)
    consistency = ConsistencyCallback()
    callback = DepthRefinementCallback([1, 2], noise_std=0.1)
    fit(task, [callback, consistency], max_epochs=3)
    assert n_steps(task) == [4, 4, 4]
    assert consistency.checks >= 3 * 6
    assert [entry["epoch"] for entry in callback.history] == [1, 2]


@pytest.mark.parametrize(
    ("basis", "n_basis", "optimizer"),
    [("piecewise_constant", 1, "sgd"), ("piecewise_constant", 1, "adamw"), ("piecewise_linear", 2, "sgd")],
)
def test_optimizer_state_is_interpolated_like_the_weights(basis, n_basis, optimizer):
    task = make_task(basis=basis, n_basis=n_basis, optimizer=optimizer, lr=0.01)
    snapshot, probe = StateSnapshot(), EpochStartProbe()
    fit(task, [snapshot, DepthRefinementCallback([1], evaluate=False), probe], max_epochs=2, limit_train_batches=2,
        limit_val_batches=0)
    before, after = snapshot.state[1], probe.state[1]
    names = refined_names(snapshot.params[1], probe.params[1])
    assert names and all(name.startswith("model.stages.") for name in names)
    for name in names:
        for key, old in before[name].items():
            new = after[name][key]
            if old.dim() == 0:
                assert torch.equal(new, old), key
            elif basis == "piecewise_constant":  # every piece is duplicated
                assert torch.equal(new, old.repeat_interleave(2, dim=0)), key
            else:  # nodes kept, midpoints inserted (the basis' float64 matrix carries ~1e-16 round-off)
                assert new.shape[0] == 2 * old.shape[0] - 1
                torch.testing.assert_close(new[0::2], old, rtol=1e-6, atol=1e-12)
                torch.testing.assert_close(new[1::2], (old[:-1] + old[1:]) / 2, rtol=1e-6, atol=1e-12)
    for name in set(before) - set(names):  # untouched parameters keep their state
        for key, old in before[name].items():
            assert torch.equal(after[name][key], old)


def test_reset_drops_the_state_of_refined_parameters_only():
    task = make_task()
    snapshot, probe = StateSnapshot(), EpochStartProbe()
    callback = DepthRefinementCallback([1], optimizer_state="reset", evaluate=False)
    fit(task, [snapshot, callback, probe], max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    names = refined_names(snapshot.params[1], probe.params[1])
    assert names
    for name, state in probe.state[1].items():
        if name in names:
            assert state == {}
        else:
            assert torch.equal(state["momentum_buffer"], snapshot.state[1][name]["momentum_buffer"])


def test_lr_schedule_continues_through_refinements():
    lr0, epochs = 0.05, 4
    task = make_task(lr=lr0, lr_schedule="cosine")
    probe = EpochStartProbe()
    fit(task, [DepthRefinementCallback([1, 2], evaluate=False), probe], max_epochs=epochs, limit_train_batches=2,
        limit_val_batches=0)
    for epoch in range(epochs):
        assert probe.scheduler_epoch[epoch] == epoch
        assert probe.lr[epoch] == pytest.approx(0.5 * lr0 * (1 + math.cos(math.pi * epoch / epochs)), rel=1e-12)


def test_replace_parameters_handles_unmappable_state():
    old = nn.Parameter(torch.ones(2, 3))
    optimizer = torch.optim.SGD([old], lr=0.1)
    optimizer.state[old] = {"factored": torch.ones(3)}
    new = nn.Parameter(torch.ones(2, 3))
    change = ParameterChange(old=(old,), new=(new,), sources={new: ((old, 1.0),)})
    assert replace_parameters(optimizer, [change]) == 1
    assert optimizer.param_groups[0]["params"] == [new] and new not in optimizer.state and old not in optimizer.state


def test_replace_parameters_keeps_a_fresh_optimizer_order_for_interleaved_pieces():
    """A BatchNorm layer holds (weight, bias) per piece: after refinement the group must list the new pieces in module
    order, as an optimizer built afresh from the refined layer would, and carry momentum piece by piece."""
    layer = TimeBatchNorm2d(3, n_basis=2)
    untouched = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([untouched, *layer.parameters()], lr=0.1, momentum=0.9)
    for index, param in enumerate(layer.parameters()):
        optimizer.state[param] = {"momentum_buffer": torch.full((3,), float(index))}
    change = layer.resample(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    assert replace_parameters(optimizer, [change]) == 8
    assert optimizer.param_groups[0]["params"] == [untouched, *layer.parameters()]
    # old order: w0 b0 w1 b1 had momenta 0 1 2 3; new pieces 0, 1 come from piece 0 and 2, 3 from piece 1
    momenta = [optimizer.state[p]["momentum_buffer"][0].item() for p in layer.parameters()]
    assert momenta == [0, 1, 0, 1, 2, 3, 2, 3]


# ---------------------------------------------------------------------- noise, evaluation, logging
def test_noise_is_seeded_and_multiplicative():
    runs = []
    for noise in (0.1, 0.1, 0.0):
        pl.seed_everything(0)
        task = make_task()
        snapshot, probe = StateSnapshot(), EpochStartProbe()
        fit(task, [snapshot, DepthRefinementCallback([1], noise_std=noise, seed=3, evaluate=False), probe],
            max_epochs=2, limit_train_batches=1, limit_val_batches=0)
        runs.append((snapshot.params[1], probe.params[1]))
    (old, noisy), (_, noisy_again), (_, exact) = runs
    name = "model.stages.2.unit.conv1.weight"
    assert torch.equal(noisy[name], noisy_again[name])
    assert torch.equal(exact[name], old[name].repeat_interleave(2, dim=0))
    ratio = noisy[name] / old[name].repeat_interleave(2, dim=0)
    assert 0.09 < (ratio - 1).std().item() < 0.11 and abs((ratio - 1).mean().item()) < 0.01
    assert torch.equal(noisy["model.stages.2.unit.norm1.weight"], exact["model.stages.2.unit.norm1.weight"])


class AccuracyProbe(pl.Callback):
    """Placed before the refinement callback: the validation accuracy computed by hand in eval mode."""

    def __init__(self) -> None:
        self.accuracy: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        _, val = digits_tensors()
        images, labels = val.tensors
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.accuracy[trainer.current_epoch] = (pl_module(images).argmax(1) == labels).float().mean().item()
        pl_module.train(was_training)


class MetricsRecorder(pl.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.metrics.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("refinement/")})


def test_evaluation_reports_accuracy_and_leaves_training_untouched(caplog):
    finals, callbacks, lines = [], [], []
    for evaluate in (True, False):
        caplog.clear()
        pl.seed_everything(0)
        task = make_task()
        probe, recorder = AccuracyProbe(), MetricsRecorder()
        callback = DepthRefinementCallback([1, 2], evaluate=evaluate, eval_batches=None, noise_std=0.1)
        with caplog.at_level("INFO"):
            fit(task, [probe, callback, recorder], max_epochs=3)
        finals.append(_final_state(task))
        callbacks.append((callback, probe, recorder))
        lines.append([r.getMessage() for r in caplog.records if "Depth refinement at epoch" in r.getMessage()])
    _assert_identical(finals[0], finals[1])  # RNG, BatchNorm statistics and weights untouched
    callback, probe, recorder = callbacks[0]
    for entry in callback.history:
        assert entry["val_acc_before"] == pytest.approx(probe.accuracy[entry["epoch"]], abs=1e-6)
        assert 0.0 <= entry["val_acc_after"] <= 1.0
    first = (f"epoch 1: n_steps 1-1-1 -> 2-2-2 (T 1-1-1, step size T/N 0.5-0.5-0.5), parameters 42,949 -> 67,368, "
             f"val_acc {probe.accuracy[1]:.4f} -> ")
    assert len(lines[0]) == 2 and lines[0][0].startswith(f"Depth refinement at {first}")
    assert [m["refinement/refined"] for m in recorder.metrics] == [0.0, 1.0, 1.0]
    assert [m["refinement/level"] for m in recorder.metrics] == [0.0, 1.0, 2.0]
    assert recorder.metrics[1]["refinement/parameters"] == 67368
    assert recorder.metrics[2]["refinement/val_acc_before"] == pytest.approx(callback.history[1]["val_acc_before"])


# ---------------------------------------------------------------------- precision, averaging, compile
class OutputDtype(pl.Callback):
    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module):
        pl_module.model.register_forward_hook(lambda module, args, out: self.dtypes.add(out.dtype))


def test_bf16_mixed_trains_through_refinement():
    task = make_task()
    dtype, consistency = OutputDtype(), ConsistencyCallback()
    trainer = fit(task, [DepthRefinementCallback([1], evaluate=False), consistency, dtype], max_epochs=2,
                  precision="bf16-mixed", limit_val_batches=0)
    assert n_steps(task) == [2, 2, 2] and torch.bfloat16 in dtype.dtypes
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())
    assert all(p.dtype == torch.float32 for p in task.parameters())


@pytest.mark.parametrize(("precision", "dtype"), [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_true_precisions_train_through_a_measured_and_recalibrated_refinement(precision, dtype):
    """The quick evaluation and the BatchNorm re-estimation around a refinement get batches of the model's dtype."""
    task = make_task()
    callback = DepthRefinementCallback([1], eval_batches=1, recalibrate_bn=True, recalibration_batches=2)
    output = OutputDtype()
    trainer = fit(task, [callback, output], max_epochs=2, precision=precision, limit_train_batches=3)
    assert n_steps(task) == [2, 2, 2] and output.dtypes == {dtype}
    assert all(p.dtype == dtype for p in task.parameters())
    (entry,) = callback.history
    assert 0.0 <= entry["val_acc_before"] <= 1.0 and 0.0 <= entry["val_acc_after"] <= 1.0
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())


def test_recalibration_after_refinement_equals_recalibrate_bn_on_the_first_training_batches():
    class Snapshot(pl.Callback):
        """After the refinement callback: the module as it left the refinement."""

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    from lightning_cnet import recalibrate_bn

    task, snapshot = make_task(), Snapshot()
    fit(task, [DepthRefinementCallback([1], evaluate=False, recalibrate_bn=True, recalibration_batches=2), snapshot],
        max_epochs=2, limit_train_batches=2)
    # by hand: re-estimating from the first two training batches in dataset order does not depend on the statistics
    # it starts from, so doing it again on the snapshot must reproduce them (statistics left from training would not)
    refined = make_task()
    refined.load_state_dict(snapshot.state)
    images = [x for x, _ in torch.utils.data.DataLoader(TinyDigits().train_set, batch_size=32)][:2]
    recalibrate_bn(refined.model, images)
    for key, value in refined.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(snapshot.state[key], value, msg=key)


def test_ema_copy_is_refined_with_the_model():
    task = make_task()
    ema = EMAWeightAveraging(decay=0.5)
    fit(task, [DepthRefinementCallback([1], evaluate=False), ema, ConsistencyCallback()], max_epochs=2,
        limit_train_batches=3)
    average = ema._average_model.module
    assert [r.n_steps for r in average.model.resolution] == [2, 2, 2]
    assert [p.shape for p in average.parameters()] == [p.shape for p in task.parameters()]


# ---------------------------------------------------------------------- checkpoints
def _final_state(task) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in task.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Four epochs refined at 1 and 2 (with noise), checkpointed every epoch and at step 15 (mid epoch 2)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    pl.seed_everything(0)
    task = make_task(optimizer="adamw", lr=0.01, lr_schedule="cosine")
    callback = DepthRefinementCallback([1, 2], noise_std=0.1)
    epochs = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    mid = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=15, filename="mid-{step}")
    # 6 batches per epoch: steps 6 and 12 are the last batches of epochs 0 and 1, before the refinements at 1 and 2
    last_batch = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=6, filename="last-batch-{step}",
                                 save_on_train_epoch_end=False)
    fit(task, [callback, epochs, mid, last_batch], max_epochs=4, enable_checkpointing=True)
    return SimpleNamespace(root=root, state=_final_state(task), history=callback.history)


@pytest.mark.parametrize(("checkpoint", "pieces"), [("epoch=1.ckpt", 2), ("mid-step=15.ckpt", 4),
                                                   ("last-batch-step=6.ckpt", 1), ("last-batch-step=12.ckpt", 2)])
def test_resume_into_coarse_model_is_bit_identical(uninterrupted, checkpoint, pieces):
    """Also from a checkpoint on an epoch's last batch, after which Lightning skips the next epoch's start hook: the
    refinement due at that epoch must still happen, once."""
    path = uninterrupted.root / checkpoint
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert stored["model.stages.0.resolution.n_basis"].item() == pieces
    pl.seed_everything(123)  # the resumed run must not depend on the seed of the fresh model
    task = make_task(optimizer="adamw", lr=0.01, lr_schedule="cosine")
    assert n_steps(task) == [1, 1, 1]
    callback = DepthRefinementCallback([1, 2], noise_std=0.1)
    trainer = pl.Trainer(**trainer_options(callbacks=[callback, ConsistencyCallback()], max_epochs=4))
    trainer.fit(task, datamodule=TinyDigits(), ckpt_path=path)
    assert n_steps(task) == [4, 4, 4]
    assert [e["epoch"] for e in callback.history] == [e["epoch"] for e in uninterrupted.history] == [1, 2]
    _assert_identical(_final_state(task), uninterrupted.state)


def test_a_checkpoint_without_the_callback_state_resumes_at_the_level_of_its_model(uninterrupted, tmp_path):
    """Written without a refinement callback (here: its state removed), the checkpoint's model tells the level: the
    refinements of its basis since the model as built; none is repeated."""
    checkpoint = torch.load(uninterrupted.root / "mid-step=15.ckpt", weights_only=False)
    checkpoint["callbacks"] = {key: value for key, value in checkpoint["callbacks"].items()
                               if not key.startswith("DepthRefinementCallback")}
    torch.save(checkpoint, tmp_path / "without.ckpt")
    task = make_task(optimizer="adamw", lr=0.01, lr_schedule="cosine")
    callback = DepthRefinementCallback([1, 2], noise_std=0.1)
    trainer = pl.Trainer(**trainer_options(callbacks=[callback], max_epochs=4))
    trainer.fit(task, datamodule=TinyDigits(), ckpt_path=tmp_path / "without.ckpt")
    assert n_steps(task) == [4, 4, 4] and callback.level == 2 and callback.history == []


def test_the_level_is_the_callback_s_own_state_whatever_the_steps(tmp_path):
    """With step_factor=1 the step counts never change: the level comes from the callback's state, and a resume from
    a checkpoint between the refinements neither repeats nor skips one."""
    task = make_task()
    callback = DepthRefinementCallback([1, 2], step_factor=1, evaluate=False)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(task, [callback, saver], max_epochs=3, enable_checkpointing=True)
    assert n_steps(task) == [1, 1, 1] and [r.n_basis for r in task.model.resolution] == [4, 4, 4]
    assert callback.level == 2
    assert callback.state_key == "DepthRefinementCallback{'refine_at': [1, 2], 'step_factor': 1}"
    resumed_task, resumed = make_task(), DepthRefinementCallback([1, 2], step_factor=1, evaluate=False)
    trainer = pl.Trainer(**trainer_options(callbacks=[resumed], max_epochs=3))
    trainer.fit(resumed_task, datamodule=TinyDigits(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert [r.n_basis for r in resumed_task.model.resolution] == [4, 4, 4] and resumed.level == 2
    assert [entry["epoch"] for entry in resumed.history] == [1, 2]
    legacy = DepthRefinementCallback([1, 2])
    legacy.load_state_dict({"history": [{"epoch": 1, "level": 1}], "base_n_steps": [[1, 1, 1]]})  # as 0.2.0 saved it
    assert legacy.level == 1


def test_checkpoint_loads_with_load_from_checkpoint_and_load_state_dict(uninterrupted):
    path = uninterrupted.root / "epoch=3.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    loaded = ContinuousNetClassifier.load_from_checkpoint(path)
    assert n_steps(loaded) == [4, 4, 4] and len(loaded.model.stages[1].unit.conv2.weight) == 4
    _assert_identical(_final_state(loaded), uninterrupted.state)
    fresh = make_task(optimizer="adamw")
    fresh.load_state_dict(checkpoint["state_dict"])
    _assert_identical(_final_state(fresh), uninterrupted.state)
    saved = checkpoint["callbacks"]["DepthRefinementCallback{'refine_at': [1, 2]}"]
    assert [e["epoch"] for e in saved["history"]] == [1, 2] and saved["base_n_steps"] == [[1, 1, 1]]
    restored = DepthRefinementCallback([1, 2])
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved


def test_unreachable_checkpoint_resolution_fails_and_leaves_model_untouched():
    source = make_task(n_steps=3)
    target = make_task(n_steps=2)
    before = _final_state(target)
    with pytest.raises(ValueError, match="n_basis=3"):
        target.load_state_dict(source.state_dict())
    assert n_steps(target) == [2, 2, 2]
    _assert_identical(_final_state(target), before)


# ---------------------------------------------------------------------- refused setups
class NotRefinable(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        images, labels = batch
        return nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_continuous_net_is_refused_before_training():
    module = NotRefinable()
    with pytest.raises(MisconfigurationException, match="nothing to refine"):
        fit(module, [DepthRefinementCallback([1])], limit_val_batches=0)
    assert module.steps == 0


def test_sharding_strategies_are_refused_at_setup():
    from pytorch_lightning.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), max_epochs=3)
    with pytest.raises(MisconfigurationException, match="FSDPStrategy"):
        DepthRefinementCallback([1]).setup(trainer, make_task(), "fit")


def test_consistency_checker_detects_a_stale_optimizer():
    """The checker used above fails when the optimizer is not patched (so its passing means something)."""

    class SkipSurgery(DepthRefinementCallback):
        def on_train_epoch_start(self, trainer, pl_module):
            for net in [pl_module.model]:
                if trainer.current_epoch == 1 and n_steps(pl_module) == [1, 1, 1]:
                    net.refine()

    with pytest.raises(AssertionError, match="optimizer != model"):
        fit(make_task(), [SkipSurgery([1], evaluate=False), ConsistencyCallback()], max_epochs=2,
            limit_train_batches=3, limit_val_batches=0)


def test_callback_state_key_is_shared_by_both_namespaces():
    lightning = pytest.importorskip("lightning_cnet.lightning")
    assert lightning.DepthRefinementCallback([1]).state_key == DepthRefinementCallback([1]).state_key



# ---------------------------------------------------------------------- watching invariance
class ManifestationRecorder(pl.Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_manifestation_monitor_logs_the_classifier_accuracy_of_each_manifestation_and_the_gap():
    from lightning_cnet.callbacks import ManifestationMonitor

    task = make_task()
    monitor = ManifestationMonitor(schemes=["euler", "rk4"], n_steps=[1, 3], num_batches=1)
    recorder = ManifestationRecorder()
    fit(task, [monitor, recorder], max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    logged = recorder.metrics[-1]
    images, targets = next(iter(torch.utils.data.DataLoader(TinyDigits().val_set, batch_size=32)))
    task.eval()
    expected = {}
    for scheme in ("euler", "rk4"):
        for steps in (1, 3):
            with torch.no_grad(), task.model.manifestation(scheme=scheme, n_steps=steps):
                correct = task(images).argmax(-1) == targets
                expected[f"manifestation/val_acc_{scheme}_{steps}"] = correct.float().mean()
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value.item()), name
    assert logged["manifestation/invariance_gap"] == pytest.approx(max(expected.values()) - min(expected.values()))
    assert logged["manifestation/seconds"] > 0
    images, targets = TinyDigits().val_set.tensors  # the epoch's own accuracy (torchmetrics) is left alone
    with torch.no_grad():
        own = (task(images[:64]).argmax(-1) == targets[:64]).float().mean().item()
    assert recorder.metrics[-1]["val_acc"] == pytest.approx(own)
    assert [r.n_steps for r in task.model.resolution] == [1, 1, 1]  # the model is left at its manifestation
    with pytest.raises(ValueError, match="scheme='rk9'"):
        ManifestationMonitor(schemes=["rk9"])
