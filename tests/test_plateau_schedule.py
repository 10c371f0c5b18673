"""PlateauSchedule: decisions on hand-computed metric sequences, its state, and a fit and a resume that obey it."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from refinement_support import TinyDigits, make_task, n_steps, trainer_options

from lightning_cnet.callbacks import DepthRefinementCallback, PlateauSchedule
from lightning_cnet.module import ContinuousNetClassifier


def decisions(values, **options) -> list[int]:
    """Feed one value per epoch; return the epochs at whose start a refinement was decided."""
    schedule = PlateauSchedule("metric", **options)
    for epoch, value in enumerate(values):
        schedule.observe(epoch, value)
    return schedule.epochs


# Each case worked by hand, epoch by epoch (best / wait after the epoch's validation):
@pytest.mark.parametrize(("values", "options", "expected"), [
    # e0 best .5; e1 .6 better; e2 .6 not better -> wait 1 = patience: refine at 3; e3 .7 better;
    # e4 .65 -> refine at 5; e5 .66 < .7 -> refine at 6
    ([0.5, 0.6, 0.6, 0.7, 0.65, 0.66], {}, [3, 5, 6]),
    # the same with at most one refinement
    ([0.5, 0.6, 0.6, 0.7, 0.65, 0.66], {"max_refinements": 1}, [3]),
    # min mode, patience 2, min_delta 0.1: e1 .95 is not below 1.0 - 0.1 (wait 1); e2 .8 is (best .8);
    # e3 .75 and e4 .74 are not below .7 (wait 1, 2): refine at 5; e5 .5 is better
    ([1.0, 0.95, 0.8, 0.75, 0.74, 0.5], {"mode": "min", "patience": 2, "min_delta": 0.1}, [5]),
    # cooldown 1: e1 .5 ties -> refine at 2; e2 is ignored; e3 .4 -> refine at 4; e4 is ignored
    ([0.5, 0.5, 0.4, 0.4, 0.4], {"cooldown": 1}, [2, 4]),
    # min_delta 0.05: e1 .54 is not above .5 + .05 -> refine at 2; e2 .58 is (best .58); e3 .6 is not -> refine at 4
    ([0.5, 0.54, 0.58, 0.6, 0.7], {"min_delta": 0.05}, [2, 4]),
    # a NaN never improves
    ([0.5, math.nan, 0.9], {}, [2]),
    # always improving: never refines
    ([0.1, 0.2, 0.3, 0.4], {"patience": 1}, []),
])
def test_decisions_match_a_hand_count(values, options, expected):
    assert decisions(values, **options) == expected


def test_validation_runs_while_a_refinement_waits_change_nothing():
    schedule = PlateauSchedule(patience=1)
    assert [schedule.observe(0, value) for value in (0.5, 0.4, 0.3)] == [False, True, False]
    assert schedule.epochs == [1] and schedule.wait == 0 and schedule.best == 0.5
    assert [schedule.target_level(epoch) for epoch in range(3)] == [0, 1, 1]
    assert schedule.target_level(5, cap=0) == 0


def test_state_round_trip_continues_like_an_uninterrupted_schedule():
    values = [0.5, 0.6, 0.6, 0.7, 0.65, 0.66, 0.8, 0.79]
    first = PlateauSchedule(patience=1, cooldown=1)
    for epoch, value in enumerate(values[:3]):
        first.observe(epoch, value)
    resumed = PlateauSchedule(patience=1, cooldown=1)
    resumed.load_state_dict(first.state_dict())
    for epoch, value in enumerate(values[3:], start=3):
        resumed.observe(epoch, value)
    assert resumed.epochs == decisions(values, patience=1, cooldown=1) == [3, 5, 8]


@pytest.mark.parametrize(("options", "name"), [
    ({"mode": "up"}, "mode"), ({"patience": 0}, "patience"), ({"patience": 1.5}, "patience"),
    ({"min_delta": -0.1}, "min_delta"), ({"cooldown": -1}, "cooldown"), ({"max_refinements": -1}, "max_refinements"),
    ({"monitor": ""}, "monitor"),
])
def test_bad_arguments_name_themselves(options, name):
    with pytest.raises(ValueError, match=name):
        PlateauSchedule(**options)


def test_callback_refuses_max_refinements_beside_a_plateau_schedule():
    with pytest.raises(ValueError, match="max_refinements"):
        DepthRefinementCallback(PlateauSchedule(), max_refinements=2)


# ---------------------------------------------------------------------- through Lightning
#: The metric the scripted task logs after the validation of each epoch, and the refinements it must cause with
#: patience 1: e1 ties e0 -> refine at 2; e2 is better; e3 ties -> refine at 4.
SCRIPT = [0.5, 0.5, 0.6, 0.6, 0.7]
EXPECTED = [2, 4]


class ScriptedTask(ContinuousNetClassifier):
    """Logs ``scripted``: ``SCRIPT[epoch]`` (the same on every run, whatever the weights)."""

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("scripted", SCRIPT[self.current_epoch])


def plateau_callback() -> DepthRefinementCallback:
    return DepthRefinementCallback(PlateauSchedule("scripted", patience=1), evaluate=False, verbose=False)


def test_fit_refines_where_the_metric_stalls():
    task = make_task(ScriptedTask)
    callback = plateau_callback()
    pl.Trainer(**trainer_options(callbacks=[callback], max_epochs=5, limit_train_batches=2,
                                 limit_val_batches=1)).fit(task, datamodule=TinyDigits())
    assert [entry["epoch"] for entry in callback.history] == EXPECTED
    assert n_steps(task) == [4, 4, 4]
    assert callback.state_dict()["schedule"]["decisions"] == EXPECTED


def test_a_trainer_that_never_validates_is_refused():
    trainer = pl.Trainer(**trainer_options(callbacks=[plateau_callback()], limit_val_batches=0,
                                           limit_train_batches=1))
    with pytest.raises(MisconfigurationException, match="limit_val_batches=0"):
        trainer.fit(make_task(ScriptedTask), datamodule=TinyDigits())


def test_a_metric_that_is_not_logged_is_named():
    callback = DepthRefinementCallback(PlateauSchedule("val_f1"), evaluate=False)
    trainer = pl.Trainer(**trainer_options(callbacks=[callback], limit_train_batches=1, limit_val_batches=1))
    with pytest.raises(RuntimeError, match="'val_f1'.*val_acc"):
        trainer.fit(make_task(), datamodule=TinyDigits())


@pytest.mark.parametrize("checkpoint", ["epoch=1.ckpt", "epoch=2.ckpt"])
def test_resume_refines_where_the_uninterrupted_run_did(tmp_path, checkpoint):
    """The checkpoint of epoch 1 is written after the decision to refine at 2: the resumed run must refine there,
    though it never sees the metric of epoch 1 again (Lightning does not restore ``callback_metrics``)."""
    options = dict(max_epochs=5, limit_train_batches=2, limit_val_batches=1)
    pl.seed_everything(0)
    task = make_task(ScriptedTask)
    callback = plateau_callback()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    pl.Trainer(**trainer_options(callbacks=[callback, saver], enable_checkpointing=True, **options)).fit(
        task, datamodule=TinyDigits())
    saved = torch.load(tmp_path / checkpoint, weights_only=False)["callbacks"][callback.state_key]
    assert saved["schedule"]["decisions"] == [2]

    pl.seed_everything(123)
    resumed_task = make_task(ScriptedTask)
    resumed = plateau_callback()
    pl.Trainer(**trainer_options(callbacks=[resumed], **options)).fit(
        resumed_task, datamodule=TinyDigits(), ckpt_path=tmp_path / checkpoint)
    assert [entry["epoch"] for entry in resumed.history] == [entry["epoch"] for entry in callback.history] == EXPECTED
    assert resumed.schedule.state_dict() == callback.schedule.state_dict()
    final, expected = resumed_task.state_dict(), task.state_dict()
    assert all(torch.equal(final[key], expected[key]) for key in expected)


class RankDependentTask(ContinuousNetClassifier):
    """Rank 0 logs ``SCRIPT``; other ranks log a metric that always improves (and would never refine), unsynced."""

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        value = SCRIPT[self.current_epoch] if self.global_rank == 0 else float(self.current_epoch)
        self.log("scripted", value, sync_dist=False)


@pytest.mark.slow
def test_ddp_ranks_follow_rank_zero_decisions():
    from test_refinement_ddp import RankAgreement

    task = make_task(RankDependentTask)
    trainer = pl.Trainer(**trainer_options(strategy="ddp_spawn", devices=2, max_epochs=5, limit_train_batches=2,
                                           limit_val_batches=1, callbacks=[plateau_callback(), RankAgreement()]))
    trainer.fit(task, datamodule=TinyDigits())
    assert n_steps(task) == [4, 4, 4]  # both ranks refined at 2 and 4, as rank 0's metric decided


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_cli_config_takes_a_plateau_schedule(tmp_path, monkeypatch):
    """``refine_at`` given as a ``class_path`` in YAML; a ``min_delta`` no epoch can beat refines after epoch 1."""
    import yaml

    from lightning_cnet.cli import main

    callback = {"class_path": "lightning_cnet.callbacks.DepthRefinementCallback", "init_args": {"refine_at": {
        "class_path": "lightning_cnet.callbacks.PlateauSchedule",
        "init_args": {"monitor": "val_acc", "patience": 1, "min_delta": 2.0}}}}
    config = {"trainer": {"max_epochs": 3, "limit_train_batches": 2, "limit_val_batches": 1,
                          "enable_progress_bar": False, "callbacks": [callback]},
              "data": {"class_path": "lightning_cnet.data.DigitsDataModule", "init_args": {"image_size": 8}}}
    (tmp_path / "plateau.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(tmp_path / "plateau.yaml")])
    state = torch.load(tmp_path / "lightning_logs" / "default" / "version_0" / "checkpoints" / "last.ckpt",
                       weights_only=False)
    saved = next(value for key, value in state["callbacks"].items() if key.startswith("DepthRefinementCallback"))
    assert saved["schedule"]["decisions"] == [2, 3] and [entry["epoch"] for entry in saved["history"]] == [2]
    assert state["state_dict"]["model.stages.0.resolution.n_steps"].item() == 2
