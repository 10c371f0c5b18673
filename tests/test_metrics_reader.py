"""read_scalars on the files Lightning's CSV and TensorBoard loggers write during a real (tiny) fit."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnet.metrics_reader import read_scalars

EPOCHS, BATCHES = 3, 4


class KnownValues(pl.LightningModule):
    """Logs values fixed in advance: one per step and one per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.log("known_step", 100.0 + 10 * self.current_epoch + batch_idx, on_step=True, on_epoch=False)
        return self.layer(batch[0]).pow(2).mean()

    def on_train_epoch_end(self):
        self.log("known_epoch", 10.0 * self.current_epoch + 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    loggers = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")]
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=loggers, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    data = DataLoader(TensorDataset(torch.randn(BATCHES * 2, 2)), batch_size=2)
    trainer.fit(KnownValues(), train_dataloaders=data)
    return {"csv": root / "csv" / "version_0", "tb": root / "tb" / "version_0"}


@pytest.mark.parametrize("kind", ["csv", "tb"])
def test_epoch_metrics_are_keyed_by_epoch_and_step_metrics_by_step(run_dirs, kind):
    assert read_scalars(run_dirs[kind], "known_epoch") == [(e, 10.0 * e + 0.5) for e in range(EPOCHS)]
    steps = read_scalars(run_dirs[kind], "known_step")
    assert [value for _, value in steps] == [100.0 + 10 * e + b for e in range(EPOCHS) for b in range(BATCHES)]
    keys = [key for key, _ in steps]
    assert keys == sorted(set(keys)) and len(keys) == EPOCHS * BATCHES


def test_a_single_file_reads_like_its_directory(run_dirs):
    event_file = next(run_dirs["tb"].glob("events.out.tfevents.*"))
    for directory, file in ((run_dirs["csv"], run_dirs["csv"] / "metrics.csv"), (run_dirs["tb"], event_file)):
        assert read_scalars(file, "known_epoch") == read_scalars(directory, "known_epoch")


def test_bad_paths_and_tags_are_named(run_dirs, tmp_path):
    for kind in ("csv", "tb"):
        with pytest.raises(ValueError, match=r"no (column|scalar) 'val_acc'.*'known_epoch', 'known_step'"):
            read_scalars(run_dirs[kind], "val_acc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scalars(tmp_path / "missing", "val_acc")
    with pytest.raises(FileNotFoundError, match="holds neither metrics.csv nor TensorBoard event files"):
        read_scalars(tmp_path, "val_acc")
