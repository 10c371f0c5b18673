"""A ``lightning-cnet fit`` killed with SIGKILL after a refinement resumes to the uninterrupted run's final model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

HERE = Path(__file__).resolve().parent


class StepMarker(pl.Callback):
    """Prints ``STEP <global step>`` after every optimizer step, for the parent process to wait on."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"STEP {trainer.global_step}", flush=True)


def _config(root: Path) -> Path:
    checkpoints = str(root / "checkpoints")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 4, "limit_train_batches": 6, "limit_val_batches": 1,
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False, "deterministic": True,
            "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning_cnet.callbacks.DepthRefinementCallback",
                 "init_args": {"refine_at": [1, 2], "noise_std": 0.1, "eval_batches": 1}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": checkpoints, "filename": "step-{step}", "save_top_k": -1,
                               "every_n_train_steps": 4}},
                {"class_path": "test_crash_resume.StepMarker"},
            ],
        },
        "checkpoint": {"dirpath": checkpoints},
        "model": {"class_path": "lightning_cnet.module.ContinuousNetClassifier",
                  "init_args": {"model": "cnet_digits", "scheme": "midpoint", "n_steps": 1, "T": 1.0, "lr": 0.05}},
        "data": {"class_path": "lightning_cnet.data.DigitsDataModule", "init_args": {"image_size": 8,
                                                                                    "batch_size": 32}},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "PYTHONWARNINGS": "ignore"}


def _fit(config: Path, *extra: str) -> None:
    result = subprocess.run([sys.executable, "-m", "lightning_cnet", "fit", "--config", str(config), *extra],
                            capture_output=True, text=True, timeout=600, env=_environment(), cwd=config.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def _killed_after(config: Path, step: int) -> None:
    """Run the fit and SIGKILL it as soon as it reports ``step`` (waiting on its output, not on a clock)."""
    process = subprocess.Popen([sys.executable, "-m", "lightning_cnet", "fit", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_environment(),
                               cwd=config.parent)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.strip() == f"STEP {step}":
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert any("Depth refinement at epoch 2" in line for line in seen), "killed before the second refinement"


def _final_state(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["global_step"] == 24
    return checkpoint["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    _fit(_config(root))
    return _final_state(root)


@pytest.mark.slow
@pytest.mark.parametrize("resume_from", ["last.ckpt", "step-step=16.ckpt"])
def test_a_run_killed_after_a_refinement_resumes_bit_identically(tmp_path, uninterrupted, resume_from) -> None:
    """Killed at step 17 (epoch 2, after its refinement): last.ckpt is the end of epoch 1, step-step=16 is the
    middle of epoch 2; both must lead to exactly the uninterrupted model, refinements included."""
    config = _config(tmp_path)
    _killed_after(config, 17)
    checkpoint = tmp_path / "checkpoints" / resume_from
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["global_step"] == {"last.ckpt": 12, "step-step=16.ckpt": 16}[resume_from]
    _fit(config, "--ckpt_path", str(checkpoint))
    resumed = _final_state(tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    different = [key for key, value in resumed.items() if not torch.equal(value, uninterrupted[key])]
    assert not different, different[:5]
    assert resumed["model.stages.0.resolution.n_steps"].item() == 4
