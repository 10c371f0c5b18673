"""Predictions on disk: the CSV writer of ``lightning-cnet predict``."""

from __future__ import annotations

import csv
import logging

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnet.cli import PredictionCSVWriter, main

CLASSES = 4


class ReadsItsLabel(pl.LightningModule):
    """Predicts, for an input holding a class ``c`` in its first entry, probabilities peaked at ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        labels = batch[0][:, 0].long()
        return torch.nn.functional.one_hot(labels, CLASSES).float().mul(3.0).softmax(dim=-1)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_writer_writes_one_row_per_sample_with_its_dataset_index(tmp_path):
    labels = torch.tensor([2, 0, 3, 1, 1, 2, 0])
    dataset = TensorDataset(labels.float().unsqueeze(1))
    order = [5, 3, 6, 0, 2, 4, 1]  # a sampler that does not follow the dataset order
    loader = DataLoader(dataset, batch_size=3, sampler=order)
    writer = PredictionCSVWriter(tmp_path / "out")
    trainer = pl.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu", devices=1)
    trainer.predict(ReadsItsLabel(), dataloaders=loader, return_predictions=False)

    header, *rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert header == ["index", "predicted", "prob_0", "prob_1", "prob_2", "prob_3"]
    assert [int(row[0]) for row in rows] == order
    peak, rest = torch.tensor([3.0, 0, 0, 0]).softmax(0)[:2].tolist()
    for index, predicted, *probabilities in rows:
        label = int(labels[int(index)])
        assert int(predicted) == label
        expected = [peak if c == label else rest for c in range(CLASSES)]
        assert [float(p) for p in probabilities] == pytest.approx(expected, rel=1e-5)
    assert writer.paths == [tmp_path / "out" / "predictions.csv"]


def test_writer_refuses_predictions_that_are_not_class_probabilities(tmp_path):
    class Flat(ReadsItsLabel):
        def predict_step(self, batch, batch_idx):
            return batch[0][:, 0]

    trainer = pl.Trainer(callbacks=[PredictionCSVWriter(tmp_path)], logger=False, enable_progress_bar=False,
                         accelerator="cpu", devices=1)
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    with pytest.raises(ValueError, match=r"expects class probabilities \[batch, classes\].*shape \[2\]"):
        trainer.predict(Flat(), dataloaders=loader, return_predictions=False)


def test_cli_predict_writes_the_csv_in_the_run_directory(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        main(["predict", "--data.image_size", "8", "--data.batch_size", "100", "--trainer.enable_progress_bar",
              "false", "--trainer.logger.init_args.name", "run"])
    path = tmp_path / "lightning_logs" / "run" / "version_0" / "predictions.csv"
    header, *rows = read_rows(path)
    assert len(rows) == 297  # the digits test split, the predict set of DigitsDataModule
    assert sorted(int(row[0]) for row in rows) == list(range(297)) and len(header) == 2 + 10
    for row in rows:
        probabilities = [float(p) for p in row[2:]]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert int(row[1]) == max(range(10), key=probabilities.__getitem__)
    assert (path.parent / "config.yaml").is_file()  # the same run directory as the saved config
    assert f"Predictions of 297 samples written to {path.relative_to(tmp_path)}" in caplog.text
