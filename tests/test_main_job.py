"""The README's main job, run as a user runs it: its ODE stages must do the work.

``configs/hard_digits.yaml`` on seed 0 (about a minute on 2 cores); the test accuracy of the checkpoint is counted
by hand on the test split, with every ODE stage and with every stage replaced by the identity (the stages-off
baseline). Measured over seeds 0, 1, 2: 88.2, 83.8, 85.2% with the stages and 11-16% without them (README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_cnet.data import HardDigitsDataModule
from lightning_cnet.module import ContinuousNetClassifier

REPO = Path(__file__).resolve().parents[1]


def hand_counted_accuracy(model: torch.nn.Module, data: HardDigitsDataModule) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    return correct / total


@pytest.mark.slow
def test_main_job_depends_on_its_ode_stages(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    fit = subprocess.run(
        [sys.executable, "-m", "lightning_cnet", "fit", "--config", str(REPO / "configs" / "hard_digits.yaml"),
         "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Depth refinement at epoch 15" in fit.stdout + fit.stderr, "the main job refines during training"
    checkpoint = tmp_path / "lightning_logs" / "hard_digits" / "version_0" / "checkpoints" / "last.ckpt"
    task = ContinuousNetClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    assert [r.n_steps for r in task.model.stage_resolutions] == [8, 8, 8], "refined 1 -> 8 steps per stage"
    data = HardDigitsDataModule(image_size=16, batch_size=256, seed=0)
    data.setup("test")
    with_stages = hand_counted_accuracy(task.model, data)
    with task.model.stages_off():
        stages_off = hand_counted_accuracy(task.model, data)
    assert with_stages >= 0.80, f"test accuracy {with_stages:.3f} (seed 0 measured 0.882)"
    assert with_stages - stages_off >= 0.20, f"stages off: {stages_off:.3f} against {with_stages:.3f}"
