"""The studies of a checkpoint of another task than the classifier: measured by the task's own validation_step."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_cnet.analysis import as_batches, evaluate
from lightning_cnet.analysis.cli import main
from lightning_cnet.data import DigitCanvasDataModule
from lightning_cnet.module import ContinuousNetSegmenter

DATA = {"class_path": "lightning_cnet.data.DigitCanvasDataModule",
        "init_args": {"train_size": 32, "val_size": 16, "test_size": 16, "batch_size": 8}}


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> Path:
    """A segmenter trained briefly at 2 RK4 steps and 2 pieces, with the config.yaml the CLI would save."""
    run = tmp_path_factory.mktemp("segmentation")
    (run / "checkpoints").mkdir()
    model = {"class_path": "lightning_cnet.module.ContinuousNetSegmenter",
             "init_args": {"num_classes": 11, "model_kwargs": {"scheme": "rk4", "n_steps": 2, "T": 2.0}}}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model, "data": DATA}))
    pl.seed_everything(0)
    task = ContinuousNetSegmenter(num_classes=11, model_kwargs={"scheme": "rk4", "n_steps": 2, "T": 2.0},
                                  optimizer="adamw", lr=0.003)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(task, datamodule=DigitCanvasDataModule(**DATA["init_args"]))
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


def mean_iou(predicted: np.ndarray, target: np.ndarray, classes: int) -> float:
    """Mean over the classes present in the predictions or the targets of |P & T| / |P | T|, by hand."""
    scores = []
    for c in range(classes):
        union = np.logical_or(predicted == c, target == c).sum()
        if union:
            scores.append(np.logical_and(predicted == c, target == c).sum() / union)
    return float(np.mean(scores))


def test_evaluate_through_a_task_reports_its_own_metrics_for_any_model_in_place_of_its_backbone(segmentation_run):
    task = ContinuousNetSegmenter.load_from_checkpoint(segmentation_run / "checkpoints" / "last.ckpt").eval()
    data = DigitCanvasDataModule(**DATA["init_args"])
    data.setup("test")
    batches = as_batches(data.test_dataloader(), task=task)
    with task.model.stages_off(), torch.no_grad():
        off = evaluate(task.model, batches)
        predicted = torch.cat([task(b["image"]).argmax(1) for b in batches]).numpy()
    assert "accuracy" not in off and set(off) >= {"val_loss", "val_iou"}
    masks = torch.cat([b["mask"] for b in batches]).numpy()
    assert off["val_iou"] == pytest.approx(mean_iou(predicted, masks, 11), rel=1e-6)


def test_the_studies_run_on_a_segmentation_checkpoint(segmentation_run, tmp_path, capsys):
    ckpt = str(segmentation_run / "checkpoints" / "last.ckpt")
    out = tmp_path / "out"
    main(["manifestation", "--ckpt_path", ckpt, "--schemes", "euler", "rk4", "--n_steps", "1", "2",
          "--reference_steps", "8", "--num_batches", "1", "--recalibrate_bn", "--recalibration_batches", "1",
          "--out", str(out)])
    with (out / "manifestation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 + 2 * 2 * 2 and "accuracy" not in rows[0] and "val_iou" in rows[0]
    trained = next(r for r in rows if r["trained"] == "True" and r["bn"] == "as trained")
    assert (trained["scheme"], trained["n_steps"]) == ("rk4", "2")
    main(["convergence", "--ckpt_path", ckpt, "--schemes", "euler", "--n_steps", "2", "4", "--reference_steps", "16",
          "--out", str(out)])
    main(["compression", "--ckpt_path", ckpt, "--pairs", "1:2", "--num_batches", "1", "--save", str(out / "small"),
          "--out", str(out)])
    compressed = ContinuousNetSegmenter.load_from_checkpoint(out / "small" / "last-K1-N2.ckpt", weights_only=True)
    assert [(r.n_basis, r.n_steps) for r in compressed.model.resolution] == [(1, 2)] * 3
    main(["export", "--ckpt_path", ckpt, "--scheme", "euler", "--n_steps", "2", "--out", str(out / "net.pt2")])
    for name in ("manifestation.png", "convergence.png", "compression.png", "net.pt2"):
        assert (out / name).is_file(), name
