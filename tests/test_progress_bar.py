"""The command line's progress bars: counts shown as integers, the rich bar within 80 columns."""

from __future__ import annotations

import io

import pytest
import pytorch_lightning as pl
import torch

from lightning_cnet.data import DigitsDataModule
from lightning_cnet.module import ContinuousNetClassifier
from lightning_cnet.progress_bar import CompactRichProgressBar, CompactTQDMProgressBar, compact_metrics


def test_compact_metrics() -> None:
    shown = compact_metrics({"v_num": 3, "n_steps": 8.0, "nfe": torch.tensor(48.0), "train_loss_step": 0.412,
                             "val_acc": 0.857, "train_loss_epoch": 0.455, "lr": 1.0, "bad": float("nan")})
    assert shown == {"n_steps": "8", "nfe": "48", "train_loss": 0.412, "val_acc": 0.857, "lr": "1",
                     "bad": shown["bad"]}
    assert shown["bad"] != shown["bad"]  # nan stays a number
    assert compact_metrics({"val_loss_epoch": 0.5}) == {"val_loss_epoch": 0.5}  # no step twin: kept as it is


def _fit(bar: pl.Callback) -> pl.Trainer:
    task = ContinuousNetClassifier("cnet_digits", scheme="midpoint", n_steps=2, lr=0.05)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[bar])
    trainer.fit(task, datamodule=DigitsDataModule(image_size=8, batch_size=16))
    return trainer


def test_rich_bar_shows_integers_within_80_columns(monkeypatch) -> None:
    rich = pytest.importorskip("rich")
    from rich.console import Console

    monkeypatch.setattr(rich, "_console", None)  # the bar reconfigures rich's global console; put it back after
    bar = CompactRichProgressBar(leave=True, console_kwargs={"width": 80, "file": io.StringIO(),
                                                             "force_terminal": True})
    _fit(bar)
    out = io.StringIO()
    Console(width=80, file=out, color_system=None).print(bar.progress.make_tasks_table([bar.train_progress_bar]))
    lines = out.getvalue().rstrip("\n").splitlines()
    text = " ".join(lines)
    assert "n_steps: 2" in text and "nfe: 12" in text and "train_loss: " in text, lines
    assert "v_num" not in text and "loss_step" not in text and "loss_epoch" not in text and "2.000" not in text
    assert len(lines) <= 2 and max(len(line.rstrip()) for line in lines) <= 80, lines


def test_tqdm_bar_shows_integers(capsys) -> None:
    bar = CompactTQDMProgressBar()
    trainer = _fit(bar)
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert shown["n_steps"] == "2" and shown["nfe"] == "12" and "v_num" not in shown


def test_the_cli_uses_the_compact_bar_unless_another_is_configured(tmp_path, monkeypatch) -> None:
    import lightning_cnet.cli as cli

    seen = []
    monkeypatch.setattr(cli.ContinuousNetCLI, "_run_subcommand", lambda self, name: seen.append(self.trainer))
    monkeypatch.chdir(tmp_path)
    base = ["fit", "--data.init_args.image_size", "8", "--trainer.logger", "false"]
    cli.main(base)
    cli.main([*base, "--trainer.callbacks+=pytorch_lightning.callbacks.TQDMProgressBar"])
    bars = [trainer.progress_bar_callback for trainer in seen]
    assert isinstance(bars[0], CompactRichProgressBar)
    assert type(bars[1]) is pl.callbacks.TQDMProgressBar
