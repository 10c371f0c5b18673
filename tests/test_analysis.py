"""Manifestation and compression studies: rows agree with evaluations done by hand, files are real."""

from __future__ import annotations

import csv

import pytest
import torch

from lightning_cnet import get_model
from lightning_cnet.analysis import (
    compression_sweep,
    evaluate,
    manifestation_sweep,
    plot_manifestation,
    plot_training_curve,
    write_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def trained_like_model() -> torch.nn.Module:
    model = get_model("cnet_digits", n_steps=4, skip_init=False)
    with torch.no_grad():
        for stage in model.stages:
            for piece in stage.unit.norm1.pieces:
                piece.running_mean.normal_(0, 0.2)
                piece.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(3)]


def _accuracy_by_hand(model: torch.nn.Module, batches: list) -> float:
    with torch.no_grad():
        hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def test_manifestation_rows_match_hand_evaluation_and_model_is_restored(trained_like_model, batches) -> None:
    before = trained_like_model.resolution
    rows = manifestation_sweep(trained_like_model, batches, schemes=["euler", "rk4"], n_steps=[1, 3],
                               progress=False)
    assert trained_like_model.resolution == before
    assert [(r["scheme"], r["n_steps"]) for r in rows] == [("euler", 1), ("euler", 3), ("rk4", 1), ("rk4", 3)]
    for row in rows:
        trained_like_model.set_manifestation(scheme=row["scheme"], n_steps=row["n_steps"])
        assert row["accuracy"] == pytest.approx(_accuracy_by_hand(trained_like_model, batches))
        assert row["function_evaluations"] == 3 * row["n_steps"] * {"euler": 1, "rk4": 4}[row["scheme"]]
        assert row["ms_per_batch"] > 0


def test_compression_rows_count_parameters_and_leave_the_model_alone(trained_like_model, batches) -> None:
    state = {k: v.clone() for k, v in trained_like_model.state_dict().items() if torch.is_tensor(v)}
    rows = compression_sweep(trained_like_model, batches, n_basis=[4, 2, 1], progress=False)
    per_piece = sum(p.numel() for stage in trained_like_model.stages for p in stage.parameters()) // 4
    total = sum(p.numel() for p in trained_like_model.parameters())
    assert [r["parameters"] for r in rows] == [total, total - 2 * per_piece, total - 3 * per_piece]
    assert rows[0]["accuracy"] == pytest.approx(evaluate(trained_like_model, batches)["accuracy"])
    for key, value in trained_like_model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, state[key]), key


def test_compression_refuses_a_finer_basis(trained_like_model, batches) -> None:
    with pytest.raises(ValueError, match="n_basis=8"):
        compression_sweep(trained_like_model, batches, n_basis=[8], progress=False)


def test_empty_data_is_an_error(trained_like_model) -> None:
    with pytest.raises(ValueError, match="no batches"):
        evaluate(trained_like_model, [])


def test_csv_and_plots_are_written(tmp_path, trained_like_model, batches) -> None:
    rows = manifestation_sweep(trained_like_model, batches, schemes=["euler"], n_steps=[1, 2], progress=False)
    table = write_csv(rows, tmp_path / "out" / "sweep.csv")
    with table.open() as handle:
        read = list(csv.DictReader(handle))
    assert [int(r["n_steps"]) for r in read] == [1, 2]
    picture = plot_manifestation(rows, tmp_path / "out" / "sweep.png", trained="euler 4")
    assert picture.read_bytes().startswith(PNG_MAGIC)


def test_training_curve_marks_refinements(tmp_path) -> None:
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "epoch,step,val_acc,refinement/epoch\n0,10,0.5,\n1,20,0.7,1\n2,30,0.8,\n3,40,0.9,3\n"
    )
    picture = plot_training_curve(metrics, tmp_path / "curve.png")
    assert picture.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="no values of 'test_acc'"):
        plot_training_curve(metrics, tmp_path / "other.png", metric="test_acc")


def test_analyze_command_reads_the_run_config_and_writes_tables(tmp_path, capsys) -> None:
    import pytorch_lightning as pl

    from lightning_cnet.analyze import main
    from lightning_cnet.data import DigitsDataModule
    from lightning_cnet.module import ContinuousNetClassifier

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "data:\n  class_path: lightning_cnet.data.DigitsDataModule\n  init_args: {image_size: 8, batch_size: 100}\n"
    )
    task = ContinuousNetClassifier("cnet_digits", scheme="rk4", n_steps=2)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=DigitsDataModule(image_size=8))
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")

    main(["manifestation", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--schemes", "euler",
          "--n_steps", "1", "2", "--out", str(tmp_path / "out")])
    with (tmp_path / "out" / "manifestation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["scheme"], int(r["n_steps"])) for r in rows] == [("euler", 1), ("euler", 2)]
    data = DigitsDataModule(image_size=8)
    data.setup("test")
    with task.model.manifestation(scheme="euler", n_steps=2):
        expected = evaluate(task.model, data.test_dataloader())["accuracy"]
    assert float(rows[1]["accuracy"]) == pytest.approx(expected)
    assert (tmp_path / "out" / "manifestation.png").read_bytes().startswith(PNG_MAGIC)

    with pytest.raises(SystemExit) as exit_info:
        main(["compression", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--n_basis", "4",
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "n_basis=4" in capsys.readouterr().err
