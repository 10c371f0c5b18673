"""The private names of Lightning and jsonargparse the package relies on, where they offer no public way, and the
LightningCLI hooks the command line is built on: each test fails when an upgrade renames or reshapes one, so that the
adapter using it is revisited instead of silently degrading."""

from __future__ import annotations

import inspect
from typing import Any, NoReturn

import pytest
import pytorch_lightning as pl
from jsonargparse import ArgumentParser
from pytorch_lightning.callbacks import StochasticWeightAveraging, WeightAveraging
from pytorch_lightning.cli import LightningCLI

from lightning_cnet._run_folders import slurm_resume_path


def test_the_slurm_resume_checkpoint_is_found_where_lightning_looks(tmp_path) -> None:
    """``_run_folders.slurm_resume_path`` reads ``Trainer._checkpoint_connector._hpc_resume_path``: the newest
    ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``, or ``None``."""
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    assert slurm_resume_path(trainer) is None
    for version in (1, 3):
        (tmp_path / f"hpc_ckpt_{version}.ckpt").write_bytes(b"")
    assert slurm_resume_path(trainer) == str(tmp_path / "hpc_ckpt_3.ckpt")


@pytest.mark.parametrize("callback", [StochasticWeightAveraging(swa_lrs=0.1), WeightAveraging()],
                         ids=lambda callback: type(callback).__name__)
def test_weight_averaging_callbacks_keep_their_copy_in_average_model(callback: pl.Callback) -> None:
    """The refinement callback refines the averaged copy that Lightning's weight-averaging callbacks keep as
    ``_average_model`` (``callbacks/depth_refinement.py``)."""
    assert "_average_model" in vars(callback)


class _RecordingParser(ArgumentParser):
    """Records what jsonargparse hands to ``error``."""

    calls: list[tuple[str, Exception | None]] = []

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        type(self).calls.append((message, ex))
        raise ValueError(message)


def test_jsonargparse_hands_error_its_exception_and_the_subcommand_parser() -> None:
    """``cli._Parser.error`` takes jsonargparse's exception as ``ex`` and reads the parser of a subcommand from
    ``ex.subcommand_parser`` when one of its options is not accepted."""
    assert "ex" in inspect.signature(ArgumentParser.error).parameters
    parser = _RecordingParser(exit_on_error=False)
    subcommands = parser.add_subcommands()
    fit = ArgumentParser()
    fit.add_argument("--max_epochs", type=int, default=1)
    subcommands.add_subcommand("fit", fit)
    _RecordingParser.calls = []
    with pytest.raises(ValueError):
        parser.parse_object({"subcommand": "fit", "fit": {"max_epoch": 2}})
    message, ex = _RecordingParser.calls[-1]
    assert "max_epoch" in message and getattr(ex, "subcommand_parser", None) is fit


HOOKS = {
    "parse_arguments": ["self", "parser", "args"],
    "before_instantiate_classes": ["self"],
    "instantiate_classes": ["self"],
    "after_instantiate_classes": ["self"],
    "instantiate_trainer": ["self", "kwargs"],
    "init_parser": ["self", "kwargs"],
    "add_arguments_to_parser": ["self", "parser"],
    "configure_optimizers": ["lightning_module", "optimizer", "lr_scheduler"],
}


@pytest.mark.parametrize("name", list(HOOKS))
def test_the_lightning_cli_hooks_the_command_line_overrides_keep_their_signature(name: str) -> None:
    assert list(inspect.signature(getattr(LightningCLI, name)).parameters) == HOOKS[name]


def test_lightning_cli_runs_before_subcommand_hooks_and_takes_callbacks_from_trainer_defaults(tmp_path) -> None:
    """The command line claims its folders in ``before_<subcommand>`` and adds its run callbacks through
    ``trainer_defaults["callbacks"]`` read when the Trainer is built."""
    seen: list[Any] = []

    class Marker(pl.Callback):
        pass

    class CLI(LightningCLI):
        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [Marker()]}
            return super().instantiate_trainer(**kwargs)

        def before_validate(self) -> None:
            seen.append([type(cb).__name__ for cb in self.trainer.callbacks])

    from lightning_cnet.data import DigitsDataModule
    from lightning_cnet.module import ContinuousNetClassifier

    CLI(ContinuousNetClassifier, DigitsDataModule, args=[
        "validate", "--data.image_size", "8", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "1", f"--trainer.default_root_dir={tmp_path}"])
    assert len(seen) == 1 and "Marker" in seen[0]
