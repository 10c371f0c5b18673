"""Exact resume with the shipped DataModules: a run resumed from an end-of-epoch or a mid-epoch checkpoint
ends bit-identical to an uninterrupted one (Python API, CLI, DDP), and the loader pieces that make it so."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from refinement_support import make_task, trainer_options
from torch.utils.data import Dataset

from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.data import DigitsDataModule, EpochKeySampler, EpochSampler, ResumableDataLoader

# --------------------------------------------------------------------------------------------
# The sampler and the loader on their own


def test_epoch_order_depends_only_on_seed_and_epoch():
    first, second = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    orders = []
    for epoch in (2, 0, 5, 2):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        order = list(first)
        assert order == list(second) and sorted(order) == list(range(50))
        orders.append(order)
    assert orders[0] == orders[3]  # the same epoch again, in another sequence of calls
    assert len({tuple(order) for order in orders}) == 3
    other = EpochSampler(50, seed=4)
    other.set_epoch(2)
    assert list(other) != orders[0]
    keyed = EpochKeySampler(50, seed=3)
    keyed.set_epoch(5)
    assert list(keyed) == [(5, index) for index in orders[2]]


def test_without_set_epoch_each_pass_is_the_next_epoch():
    sampler = EpochSampler(20, seed=0)
    passes = [list(sampler) for _ in range(3)]
    expected = []
    for epoch in range(3):
        reference = EpochSampler(20, seed=0)
        reference.set_epoch(epoch)
        expected.append(list(reference))
    assert passes == expected


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_seed_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="seed"):
        EpochSampler(5, seed=bad)
    with pytest.raises(ValueError, match="seed"):
        DigitsDataModule(seed=bad)


def loader(n: int = 23, batch_size: int = 4, **kwargs) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(n)), seed=1, sampler=EpochSampler(n, seed=1), batch_size=batch_size,
                               **kwargs)


def epoch_batches(dl: ResumableDataLoader, epoch: int) -> list[list[int]]:
    dl.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in dl]


def test_loader_resumes_after_the_batches_handed_out():
    reference = {epoch: epoch_batches(loader(), epoch) for epoch in range(3)}
    assert len(reference[1]) == 6  # 23 samples in batches of 4
    for handed_out in range(6):
        interrupted = loader()
        epoch_batches(interrupted, 0)
        interrupted.sampler.set_epoch(1)
        batches = iter(interrupted)
        seen = [next(batches).tolist() for _ in range(handed_out)]
        assert seen == reference[1][:handed_out]
        state = interrupted.state_dict()
        # before its first batch the pass has not begun: the state is still the end of epoch 0
        assert (state["epoch"], state["batches"]) == ((1, handed_out) if handed_out else (0, 6))

        resumed = loader()
        resumed.load_state_dict(state)
        assert epoch_batches(resumed, 1) == reference[1][handed_out:]
        assert epoch_batches(resumed, 2) == reference[2]  # the state is used once


def test_state_taken_on_the_last_batch_drops_nothing_of_the_next_epoch():
    interrupted = loader()
    epoch_batches(interrupted, 0)
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 6)
    resumed = loader()
    resumed.load_state_dict(state)
    assert epoch_batches(resumed, 1) == epoch_batches(loader(), 1)


def test_loader_state_errors():
    dl = loader()
    for bad in ({"epoch": 0}, {"epoch": 0, "batches": "2", "batch_size": 4, "batches_per_epoch": 6}, [0, 2]):
        with pytest.raises(ValueError, match="holds the integers"):
            dl.load_state_dict(bad)
    with pytest.raises(ValueError, match="from 0"):
        dl.load_state_dict({"epoch": 0, "batches": -1, "batch_size": 4, "batches_per_epoch": 6})
    state = {"epoch": 1, "batches": 2, "batch_size": 5, "batches_per_epoch": 5}
    other = loader()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"middle of epoch 1: batch_size 5 then, 4 now, batches_per_epoch 5 then, 6"):
        epoch_batches(other, 1)
    unaffected = loader()
    unaffected.load_state_dict(state)
    assert epoch_batches(unaffected, 2) == epoch_batches(loader(), 2)  # another epoch: nothing to drop
    with pytest.raises(ValueError, match="persistent_workers"):
        loader(num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match="epoch"):
        ResumableDataLoader(list(range(4)), seed=0, batch_size=2)


class WorkerRandom(Dataset):
    """Each item draws from the global torch generator: in a worker process, seeded from the loader's generator."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randint(0, 2**30, ())


def test_worker_seeds_follow_seed_and_epoch():
    def draws(epoch: int, seed: int = 1, resume: dict | None = None) -> list[list[int]]:
        dl = ResumableDataLoader(WorkerRandom(), seed=seed, sampler=EpochSampler(12, seed=0), batch_size=3,
                                 num_workers=2)
        if resume is not None:
            dl.load_state_dict(resume)
        return epoch_batches(dl, epoch)

    torch.manual_seed(0)
    first = draws(1)
    torch.manual_seed(99)  # the loader does not draw from the global generator
    assert draws(1) == first
    assert draws(2) != first and draws(1, seed=2) != first
    resumed = draws(1, resume={"epoch": 1, "batches": 2, "batch_size": 3, "batches_per_epoch": 4})
    assert resumed == first[2:]


def positions(images: torch.Tensor, dataset_images: torch.Tensor) -> list[int]:
    """The position in ``dataset_images`` (distinct images) of each of ``images``, matched bit for bit."""
    where = {row.numpy().tobytes(): i for i, row in enumerate(dataset_images.flatten(1))}
    assert len(where) == len(dataset_images)
    return [where[row.numpy().tobytes()] for row in images.flatten(1)]


@pytest.mark.parametrize("in_hook", [True, False], ids=["built-in-hook", "built-outside"])
def test_lightning_puts_its_distributed_sampler_into_the_loader(in_hook):
    """What Lightning 2.6 does under DDP: wrap the sampler in a ``DistributedSamplerWrapper`` and rebuild the
    loader with it, from the arguments it recorded in ``train_dataloader`` or from the loader's attributes."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    dm = DigitsDataModule(image_size=8, batch_size=100, seed=7)
    dm.setup("fit")
    if in_hook:
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            original = dm.train_dataloader()
    else:
        original = dm.train_dataloader()
    shards = []
    for rank in (0, 1):
        sampler = DistributedSamplerWrapper(original.sampler, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = _update_dataloader(original, sampler, mode=RunningStage.TRAINING)
        assert isinstance(loader, ResumableDataLoader) and loader.sampler is sampler and loader.seed == 7
        passes = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            passes.append([images for images, _ in loader])
        shards.append(passes)
    train_images = dm.train_dataset.tensors[0]  # 1200 distinct images
    for epoch in (0, 1):
        assert [len(shard[epoch]) for shard in shards] == [6, 6]
        seen = torch.cat([batch for shard in shards for batch in shard[epoch]])
        assert sorted(positions(seen, train_images)) == list(range(1200))  # every digit once over both ranks
    assert not torch.equal(shards[0][0][0], shards[0][1][0])  # a new order in epoch 1


# --------------------------------------------------------------------------------------------
# Through a Trainer: uninterrupted run vs. resumed runs

BATCH, EPOCHS = 200, 4  # 1200 training digits: 6 batches per epoch


def digits(num_workers: int = 0) -> DigitsDataModule:
    return DigitsDataModule(image_size=8, batch_size=BATCH, seed=7, num_workers=num_workers)


def checkpoints(dirpath: Path) -> list[ModelCheckpoint]:
    """One checkpoint per epoch end and one every 3 steps (mid-epoch, and on the last batch of odd epochs)."""
    return [
        ModelCheckpoint(dirpath=dirpath, filename="epoch-{epoch}", save_top_k=-1, every_n_epochs=1),
        ModelCheckpoint(dirpath=dirpath, filename="step-{step}", save_top_k=-1, every_n_train_steps=3),
    ]


class BatchLog(pl.Callback):
    """The labels of every training batch, by (epoch, batch index)."""

    def __init__(self) -> None:
        self.labels: dict[tuple[int, int], list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels[(trainer.current_epoch, batch_idx)] = batch[1].tolist()


def fit(tmp_path: Path, name: str, *, refine: bool, ckpt_path: Path | None = None, num_workers: int = 0,
        max_epochs: int = EPOCHS) -> tuple[pl.Trainer, BatchLog]:
    torch.manual_seed(123)  # the same fresh coarse model every time; a resume overwrites its weights
    task = make_task(lr_schedule="cosine")
    log = BatchLog()
    callbacks = [log, *checkpoints(tmp_path / name)]
    if refine:
        callbacks.append(DepthRefinementCallback([1, 2], noise_std=0.1, eval_batches=1))
    trainer = pl.Trainer(**trainer_options(max_epochs=max_epochs, limit_val_batches=1, enable_checkpointing=True,
                                           callbacks=callbacks))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        trainer.fit(task, datamodule=digits(num_workers), ckpt_path=ckpt_path)
    return trainer, log


def final_state(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    module = trainer.lightning_module
    state = {f"model.{k}": v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    optimizer = trainer.optimizers[0].state_dict()
    for index, values in optimizer["state"].items():
        state.update({f"optimizer.{index}.{k}": v for k, v in values.items() if isinstance(v, torch.Tensor)})
    return state


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [key for key in a if a[key].shape != b[key].shape or not torch.equal(a[key], b[key])]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    trainer, log = fit(root, "full", refine=True)
    assert trainer.global_step == EPOCHS * 6
    return root, final_state(trainer), log, trainer.callbacks


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("checkpoint", ["epoch-epoch=1.ckpt", "step-step=9.ckpt", "step-step=15.ckpt"])
def test_resumed_fit_is_bit_identical(uninterrupted, checkpoint):
    """From the end of epoch 1, from the middle of epoch 1 (step 9) and of epoch 2 (step 15), with refinements
    at epochs 1 and 2 (the mid-epoch ones resume at K=2 and K=4)."""
    root, expected, full_log, _ = uninterrupted
    trainer, log = fit(root, checkpoint.removesuffix(".ckpt"), refine=True, ckpt_path=root / "full" / checkpoint)
    assert trainer.global_step == EPOCHS * 6
    assert differing(final_state(trainer), expected) == []
    assert log.labels and all(full_log.labels[key] == labels for key, labels in log.labels.items())
    refinement = next(cb for cb in trainer.callbacks if isinstance(cb, DepthRefinementCallback))
    assert [entry["epoch"] for entry in refinement.history] == [1, 2]


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_checkpoint_on_an_epochs_last_batch_resumes_with_the_whole_next_epoch(tmp_path):
    """Step 6 is the last batch of epoch 0: epoch 1 must come whole, in its own order (no refinement here, as
    Lightning does not call ``on_train_epoch_start`` for the epoch after such a restart)."""
    full, full_log = fit(tmp_path, "full", refine=False)
    resumed, log = fit(tmp_path, "resumed", refine=False, ckpt_path=tmp_path / "full" / "step-step=6.ckpt")
    assert sorted(log.labels) == [(epoch, index) for epoch in range(1, EPOCHS) for index in range(6)]
    assert all(full_log.labels[key] == labels for key, labels in log.labels.items())
    assert differing(final_state(resumed), final_state(full)) == []


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_with_worker_processes(tmp_path):
    """With workers the first batches are requested as soon as Lightning builds the iterator, before it sets the
    epoch of a resumed run: the loader must still read the epoch when the pass begins."""
    full, full_log = fit(tmp_path, "full", refine=False, num_workers=2, max_epochs=3)
    for checkpoint in ("epoch-epoch=0.ckpt", "step-step=9.ckpt"):
        resumed, log = fit(tmp_path, checkpoint.removesuffix(".ckpt"), refine=False, num_workers=2, max_epochs=3,
                           ckpt_path=tmp_path / "full" / checkpoint)
        first = (1, 0) if checkpoint.startswith("epoch") else (1, 3)
        assert min(log.labels) == first and len(log.labels) == 18 - 6 * first[0] - first[1]
        assert all(full_log.labels[key] == labels for key, labels in log.labels.items())
        assert differing(final_state(resumed), final_state(full)) == []


# --------------------------------------------------------------------------------------------
# Through the command line

CLI_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_epochs": 3, "limit_val_batches": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "deterministic": True,
    },
    "model": {"class_path": "lightning_cnet.module.ContinuousNetClassifier",
              "init_args": {"model": "cnet_digits", "scheme": "euler", "n_steps": 1, "lr": 0.05}},
    "data": {"class_path": "lightning_cnet.data.DigitsDataModule",
             "init_args": {"image_size": 8, "batch_size": BATCH, "seed": 7}},
}


def cli_config(tmp_path: Path, name: str) -> Path:
    """The run's config: refinement at epochs 1 and 2, checkpoints of every epoch and every 4 steps in ``name``."""
    dirpath = str(tmp_path / name)
    config = {**CLI_CONFIG, "checkpoint": {"dirpath": dirpath}}
    config["trainer"] = {**CLI_CONFIG["trainer"], "default_root_dir": dirpath, "callbacks": [
        {"class_path": "lightning_cnet.callbacks.DepthRefinementCallback",
         "init_args": {"refine_at": [1, 2], "noise_std": 0.1, "eval_batches": 1}},
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": dirpath, "filename": "epoch-{epoch}", "save_top_k": -1, "every_n_epochs": 1}},
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": dirpath, "filename": "step-{step}", "save_top_k": -1, "every_n_train_steps": 4}},
    ]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lightning_cnet_fit(config: Path, *extra: str) -> None:
    result = subprocess.run([sys.executable, "-m", "lightning_cnet", "fit", "--config", str(config), *extra],
                            capture_output=True, text=True, timeout=300, cwd=config.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not resumable" not in result.stderr


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=True)
    state = {f"model.{k}": v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    for index, values in checkpoint["optimizer_states"][0]["state"].items():
        state.update({f"optimizer.{index}.{k}": v for k, v in values.items() if isinstance(v, torch.Tensor)})
    return state


@pytest.mark.slow
def test_cli_resume_is_bit_identical(tmp_path):
    lightning_cnet_fit(cli_config(tmp_path, "full"))
    expected = saved_tensors(tmp_path / "full" / "epoch-epoch=2.ckpt")
    # the end of epoch 0 (before the first refinement) and the middle of epoch 1 (step 8 of 6-batch epochs)
    for checkpoint in ("epoch-epoch=0.ckpt", "step-step=8.ckpt"):
        name = f"from-{checkpoint.removesuffix('.ckpt')}"
        lightning_cnet_fit(cli_config(tmp_path, name), "--ckpt_path", str(tmp_path / "full" / checkpoint))
        assert differing(saved_tensors(tmp_path / name / "epoch-epoch=2.ckpt"), expected) == [], checkpoint


# --------------------------------------------------------------------------------------------
# Two DDP ranks


class ShardLog(pl.Callback):
    """Each rank writes the images of its training batches, by (epoch, batch index), to ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.images: dict[tuple[int, int], torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images[(trainer.current_epoch, batch_idx)] = batch[0].flatten(1).clone()

    def on_train_end(self, trainer, pl_module):
        torch.save(self.images, self.folder / f"rank{trainer.global_rank}.pt")


def ddp_fit(tmp_path: Path, name: str, ckpt_path: Path | None = None) -> dict[int, dict]:
    folder = tmp_path / name
    folder.mkdir()
    torch.manual_seed(123)
    task = make_task(lr_schedule="cosine")
    callbacks = [ShardLog(folder), DepthRefinementCallback([1], noise_std=0.1, eval_batches=1),
                 ModelCheckpoint(dirpath=folder, filename="step-{step}", save_top_k=-1, every_n_train_steps=4),
                 ModelCheckpoint(dirpath=folder, filename="epoch-{epoch}", save_top_k=-1, every_n_epochs=1)]
    trainer = pl.Trainer(**trainer_options(strategy="ddp_spawn", devices=2, max_epochs=2, limit_val_batches=1,
                                           enable_checkpointing=True, callbacks=callbacks))
    trainer.fit(task, datamodule=digits(), ckpt_path=ckpt_path)
    return {rank: torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)}


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_shards_and_resume_exactly(tmp_path):
    full = ddp_fit(tmp_path, "full")
    dm = digits()
    dm.setup("fit")
    train_images = dm.train_dataset.tensors[0]  # 1200 distinct images
    for epoch in range(2):
        # 1200 digits over 2 ranks in batches of 200: 3 batches per rank, together every digit exactly once
        seen = torch.cat([full[rank][(epoch, index)] for rank in (0, 1) for index in range(3)])
        assert sorted(positions(seen, train_images)) == list(range(1200))
    assert not torch.equal(full[0][(0, 0)], full[0][(1, 0)])  # a new order in epoch 1

    # step 4 is the second batch of epoch 1 (3 steps per epoch)
    resumed = ddp_fit(tmp_path, "resumed", ckpt_path=tmp_path / "full" / "step-step=4.ckpt")
    for rank in (0, 1):
        assert sorted(resumed[rank]) == [(1, 1), (1, 2)]
        assert all(torch.equal(resumed[rank][key], full[rank][key]) for key in resumed[rank])
    final = {name: saved_tensors(tmp_path / name / "epoch-epoch=1.ckpt") for name in ("full", "resumed")}
    assert differing(final["resumed"], final["full"]) == []
