"""``lightning_logs/<name>/latest`` names the newest training run, so the README's paths hold on a second run."""

from __future__ import annotations

import warnings
from pathlib import Path

import yaml

import lightning_cnet.cli  # noqa: F401 - imported here, Lightning's log handler binds the session's stderr
from lightning_cnet import launcher
from lightning_cnet.latest_run import point_latest_at
from lightning_cnet.threads import THREADS_VARIABLE

TINY = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "accelerator": "cpu",
                "devices": 1, "enable_progress_bar": False, "logger": {"init_args": {"name": "tiny"}}},
    "model": {"init_args": {"model": "cnet_digits", "scheme": "euler", "n_steps": 1, "lr": 0.05}},
    "data": {"class_path": "lightning_cnet.data.DigitsDataModule", "init_args": {"image_size": 8}},
}


def test_the_link_points_at_the_newest_run_and_leaves_a_real_folder_alone(tmp_path) -> None:
    first, second = tmp_path / "version_0", tmp_path / "version_1"
    first.mkdir()
    assert point_latest_at(first).resolve() == first.resolve()
    assert point_latest_at(second).resolve() == second.resolve()
    assert (tmp_path / "latest").readlink() == Path("version_1")  # relative: the folder can move
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "version_0"]  # no temporary left
    elsewhere = tmp_path / "other"
    (elsewhere / "latest").mkdir(parents=True)
    assert point_latest_at(elsewhere / "version_0") is None and (elsewhere / "latest").is_dir()
    assert point_latest_at(tmp_path / "latest") is None


def test_readme_paths_through_latest_hold_on_a_second_run(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(THREADS_VARIABLE, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    runs = tmp_path / "lightning_logs" / "tiny"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            launcher.lightning_cnet_main(["fit", "--config", str(config)])
        assert (runs / "latest").resolve() == (runs / "version_1").resolve()
        launcher.lightning_cnet_main(["test", "--config", str(config), "--ckpt_path",
                                      "lightning_logs/tiny/latest/checkpoints/last.ckpt"])
    assert "test_acc" in capsys.readouterr().out
    assert (runs / "latest").resolve() == (runs / "version_1").resolve()  # evaluating does not move it
    assert not [w for w in seen if "dirpath has changed" in str(w.message) or "LeafSpec" in str(w.message)]
