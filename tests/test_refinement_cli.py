"""DepthRefinementCallback through the ``lightning-cnet`` command line: YAML callback, parse-time optimizer, resume."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("lightning_cnet.cli")

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 2,
        "logger": False, "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "callbacks": [{
            "class_path": "lightning_cnet.callbacks.DepthRefinementCallback",
            "init_args": {"refine_at": [1, 2], "noise_std": 0.1, "eval_batches": 1},
        }],
    },
    "model": {"class_path": "lightning_cnet.module.ContinuousNetClassifier",
              "init_args": {"model": "cnet_digits", "scheme": "euler", "n_steps": 1}},
    "data": {"class_path": "lightning_cnet.data.DigitsDataModule", "init_args": {"image_size": 8, "batch_size": 32}},
    # LightningCLI builds this optimizer once, at parse time, from the coarse model's tensors.
    "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
}


def lightning_cnet(*args: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lightning_cnet", *args], capture_output=True, text=True,
                            timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def conv_pieces(checkpoint: dict) -> int:
    return sum(1 for key in checkpoint["state_dict"] if key.startswith("model.stages.0.unit.conv1.weight."))


@pytest.mark.slow
def test_yaml_callback_refines_and_resumes_with_ckpt_path(tmp_path):
    config = {**CONFIG, "checkpoint": {"dirpath": str(tmp_path / "ckpt")}}
    config["trainer"] = {**CONFIG["trainer"], "default_root_dir": str(tmp_path)}
    (tmp_path / "input.yaml").write_text(yaml.safe_dump(config))
    lightning_cnet("fit", "--config", str(tmp_path / "input.yaml"), cwd=tmp_path)
    first = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert conv_pieces(first) == 2 and first["epoch"] == 1

    lightning_cnet("fit", "--config", str(tmp_path / "input.yaml"), "--trainer.max_epochs", "3",
                   "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--trainer.default_root_dir",
                   str(tmp_path / "resumed"), cwd=tmp_path)
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2 and conv_pieces(resumed) == 4
    history = resumed["callbacks"]["DepthRefinementCallback{'refine_at': [1, 2]}"]["history"]
    assert [entry["epoch"] for entry in history] == [1, 2]
    # the optimizer saved at the end trains one tensor per model parameter, with matching momentum shapes
    parameters = [v for k, v in resumed["state_dict"].items() if not k.endswith(("running_mean", "running_var",
                                                                                   "num_batches_tracked"))
                  and "metrics" not in k and ".resolution." not in k]
    optimizer = resumed["optimizer_states"][0]
    assert len(optimizer["param_groups"][0]["params"]) == len(parameters)
    momentum_shapes = [optimizer["state"][i]["momentum_buffer"].shape for i in sorted(optimizer["state"])]
    assert momentum_shapes == [p.shape for p in parameters]
