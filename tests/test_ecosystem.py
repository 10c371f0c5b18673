"""The backbone among the ecosystem's tools: safetensors, timm's EMA, SyncBatchNorm, channels_last, pruning, and the
command line's --version and optimizer warning."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import tomllib
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelPruning
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from refinement_support import TinyDigits, make_task, n_steps, trainer_options
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune

from lightning_cnet import get_model
from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.cli import main
from lightning_cnet.module import ContinuousNetClassifier

REPO = Path(__file__).resolve().parents[1]
PRUNING_REFUSED = r"pruning reparametrises `weight` as `weight_orig \* weight_mask`, which a refinement cannot carry"


def refined_twice(randomize, **options) -> nn.Module:
    model = randomize(get_model("cnet_digits", n_steps=1, T=4.0, **options))
    model.refine()
    model.refine()
    return randomize(model).eval()


def sgd_step(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.eval()


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


# ---------------------------------------------------------------------- safetensors
def test_a_refined_state_dict_round_trips_through_safetensors(tmp_path, randomize):
    model = refined_twice(randomize)
    x = torch.randn(3, 1, 8, 8)
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    fresh = get_model("cnet_digits", n_steps=1, T=4.0)
    fresh.load_state_dict(load_file(tmp_path / "weights.safetensors"))
    assert fresh.resolution == model.resolution and fresh.resolution[0].n_basis == 4
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def test_safetensors_save_model_takes_a_refined_model(tmp_path, randomize):
    model = refined_twice(randomize)
    save_model(model, tmp_path / "model.safetensors")
    fresh = get_model("cnet_digits", n_steps=1, T=4.0)
    assert load_model(fresh, tmp_path / "model.safetensors") == (set(), [])
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- timm EMA
@pytest.mark.parametrize("ema_class", ["ModelEmaV2", "ModelEmaV3"])
def test_timm_ema_is_refined_alongside_and_averages_by_hand(ema_class, randomize):
    ema_classes = pytest.importorskip("timm.utils")
    decay = 0.75
    model = randomize(get_model("cnet_digits", n_steps=1, T=4.0)).eval()
    ema = getattr(ema_classes, ema_class)(model, decay=decay)
    for level in range(2):
        sgd_step(model, seed=level)
        model.refine()
        ema.module.refine()
        sgd_step(model, seed=10 + level)
        before = {name: value.clone() for name, value in ema.module.state_dict().items()}
        current = model.state_dict()
        ema.update(model)
        after = ema.module.state_dict()
        assert after.keys() == current.keys()
        for name, value in after.items():
            if value.is_floating_point() and "resolution" not in name:
                expected = decay * before[name].double() + (1 - decay) * current[name].double()
                torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6, msg=name)
            elif ema_class == "ModelEmaV3" or "resolution" in name:
                assert torch.equal(value, current[name]), name  # counts and the resolution are copied
        assert ema.module.resolution == model.resolution


class EmaOutsideTheModuleTree(ContinuousNetClassifier):
    """The documented way to train with a timm EMA and DepthRefinementCallback: the EMA is not a submodule (so it
    is neither trained nor refined by the callback) and follows the model's resolution at each epoch start, which
    Lightning calls after the callbacks' (so after a refinement)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        from timm.utils import ModelEmaV3

        object.__setattr__(self, "ema", ModelEmaV3(self.model, decay=0.5))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        while self.ema.module.resolution[0].n_basis < self.model.resolution[0].n_basis:
            self.ema.module.refine()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update(self.model)


def test_the_documented_ema_recipe_trains_through_refinements():
    pytest.importorskip("timm")
    task = make_task(EmaOutsideTheModuleTree)
    trainer = pl.Trainer(**trainer_options(max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                                           callbacks=[DepthRefinementCallback([1, 2], noise_std=0.1)]))
    trainer.fit(task, datamodule=TinyDigits())
    assert n_steps(task) == [4, 4, 4] and task.ema.module.resolution == task.model.resolution
    ema, model = dict(task.ema.module.named_parameters()), dict(task.model.named_parameters())
    assert ema.keys() == model.keys()
    assert any(not torch.equal(ema[name], model[name]) for name in ema)  # an average, not a copy


# ---------------------------------------------------------------------- SyncBatchNorm
def test_convert_sync_batchnorm_replaces_every_batchnorm_and_keeps_pieces(randomize):
    model = randomize(get_model("cnet_digits", n_steps=2)).eval()
    assert len(batch_norms(model)) == 3 * 2 * 2 + 2 * 2 + 1  # stages x norms x pieces, stitches x norms, head
    x = torch.randn(4, 1, 8, 8)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert [type(m) for m in batch_norms(converted)] == [nn.SyncBatchNorm] * 17
    ours, theirs = model.state_dict(), converted.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    # Training without a process group: SyncBatchNorm normalises like BatchNorm and updates the same statistics.
    plain, synced = copy.deepcopy(model).train(), copy.deepcopy(converted).train()
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[name], value, rtol=0, atol=0)


def test_a_converted_model_refines_into_sync_batchnorm_pieces(randomize):
    model = randomize(get_model("cnet_digits", n_steps=2)).eval()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    model.refine()
    converted.refine()
    pieces = [p for stage in converted.stages for norm in (stage.unit.norm1, stage.unit.norm2) for p in norm.pieces]
    assert len(pieces) == 3 * 2 * 4 and all(type(p) is nn.SyncBatchNorm for p in pieces)
    assert all(type(m) is nn.SyncBatchNorm for m in batch_norms(converted))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- channels_last
def test_channels_last_gives_the_contiguous_output_and_stays_through_refinement(randomize):
    model = randomize(get_model("cnet_digits", scheme="rk4", n_steps=2)).eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 16, 16)
    for _ in range(2):  # before and after a refinement
        kernels = [p for p in fast.parameters() if p.dim() == 4]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        assert all(not p.is_contiguous() for p in kernels if p.shape[1] > 1 and p.shape[2] > 1)  # really moved
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), model(x),
                                   rtol=1e-5, atol=1e-6)
        model.refine()
        fast.refine()
    assert len(fast.stages[0].unit.conv1.weight) == 8


def test_channels_last_benchmark_smoke_run():
    result = subprocess.run([sys.executable, "benchmarks/channels_last.py", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("train", "infer"))]
    assert [row[0] for row in rows] == ["train", "infer"]
    for row in rows:
        contiguous, channels_last, ratio = (float(v) for v in row[3:6])
        assert contiguous > 0 and channels_last > 0 and ratio > 0 and float(row[-1]) <= 1e-4


# ---------------------------------------------------------------------- pruning
def fit(callbacks: list, task=None, **options) -> ContinuousNetClassifier:
    task = task or make_task()
    trainer = pl.Trainer(**trainer_options(max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                                           callbacks=callbacks, **options))
    trainer.fit(task, datamodule=TinyDigits())
    return task


@pytest.mark.parametrize("refinement_first", [True, False])
def test_model_pruning_is_refused_at_setup(refinement_first):
    callbacks = [DepthRefinementCallback([1]), ModelPruning("l1_unstructured", amount=0.5)]
    task = make_task()
    with pytest.raises(MisconfigurationException, match="cannot be used with the ModelPruning callback: "
                                                        + PRUNING_REFUSED):
        fit(callbacks if refinement_first else callbacks[::-1], task)
    assert not prune.is_pruned(task) and n_steps(task) == [1, 1, 1]  # refused before anything happened


def test_an_already_pruned_model_is_refused_until_the_pruning_is_made_permanent():
    task = make_task()
    prune.l1_unstructured(task.model.stitches[0].conv1, "weight", amount=0.3)
    with pytest.raises(MisconfigurationException, match="a model already pruned .*" + PRUNING_REFUSED):
        fit([DepthRefinementCallback([1])], task)
    prune.remove(task.model.stitches[0].conv1, "weight")
    assert n_steps(fit([DepthRefinementCallback([1])], task)) == [2, 2, 2]


def test_lightning_namespace_refuses_its_model_pruning():
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelPruning as LightningModelPruning
    from lightning.pytorch.utilities.exceptions import MisconfigurationException as LightningMisconfiguration

    from lightning_cnet.lightning import ContinuousNetClassifier as LightningClassifier
    from lightning_cnet.lightning import DepthRefinementCallback as LightningRefinement

    dm = TinyDigits()
    trainer = L.Trainer(**trainer_options(max_epochs=2, limit_train_batches=1, callbacks=[
        LightningRefinement([1]), LightningModelPruning("l1_unstructured", amount=0.5)]))
    with pytest.raises(LightningMisconfiguration, match=PRUNING_REFUSED):
        trainer.fit(make_task(LightningClassifier), train_dataloaders=dm.train_dataloader())


# ---------------------------------------------------------------------- command line
def test_version_flag_prints_the_projects_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"lightning-cnet {version}"


def test_optimizer_without_scheduler_warns_in_one_line(tmp_path, monkeypatch, capfd, recwarn):
    monkeypatch.chdir(tmp_path)
    common = ["--optimizer", "SGD", "--optimizer.lr", "0.05", "--trainer.fast_dev_run", "1", "--data.image_size", "8",
              "--trainer.enable_progress_bar", "false"]
    main(["fit", *common])
    lines = [line for line in capfd.readouterr().err.splitlines() if "--lr_scheduler" in line]
    assert lines == [
        "lightning-cnet: warning: --optimizer without --lr_scheduler replaces ContinuousNetClassifier."
        "configure_optimizers and its lr_schedule='cosine': the learning rate stays constant; add --lr_scheduler "
        "(e.g. --lr_scheduler CosineAnnealingLR --lr_scheduler.T_max <max_epochs>) to schedule it"
    ]
    assert not any("will be overridden" in str(w.message) for w in recwarn)  # said once, by the line above

    recwarn.clear()
    main(["fit", *common, "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"])
    assert not [line for line in capfd.readouterr().err.splitlines() if "lightning-cnet: warning" in line]
    assert any(re.search("configure_optimizers` will be overridden", str(w.message)) for w in recwarn)
