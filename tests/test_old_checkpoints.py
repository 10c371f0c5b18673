"""Checkpoints written by lightning-cnet 0.2.0 keep loading, resuming and evaluating the same.

``tests/fixtures/v0_2_0_digits.ckpt`` was written by ``lightning-cnet fit --config
tests/fixtures/v0_2_0_digits.yaml`` at version 0.2.0 (a model refined from 1 to 2 steps per stage, with the
refinement callback, the guard and the monitor in its callback states); ``v0_2_0_digits_logits.pt`` holds the logits
that version computed from it on a fixed input. Later versions may change the format they write, never what they read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from test_cli import run_cli

from lightning_cnet.models import get_model
from lightning_cnet.module import ContinuousNetClassifier

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "v0_2_0_digits.ckpt"
CONFIG = FIXTURES / "v0_2_0_digits.yaml"


def _reference() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "v0_2_0_digits_logits.pt", weights_only=True)


def test_load_from_checkpoint_gives_the_logits_of_0_2_0():
    reference = _reference()
    task = ContinuousNetClassifier.load_from_checkpoint(CHECKPOINT).eval()
    assert [(r.n_basis, r.n_steps, r.scheme, r.T) for r in task.model.resolution] == [(2, 2, "midpoint", 2.0)] * 3
    with torch.no_grad():
        torch.testing.assert_close(task(reference["input"]), reference["logits"], rtol=1e-5, atol=1e-6)


def test_a_fresh_coarse_backbone_loads_the_model_weights_of_0_2_0():
    reference = _reference()
    state = torch.load(CHECKPOINT, weights_only=True)["state_dict"]
    weights = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    net = get_model("cnet_digits", scheme="midpoint", n_steps=1, T=2.0)
    net.load_state_dict(weights)  # refines the one-step model to the checkpoint's two pieces on the way in
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(reference["input"]), reference["logits"], rtol=1e-5, atol=1e-6)


def test_the_cli_resumes_a_0_2_0_run_and_tests_it(tmp_path):
    checkpoint = tmp_path / "old.ckpt"
    shutil.copy(CHECKPOINT, checkpoint)
    fit = run_cli("fit", "--config", str(CONFIG), "--ckpt_path", str(checkpoint), "--trainer.max_epochs", "3",
                  "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    resumed = torch.load(next((tmp_path / "lightning_logs").rglob("last.ckpt")), weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["state_dict"]["model.stages.0.resolution.n_basis"].item() == 2  # no second refinement
    test = run_cli("test", "--config", str(CONFIG), "--ckpt_path", str(checkpoint),
                   "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test_acc" in test.stdout
