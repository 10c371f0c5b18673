"""What the commands say, in one line, when an optional package they would use is missing (hidden here)."""

from __future__ import annotations

import sys

import pytest
from pytorch_lightning.loggers import CSVLogger

import lightning_cnet.cli as cli

NOTE = ("lightning-cnet: tensorboard is not installed: the metrics go to metrics.csv in the run folder "
        "(pip install tensorboard for TensorBoard event files)")


def test_without_tensorboard_fit_says_where_the_metrics_go(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.chdir(tmp_path)
    trainers = []
    monkeypatch.setattr(cli.ContinuousNetCLI, "_run_subcommand", lambda self, name: trainers.append(self.trainer))
    cli.main(["fit", "--data.init_args.image_size", "8", "--trainer.enable_progress_bar", "false"])
    assert isinstance(trainers[0].logger, CSVLogger)
    assert capsys.readouterr().err.splitlines().count(NOTE) == 1


def test_with_tensorboard_nothing_is_said(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.ContinuousNetCLI, "_run_subcommand", lambda self, name: None)
    cli.main(["fit", "--data.init_args.image_size", "8", "--trainer.enable_progress_bar", "false"])
    assert NOTE not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["manifestation", "curve"])
def test_without_matplotlib_the_studies_stop_before_any_work(tmp_path, monkeypatch, capsys, command) -> None:
    from lightning_cnet.analysis.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "out"
    arguments = {"manifestation": ["--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(out)],
                 "curve": ["--metrics", str(tmp_path), "--out", str(out / "curve.png")]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *arguments])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "lightning-cnet-analyze: error: the figures need matplotlib, a dependency of lightning-cnet that is not "
        "installed here: pip install matplotlib"]
    assert not out.exists()
