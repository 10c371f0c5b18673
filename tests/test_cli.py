"""The ``lightning-cnet`` command line end to end: fit, test on the checkpoint, and bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnet.cli import ContinuousNetCLI, main
from lightning_cnet.metrics_reader import read_scalars
from lightning_cnet.module import ContinuousNetClassifier

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                "logger": {"init_args": {"name": "tiny"}}},
    "model": {"init_args": {"model": "cnet_digits", "scheme": "euler", "n_steps": 1, "lr": 0.05}},
    "data": {"class_path": "lightning_cnet.data.DigitsDataModule", "init_args": {"image_size": 8}},
}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lightning_cnet ARGS`` in ``cwd`` (the console script runs the same ``main``)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lightning_cnet", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_accuracy(output: str) -> float:
    """The ``test_acc`` figure of Lightning's results table (plain or rich)."""
    match = re.search(r"test_acc\b[\s│|]+([0-9.]+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


test_accuracy.__test__ = False  # a helper, not a test


def files_under(path: Path) -> set[Path]:
    return {p.relative_to(path) for p in path.rglob("*")}


def test_fit_then_test_on_the_checkpoint(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    fit = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "tiny" / "version_0"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file() and list((run_dir / "checkpoints").glob("best-epoch=*.ckpt"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["scheme"] == "euler" and saved["trainer"]["max_epochs"] == 2
    hparams = torch.load(checkpoint, weights_only=False)["hyper_parameters"]
    assert hparams["num_classes"] == 10 and hparams["in_chans"] == 1  # taken from the data

    test = run_cli("test", "--config", str(config), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    accuracy = test_accuracy(test.stdout)
    assert 0.5 < accuracy <= 1.0  # 10 classes: chance is 0.1; two epochs of a small ResNet reach ~0.9


def test_help_lists_the_subcommands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("fit", "validate", "test", "predict"))
    assert files_under(tmp_path) == set()


def test_bad_input_from_the_console_script_is_one_line_and_exit_2(tmp_path):
    result = run_cli("fit", "--model.init_args.model", "cnet_foo", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith("lightning-cnet: error: ")
    assert "'cnet_foo'" in errors[0] and "cnet_digits" in errors[0]
    assert files_under(tmp_path) == set()


def _another_models_checkpoint(path: Path) -> Path:
    """A Lightning checkpoint of a 3-channel CIFAR-sized ContinuousNet (trained for one step)."""
    pl.seed_everything(0)
    data = TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=path)
    trainer.fit(ContinuousNetClassifier("cnet_cifar"), DataLoader(data, batch_size=8))
    checkpoint = path / "cifar.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


BAD_INPUTS = {
    "unknown_model": (["fit", "--model.init_args.model", "cnet_foo"], ["cnet_foo", "cnet_digits"]),
    "unknown_yaml_key": (["fit", "--config", "{bad_yaml}"], ["n_stepz", "n_steps"]),
    "unknown_trainer_key": (["fit", "--trainer.max_epoch", "1"], ["trainer.max_epoch", "trainer.max_epochs"]),
    "unknown_class": (["fit", "--model", "lightning_cnet.module.NoSuchClassifier"], ["model", "NoSuchClassifier"]),
    "num_classes": (["fit", "--model.init_args.num_classes", "5"], ["num_classes=5", "num_classes=10"]),
    "another_model": (["test", "--ckpt_path", "{other_ckpt}"], ["model.stem.weight", "cnet_cifar"]),
    "missing_dataset": (["fit", "--data", "lightning_cnet.data.CIFAR10DataModule", "--data.init_args.data_dir",
                         "{missing}"], ["{missing}"]),
    "unknown_model_kwarg": (["fit", "--model.init_args.model_kwargs.n_stepz", "2"],
                            ["model_kwargs has 'n_stepz'", "cnet_digits", "n_steps"]),
    "not_a_module": (["fit", "--model", "torch.nn.Linear"], ["model", "subclass of LightningModule"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_naming_the_problem(case, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "bad.yaml").write_text("model:\n  init_args:\n    n_stepz: 3\n")
    paths = {"bad_yaml": str(inputs / "bad.yaml"), "missing": str(inputs / "no_cifar"), "other_ckpt": ""}
    if case == "another_model":
        paths["other_ckpt"] = str(_another_models_checkpoint(inputs))
    args, expected = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(**paths) for arg in args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-cnet: error: ")]
    assert len(errors) == 1
    for text in expected:
        assert text.format(**paths) in errors[0], errors[0]
    assert files_under(work) == set(), "a failed run left files behind"


@pytest.mark.slow
def test_digits_config_reaches_its_accuracy(tmp_path):
    fit = run_cli("fit", "--config", str(REPO / "configs" / "digits.yaml"), "--trainer.enable_progress_bar", "false",
                  cwd=tmp_path, timeout=1800)
    assert fit.returncode == 0, fit.stderr[-3000:]
    checkpoint = tmp_path / "lightning_logs" / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    test = run_cli("test", "--config", str(REPO / "configs" / "digits.yaml"), "--ckpt_path", str(checkpoint),
                   cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert test_accuracy(test.stdout) >= 0.975


# ---------------------------------------------------------------------- checkpoints and explicit options
def _fit_tiny(work: Path, *arguments: str, **overrides) -> Path:
    config = {**TINY_CONFIG, "trainer": {**TINY_CONFIG["trainer"], "max_epochs": 3, "limit_train_batches": 3,
                                         "limit_val_batches": 2, "enable_model_summary": False}}
    config["model"] = {"init_args": {**TINY_CONFIG["model"]["init_args"], **overrides}}
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), *arguments])
    return path


def test_last_checkpoint_is_the_state_at_the_last_epoch_end(tmp_path, monkeypatch):
    """The best checkpoint by the *lowest* validation accuracy is the untrained epoch 0, while last.ckpt must hold
    epoch 2 (Lightning's save_last alone would leave it at the last improvement, epoch 0)."""
    monkeypatch.chdir(tmp_path)
    _fit_tiny(tmp_path, "--checkpoint.mode", "min")
    checkpoints = tmp_path / "lightning_logs" / "tiny" / "version_0" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2
    (best,) = checkpoints.glob("best-*.ckpt")
    assert best.name.startswith("best-epoch=0-") and torch.load(best, weights_only=True)["epoch"] == 0


def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _fit_tiny(tmp_path)
    last = tmp_path / "lightning_logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    not_lightning = tmp_path / "tensors.ckpt"
    torch.save({"weights": torch.ones(3)}, not_lightning)
    for path, problem in ((truncated, "not a readable checkpoint"), (garbage, "not a readable checkpoint"),
                          (not_lightning, "not a Lightning checkpoint"), (tmp_path / "missing.ckpt", "no such")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["test", "--config", str(config), "--ckpt_path", str(path)])
        assert exit_info.value.code == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith(f"lightning-cnet: error: {path}: {problem}"), errors
        assert len(errors[0]) <= 200


def test_an_explicit_scheme_is_applied_when_testing_and_refused_when_resuming(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _fit_tiny(tmp_path)
    last = tmp_path / "lightning_logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    tested = run_cli("test", "--config", str(config), "--ckpt_path", str(last), "--model.init_args.scheme", "rk4",
                     "--model.init_args.n_steps", "3", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "evaluating at rk4, 3-3-3 steps per stage as asked (the checkpoint was trained with euler, 1-1-1)" in \
        tested.stderr + tested.stdout
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--ckpt_path", str(last), "--model.init_args.scheme", "rk4"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "resuming fit cannot change the manifestation to scheme=rk4" in error[0]


def test_model_kwargs_and_the_flat_form_configure_the_same_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flat = ContinuousNetCLI(["--model.init_args.scheme", "rk4", "--model.init_args.T", "2.0"], run=False).model
    nested = ContinuousNetCLI(["--model.init_args.model_kwargs", "{scheme: rk4, T: 2.0}"], run=False).model
    assert flat.model.resolution == nested.model.resolution and nested.model.resolution[0].scheme == "rk4"
    both = ContinuousNetCLI(["--model.init_args.model_kwargs.scheme", "euler", "--model.init_args.scheme", "rk4"],
                            run=False)
    assert both.model.model.resolution[0].scheme == "rk4"  # the flat form wins: old checkpoints' hyperparameters
    assert (both.config.checkpoint.monitor, both.config.checkpoint.mode) == ("val_acc", "max")


def test_an_explicit_scheme_in_model_kwargs_is_applied_when_testing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _fit_tiny(tmp_path)
    last = tmp_path / "lightning_logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    tested = run_cli("test", "--config", str(config), "--ckpt_path", str(last), "--model.init_args.model_kwargs.scheme",
                     "midpoint", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "evaluating at midpoint, 1-1-1 steps per stage as asked (the checkpoint was trained with euler, 1-1-1)" in \
        tested.stderr + tested.stdout


def test_any_lightning_module_holding_a_continuousnet(tmp_path, monkeypatch):
    """A user's module and data (no num_classes, no monitor attribute) with the refinement callback from YAML."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = {"seed_everything": 0,
              "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                          "enable_model_summary": False, "logger": {"init_args": {"name": "user"}},
                          "callbacks": [{"class_path": "lightning_cnet.callbacks.DepthRefinementCallback",
                                         "init_args": {"refine_at": [1]}}]},
              "model": {"class_path": "test_any_module.DenseRegression"},
              "data": {"class_path": "test_any_module.SquaresData"}}
    (tmp_path / "user.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "user.yaml")])
    run = tmp_path / "lightning_logs" / "user" / "version_0"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["state_dict"]["backbone.stages.0.resolution.n_steps"].item() == 2
    assert not list((run / "checkpoints").glob("best-*"))  # nothing to monitor: the last checkpoint only
    assert len(read_scalars(run, "refinement/val_loss_before")) == 1
    main(["validate", "--config", str(tmp_path / "user.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])


def test_a_bad_step_count_is_named_as_such(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--model.init_args.n_steps", "0"])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "n_steps=0 is not valid" in error[0] and "n_basis" not in error[0]


class FailingCallback(pl.Callback):
    """A defect, not bad input: the CLI must keep the traceback and the run directory."""

    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("a defect in a callback")


def test_a_defect_keeps_its_traceback_and_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = {**TINY_CONFIG, "trainer": {**TINY_CONFIG["trainer"], "max_epochs": 1, "limit_train_batches": 1,
                                         "limit_val_batches": 1,
                                         "callbacks": [{"class_path": "test_cli.FailingCallback"}]}}
    (tmp_path / "failing.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RuntimeError, match="a defect in a callback"):
        main(["fit", "--config", str(tmp_path / "failing.yaml")])
    assert (tmp_path / "lightning_logs" / "tiny" / "version_0").is_dir()


@pytest.mark.parametrize("module_name", ["_cli_common", "_parser_messages", "_run_folders"])
def test_docstring_examples(module_name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"lightning_cnet.{module_name}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
