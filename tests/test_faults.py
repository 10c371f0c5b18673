"""Faults injected into ``lightning-cnet`` and ``lightning-cnet-analyze``: hostile checkpoints, huge resolutions,
out-of-range values, full disks, SIGTERM, two runs on one folder. Each test asserts the message, the exit status,
the files left behind and that nothing else changed."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_cnet import _atomic, cost
from lightning_cnet.analysis.cli import main as analyze
from lightning_cnet.cli import main

HERE = Path(__file__).resolve().parent
CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "accelerator": "cpu",
                "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                "num_sanity_val_steps": 0, "logger": {"init_args": {"name": "tiny"}}},
    "model": {"init_args": {"model": "cnet_digits", "scheme": "euler", "n_steps": 2, "lr": 0.05}},
    "data": {"class_path": "lightning_cnet.data.DigitsDataModule", "init_args": {"image_size": 8, "batch_size": 32}},
}


def files_under(path: Path) -> set[Path]:
    return {p.relative_to(path) for p in path.rglob("*")}


def one_error_line(capsys: pytest.CaptureFixture, prefix: str = "lightning-cnet: error: ") -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(prefix.split(":")[0] + ":")]
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1, lines
    return errors[0]


def run_main(entry, args: list[str], capsys: pytest.CaptureFixture, status: int = 2) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        entry(args)
    assert exit_info.value.code == status


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (K = 2): ``lightning_logs/tiny/version_0`` with config.yaml and checkpoints/last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    (root / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "--config", str(root / "tiny.yaml")])
    finally:
        os.chdir(cwd)
    run_dir = root / "lightning_logs" / "tiny" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    return run_dir


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# ---------------------------------------------------------------------- hostile checkpoints
HOSTILE = {
    "n_basis": (torch.tensor(2**20), "claims n_basis=1048576 but stores 2"),
    "n_steps": (torch.tensor(10**7), "n_steps=10000000 is too many steps per stage"),
    "T": (torch.tensor(1e300, dtype=torch.float64), "T=1e+300 is not valid"),
    "scheme": (torch.tensor([0xff, 0x00, 0x13, 0xfe], dtype=torch.uint8), "does not hold a UTF-8 name"),
}


def _crafted(run: Path, folder: Path, key: str) -> Path:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"][f"model.stages.1.resolution.{key}"] = HOSTILE[key][0]
    path = folder / f"crafted-{key}.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("key", list(HOSTILE))
def test_a_hostile_checkpoint_is_one_line_for_test_and_analyze(key, run, work, tmp_path, capsys) -> None:
    crafted = _crafted(run, tmp_path, key)
    start = time.perf_counter()
    run_main(main, ["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(crafted),
                    "--trainer.logger.init_args.save_dir", str(work / "logs")], capsys)
    error = one_error_line(capsys)
    assert HOSTILE[key][1] in error and "another model" in error and len(error) <= 200
    assert time.perf_counter() - start < 60  # the whole command; the load itself takes milliseconds (test_cost)
    assert files_under(work) == set()

    run_main(analyze, ["depth", "--ckpt_path", str(crafted), "--out", str(work / "out")], capsys)
    error = one_error_line(capsys, "lightning-cnet-analyze: error: ")
    assert str(crafted) in error and HOSTILE[key][1][:20] in error
    assert files_under(work) == set()


# ---------------------------------------------------------------------- out-of-range values
OUT_OF_RANGE = {
    "lr": (["--model.init_args.lr", "-1"], "lr=-1.0 is not valid: expected a finite number >= 0"),
    "label_smoothing": (["--model.init_args.label_smoothing", "2"], "label_smoothing=2.0 is not valid"),
    "momentum": (["--model.init_args.momentum", "-0.5"], "momentum=-0.5 is not valid"),
    "max_epochs": (["--trainer.max_epochs", "-5"], "trainer: `max_epochs` must be a non-negative integer or -1"),
    "min_epochs": (["--trainer.min_epochs", "-2"], "trainer.min_epochs=-2 is not valid"),
    "accumulate": (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches=0 is not valid"),
    "clip": (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val=-1 is not valid"),
    "limit": (["--trainer.limit_train_batches", "1.5"], "invalid value 1.5 for limit_train_batches"),
    "devices": (["--trainer.devices", "0"], "trainer: `Trainer(devices='0')` value is not a valid input"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_an_out_of_range_value_is_one_line_before_anything_is_written(case, work, capsys) -> None:
    arguments, message = OUT_OF_RANGE[case]
    run_main(main, ["fit", "--data.image_size", "8", *arguments], capsys)
    assert message in one_error_line(capsys)
    assert files_under(work) == set()


# ---------------------------------------------------------------------- step counts and refinements
def test_a_huge_step_count_is_refused_before_anything_is_built(run, work, capsys) -> None:
    start = time.perf_counter()
    run_main(main, ["fit", "--data.image_size", "8", "--model.init_args.n_steps", "100000"], capsys)
    assert "n_steps=100000 is too many steps per stage: expected at most 65536" in one_error_line(capsys)
    run_main(main, ["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" /
             "last.ckpt"), "--model.init_args.n_steps", "100000"], capsys)
    assert "evaluating at n_steps=100000: n_steps=100000 is too many steps" in one_error_line(capsys)
    assert time.perf_counter() - start < 60 and files_under(work) == set()


def test_training_that_does_not_fit_in_memory_is_refused_with_what_would(work, capsys, monkeypatch) -> None:
    """64 steps of cnet_digits at 32x32 and batch 64 keep about 930 MB of activations for backward; with 100 MB
    available the fit is refused before its folder exists."""
    monkeypatch.setattr(cost, "available_memory", lambda device=None: 100 * 2**20)
    run_main(main, ["fit", "--data.image_size", "32", "--data.batch_size", "64", "--model.init_args.n_steps", "64"],
             capsys)
    error = one_error_line(capsys)
    assert error.startswith("lightning-cnet: error: training (n_steps 64-64-64) does not fit in memory: about ")
    needed = float(error.split("about ")[1].split(" MB needed")[0])
    assert 800 < needed < 1100  # measured: 64 steps x 3 stages of activations, plus weights, gradients, momentum
    assert f"100.0 MB available on cpu; {0.9 * 100 / needed:.0%} of it fits: lower batch_size or n_steps, or " \
        "recompute_steps=True" in error
    assert files_under(work) == set()


class PlantForeignRun(pl.Callback):
    """Another run's folder appears beside this run's while it starts (a run started at the same time)."""

    def setup(self, trainer, pl_module, stage):
        foreign = Path("lightning_logs", "tiny", "version_1")
        foreign.mkdir(parents=True)
        (foreign / "theirs.txt").write_text("another run's file")


def test_a_refinement_schedule_that_cannot_fit_is_refused_and_only_this_runs_files_go(work, capsys,
                                                                                      monkeypatch) -> None:
    """29 refinements (2**29 steps per stage) are refused at setup, after the run created its folders: they are
    removed, and a folder another run created beside them is kept."""
    monkeypatch.syspath_prepend(str(HERE))
    config = {**CONFIG, "trainer": {**CONFIG["trainer"], "max_epochs": 30, "callbacks": [
        {"class_path": "test_faults.PlantForeignRun"},
        {"class_path": "lightning_cnet.callbacks.DepthRefinementCallback", "init_args": {"refine_at": list(range(29))}},
    ]}}
    (work / "refine.yaml").write_text(yaml.safe_dump(config))
    run_main(main, ["fit", "--config", str(work / "refine.yaml")], capsys)
    error = one_error_line(capsys)
    assert "29 refinement(s) ahead" in error and "n_steps=1073741824 is too many steps per stage" in error
    foreign = Path("lightning_logs", "tiny", "version_1")
    assert files_under(work) == {Path("refine.yaml"), Path("lightning_logs"), foreign.parent, foreign,
                                 foreign / "theirs.txt"}


# ---------------------------------------------------------------------- a full disk
def test_a_write_error_mid_fit_is_one_line_and_the_last_epoch_stays(work, capsys, monkeypatch) -> None:
    saves = {"count": 0}
    real_save = torch.save

    def fail_from_the_third(obj, handle, *args, **kwargs):  # epoch 0 writes best and last; epoch 1's best fails
        saves["count"] += 1
        if saves["count"] >= 3:
            handle.write(b"\x00" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(_atomic.torch, "save", fail_from_the_third)
    run_main(main, ["fit", "--data.image_size", "8", "--trainer.max_epochs", "3", "--trainer.limit_train_batches",
                    "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                    "--trainer.logger.init_args.name", "tiny", "--trainer.enable_progress_bar", "false"],
             capsys, status=1)
    error = one_error_line(capsys)
    assert "No space left on device" in error and error.endswith("the checkpoints written before are intact")
    checkpoints = work / "lightning_logs" / "tiny" / "version_0" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["best-epoch=0-val_acc=" + names[0].split("val_acc=")[1], "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0


# ---------------------------------------------------------------------- two runs on one folder
def _fixed_folder_config(work: Path) -> Path:
    config = {**CONFIG, "trainer": {**CONFIG["trainer"], "logger": False, "default_root_dir": str(work / "run")},
              "checkpoint": {"dirpath": str(work / "run" / "checkpoints")}}
    path = work / "fixed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_second_run_on_a_folder_in_use_or_finished_is_refused(work, capsys) -> None:
    config = _fixed_folder_config(work)
    (work / "run").mkdir()
    holder = os.open(work / "run", os.O_RDONLY)  # another run holds the folder (what a running fit does)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        run_main(main, ["fit", "--config", str(config)], capsys)
        error = one_error_line(capsys)
        assert error.startswith("lightning-cnet: error: run is in use by another lightning-cnet run")
        assert files_under(work) == {Path("fixed.yaml"), Path("run")}  # nothing created, nothing removed
    finally:
        os.close(holder)
    main(["fit", "--config", str(config)])  # the folder is free again
    before = {path: path.stat().st_mtime_ns for path in (work / "run").rglob("*")}
    run_main(main, ["fit", "--config", str(config)], capsys)
    error = one_error_line(capsys)
    assert error == ("lightning-cnet: error: run/checkpoints already holds checkpoints of another run: resume it with "
                     "--ckpt_path run/checkpoints/last.ckpt, or give this run its own folder (--checkpoint.dirpath)")
    assert {path: path.stat().st_mtime_ns for path in (work / "run").rglob("*")} == before


# ---------------------------------------------------------------------- SIGTERM
class StepMarker(pl.Callback):
    """Prints ``STEP <global step>`` after every optimizer step, for the parent process to wait on, and holds the
    run after ``pause_at`` until it receives SIGTERM (so that the parent can start a second run meanwhile)."""

    def __init__(self, pause_at: int = -1) -> None:
        self.pause_at = pause_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"STEP {trainer.global_step}", flush=True)
        deadline = time.monotonic() + 120
        while trainer.global_step == self.pause_at and not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_143_and_the_last_checkpoint_resumes(tmp_path, capsys) -> None:
    config = {**CONFIG, "trainer": {**CONFIG["trainer"], "max_epochs": 3, "limit_train_batches": 4, "logger": False,
                                    "default_root_dir": str(tmp_path / "run"),
                                    "callbacks": [{"class_path": "test_faults.StepMarker",
                                                   "init_args": {"pause_at": 6}}]},
              "checkpoint": {"dirpath": str(tmp_path / "run" / "checkpoints")}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lightning_cnet", "fit", "--config", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_environment(), cwd=tmp_path)
    for line in process.stdout:
        if line.strip() == "STEP 6":  # the middle of epoch 1
            # a second fit on the same folder, while the first runs, is refused in one line
            second = subprocess.run(command, capture_output=True, text=True, env=_environment(), cwd=tmp_path,
                                    timeout=300)
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith("lightning-cnet: error: ")
    assert "is in use by another lightning-cnet run" in second.stderr
    assert process.returncode == 143, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last_line.startswith("lightning-cnet: stopped by SIGTERM at epoch 1, global step ")
    assert last_line.endswith("of the last finished epoch with --ckpt_path run/checkpoints/last.ckpt")
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["epoch"] == 0 and stored["global_step"] == 4
    assert sorted(p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")) == []  # no temporary

    resumed = subprocess.run([*command, "--ckpt_path", str(checkpoint)], capture_output=True, text=True,
                             env=_environment(), cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(checkpoint, weights_only=True)
    assert final["epoch"] == 2 and final["global_step"] == 12


# ---------------------------------------------------------------------- the analysis command
def test_analysis_step_counts_are_refused_before_any_work(run, work, capsys) -> None:
    ckpt = str(run / "checkpoints" / "last.ckpt")
    run_main(analyze, ["manifestation", "--ckpt_path", ckpt, "--n_steps", "1000000", "--out", "out"], capsys)
    assert "--n_steps 1000000: n_steps=1000000 is too many steps per stage" in one_error_line(
        capsys, "lightning-cnet-analyze: error: ")
    run_main(analyze, ["export", "--ckpt_path", ckpt, "--scheme", "euler", "--n_steps", "5000", "--out", "m.pt2"],
             capsys)
    assert "exporting euler with n_steps=5000 unrolls 15000 residual-unit evaluations" in one_error_line(
        capsys, "lightning-cnet-analyze: error: ")
    assert files_under(work) == set()


def test_a_folder_given_as_checkpoint_is_named_as_such(run, work, capsys) -> None:
    run_main(main, ["test", "--config", str(run / "config.yaml"), "--ckpt_path", "."], capsys)
    assert one_error_line(capsys) == ("lightning-cnet: error: .: is a folder, not a checkpoint file (a run keeps them "
                                      "in checkpoints/, e.g. checkpoints/last.ckpt)")
    assert files_under(work) == set()


def test_analysis_folder_arguments_are_named_as_folders(run, work, capsys) -> None:
    run_main(analyze, ["depth", "--ckpt_path", str(run), "--out", "out"], capsys)
    assert one_error_line(capsys, "lightning-cnet-analyze: error: ") == (
        f"lightning-cnet-analyze: error: {run}: is a folder, not a checkpoint file (did you mean "
        f"{run / 'checkpoints' / 'last.ckpt'}?)")
    (work / "metrics.csv").write_text("epoch,step,val_acc\n0,10,0.5\n1,20,0.7\n")
    run_main(analyze, ["curve", "--metrics", "metrics.csv", "--out", "."], capsys)
    assert "--out .: is a folder; expected a file name, e.g. val_acc.png" in one_error_line(
        capsys, "lightning-cnet-analyze: error: ")
    assert files_under(work) == {Path("metrics.csv")}


def test_analysis_outputs_on_a_full_disk_are_one_line_and_removed(run, work, capsys, monkeypatch) -> None:
    """depth writes two CSV files and a PNG; the PNG finds the disk full: the CSV files and the folder it made go."""
    from lightning_cnet.analysis import _files

    real = _files.replace_atomically

    def full_for_png(path, write):
        if str(path).endswith(".png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(_files, "replace_atomically", full_for_png)
    run_main(analyze, ["depth", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", "deep/out"], capsys,
             status=1)
    assert one_error_line(capsys, "lightning-cnet-analyze: error: ") == (
        "lightning-cnet-analyze: error: cannot write deep/out/depth_profile.png: No space left on device; the files "
        "this command created were removed")
    assert files_under(work) == set()


def test_a_killed_compression_save_leaves_no_stale_temporary(run, work, capsys) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    saved = work / "small"
    saved.mkdir()
    stale = saved / f".last-K1-N1.ckpt.{_atomic._host()}.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    analyze(["compression", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--pairs", "1:1", "--save",
             str(saved), "--num_batches", "1", "--out", "out"])
    assert sorted(p.name for p in saved.iterdir()) == ["last-K1-N1.ckpt"]
