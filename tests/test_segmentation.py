"""Semantic segmentation: digits on a canvas with their masks, the segmenter, and its config through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from test_cli import REPO, run_cli

from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.data import DigitCanvasDataModule
from lightning_cnet.data.canvas import digit_canvases
from lightning_cnet.metrics_reader import read_scalars
from lightning_cnet.module import ContinuousNetSegmenter

CONFIG = REPO / "configs" / "digits_segmentation.yaml"


def test_canvases_hold_their_digits_without_overlap_and_masks_name_them():
    digits = np.zeros((3, 8, 8))
    digits[:, 2:6, 1:7] = 1.0  # a 4x6 stroke of full intensity in each 8x8 digit
    digits[:, 0, 0] = 0.2  # below the threshold: background in the mask
    labels = np.array([3, 7, 9])
    images, masks = digit_canvases(digits, labels, 50, canvas_size=32, digits_per_image=3, threshold=0.25, seed=1)
    for image, mask in zip(images[:, 0], masks):
        assert torch.equal(mask > 0, image > 0.25)
        present = [value for value in mask.unique().tolist() if value]
        assert set(present) <= {4, 8, 10}  # 1 + label
        assert sum(int((mask == value).sum()) for value in present) == 3 * 24  # three strokes, none overlapping
        assert int((image == 0.2).sum()) == 3
    again, _ = digit_canvases(digits, labels, 50, canvas_size=32, digits_per_image=3, threshold=0.25, seed=1)
    assert torch.equal(images, again)


def test_the_data_module_gives_dict_batches_and_refuses_bad_arguments():
    data = DigitCanvasDataModule(train_size=8, val_size=4, test_size=4, batch_size=4, digit_size=10)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["mask"].dtype == torch.long
    assert batch["mask"].max() <= 10 and (batch["mask"] > 0).any()
    for bad in ({"canvas_size": 40}, {"digits_per_image": 5}, {"digit_size": 20}, {"threshold": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DigitCanvasDataModule(**bad)


def test_the_segmenter_trains_with_refinement_and_reloads_from_its_checkpoint(tmp_path):
    pl.seed_everything(0)
    data = DigitCanvasDataModule(train_size=32, val_size=16, test_size=16, batch_size=16)
    task = ContinuousNetSegmenter("cnet_digits", num_classes=11, model_kwargs={"scheme": "rk4", "n_steps": 1, "T": 1.0},
                                  optimizer="adamw", lr=0.003)
    callback = DepthRefinementCallback([1])
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(task, datamodule=data)
    assert [r.n_steps for r in task.model.resolution] == [2, 2, 2]
    assert callback.history[0]["metric"] == "val_iou" and 0.0 <= callback.history[0]["val_iou_before"] <= 1.0
    path = tmp_path / "segmenter.ckpt"
    trainer.save_checkpoint(path)
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hparams["model_kwargs"] == {"scheme": "rk4", "n_steps": 1, "T": 1.0} and hparams["num_classes"] == 11
    loaded = ContinuousNetSegmenter.load_from_checkpoint(path).eval()
    images = next(iter(data.val_dataloader()))["image"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), task.eval()(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="val batch 0 has no samples"):
        task.validation_step({"image": images[:0], "mask": torch.zeros(0, 32, 32, dtype=torch.long)}, 0)
    with pytest.raises(ValueError, match="num_classes=None is not valid: expected an integer >= 2"):
        ContinuousNetSegmenter("cnet_digits")


@pytest.mark.slow
def test_the_segmentation_config_trains_through_the_cli(tmp_path):
    """The shipped config, shortened: refines, keeps the best checkpoint by val_iou, tests on it."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["refine_at"] = [1, 2]
    config["trainer"]["callbacks"].append({"class_path": "lightning_cnet.callbacks.ManifestationMonitor",
                                           "init_args": {"schemes": ["euler", "rk4"], "num_batches": 1}})
    config["trainer"].update(max_epochs=3, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2,
                             enable_progress_bar=False)
    config["data"]["init_args"].update(train_size=96, val_size=64, test_size=64)
    shortened = tmp_path / "segmentation.yaml"
    shortened.write_text(yaml.safe_dump(config))
    fit = run_cli("fit", "--config", str(shortened), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "digits_segmentation" / "version_0"
    (best,) = (run / "checkpoints").glob("best-epoch=*-val_iou=*.ckpt")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["state_dict"]["model.stages.0.resolution.n_steps"].item() == 4
    assert len(read_scalars(run, "refinement/val_iou_before")) == 2
    assert len(read_scalars(run, "manifestation/val_iou_rk4_8")) == 1  # the last epoch ran at 4 steps: 2, 4, 8
    test = run_cli("test", "--config", str(shortened), "--ckpt_path", str(best), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test_iou" in test.stdout
