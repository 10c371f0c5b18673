"""The studies against hand computations and known orders, and the lightning-cnet-analyze command end to end."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lightning_cnet import ContinuousNet, get_model
from lightning_cnet.analysis import (
    as_batches,
    compression_sweep,
    convergence_study,
    depth_profile,
    evaluate,
    export_onnx,
    export_program,
    manifestation_sweep,
    step_grid,
)
from lightning_cnet.analysis.plots import plot_compression, plot_convergence, plot_depth_profile, plot_manifestation
from lightning_cnet.layers import TimeConv2d
from lightning_cnet.units import ResidualUnit


@pytest.fixture
def trained_like_model(randomize) -> ContinuousNet:
    model = randomize(get_model("cnet_digits", n_steps=4, scheme="midpoint"))
    return model.eval()


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return as_batches([(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
                       for _ in range(3)])


def _accuracy_by_hand(model: torch.nn.Module, batches: list) -> float:
    with torch.no_grad():
        hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100


# ---------------------------------------------------------------------- manifestation
def test_default_step_grid_shows_the_non_aligned_counts() -> None:
    assert step_grid(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert step_grid(1) == [1]


def test_manifestation_rows_match_hand_evaluation_and_the_model_is_restored(trained_like_model, batches) -> None:
    before = trained_like_model.resolution
    rows = manifestation_sweep(trained_like_model, batches, schemes=["euler", "rk4"], n_steps=[1, 3, 4],
                               reference_steps=32, progress=False)
    assert trained_like_model.resolution == before
    with torch.no_grad(), trained_like_model.manifestation(scheme="rk4", n_steps=32):
        reference = [trained_like_model(x) for x, _ in batches]
    assert [(r["scheme"], r["n_steps"]) for r in rows][:3] == [("stages_off", 0), ("euler", 1), ("euler", 3)]
    for row in rows[1:]:
        with trained_like_model.manifestation(scheme=row["scheme"], n_steps=row["n_steps"]), torch.no_grad():
            assert row["accuracy"] == pytest.approx(_accuracy_by_hand(trained_like_model, batches))
            logits = [trained_like_model(x) for x, _ in batches]
        distance = math.sqrt(sum((a - b).square().sum().item() for a, b in zip(logits, reference))
                             / sum(b.square().sum().item() for b in reference))
        assert row["logit_distance"] == pytest.approx(distance, rel=1e-4)
        assert row["function_evaluations"] == 3 * row["n_steps"] * {"euler": 1, "rk4": 4}[row["scheme"]]
        assert not row["trained"] and row["bn"] == "as trained"  # midpoint, 4 steps: not in this sweep


def test_stages_off_baseline_equals_the_model_with_every_gate_zeroed(trained_like_model, batches) -> None:
    rows = manifestation_sweep(trained_like_model, batches, schemes=["rk4"], n_steps=[2], reference_steps=8,
                               progress=False)
    with torch.no_grad():
        for stage in trained_like_model.stages:
            for gate in stage.gate.gate:
                gate.zero_()
    off = rows[0]
    assert off["scheme"] == "stages_off"
    assert off["accuracy"] == pytest.approx(_accuracy_by_hand(trained_like_model, batches))
    assert off["loss"] == pytest.approx(evaluate(trained_like_model, batches)["loss"], rel=1e-5)


def test_recalibrated_rows_use_statistics_of_their_manifestation(trained_like_model, batches) -> None:
    from lightning_cnet import recalibrate_bn

    rows = manifestation_sweep(trained_like_model, batches, schemes=["euler"], n_steps=[2], reference_steps=8,
                               recalibration=batches, progress=False)
    recalibrated = next(r for r in rows if r["bn"] == "recalibrated")
    copy = get_model("cnet_digits", n_steps=4, scheme="midpoint")
    copy.load_state_dict(trained_like_model.state_dict())
    copy.set_manifestation(scheme="euler", n_steps=2)
    recalibrate_bn(copy, batches)
    assert recalibrated["accuracy"] == pytest.approx(_accuracy_by_hand(copy.eval(), batches))
    assert {r["bn"] for r in rows} == {"as trained", "recalibrated"}


# ---------------------------------------------------------------------- convergence
class SmoothUnit(ResidualUnit):
    """``tanh(conv(x))``: a right-hand side smooth in the state, so every scheme shows its tableau's order."""

    def __init__(self, channels: int, *, n_basis: int) -> None:
        super().__init__()
        self.conv = TimeConv2d(channels, channels, n_basis=n_basis, bias=True)

    def residual(self, x, nodes):
        return torch.tanh(self.conv(x, nodes))


def test_convergence_study_recovers_each_tableau_order_on_aligned_step_counts() -> None:
    torch.manual_seed(3)
    model = ContinuousNet((3, 4), in_chans=1, num_classes=3, unit=SmoothUnit, n_basis=2, n_steps=2, T=0.5,
                          skip_init=False).eval()
    batches = as_batches([(torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long))])
    schemes = ["euler", "midpoint", "heun", "rk3", "rk4", "rk4_38"]
    errors, orders = convergence_study(model, batches, schemes=schemes, n_steps=[2, 3, 4, 6, 8, 16],
                                       reference_steps=512, progress=False)
    assert model.resolution[0].n_steps == 2 and next(model.parameters()).dtype == torch.float32
    for row in orders:
        if row["aligned"]:
            assert abs(row["fitted_order"] - row["tableau_order"]) < 0.3, row
    aligned = {(r["scheme"], r["n_steps"]): r["aligned"] for r in errors if r["output"] == "logits"}
    assert aligned[("rk4", 4)] and not aligned[("rk4", 3)]
    # steps that straddle the jump of theta(t) at t = 1/2 converge at first order, whatever the scheme
    rk4_other = next(r for r in orders if (r["scheme"], r["output"], r["aligned"]) == ("rk4", "stage0", False))
    assert rk4_other["points"] == 1 or rk4_other["fitted_order"] < 2.0


# ---------------------------------------------------------------------- depth profile
def test_depth_profile_of_a_fresh_refinement_has_zero_jumps_between_copies() -> None:
    model = get_model("cnet_digits", n_steps=2)
    model.refine()
    pieces, stages = depth_profile(model)
    for row in pieces:
        if row["piece"] in (0, 2):  # pieces 0-1 and 2-3 are copies of the two original pieces
            assert row["relative_jump"] == 0.0, row
    assert [row["n_basis"] for row in stages] == [4, 4, 4]
    assert all(row["gates"] == "0 0 0 0" for row in stages)


def test_smoothness_ranks_a_smooth_theta_above_an_unrelated_one() -> None:
    smooth, rough = get_model("cnet_digits", n_steps=8), get_model("cnet_digits", n_steps=8)
    with torch.no_grad():
        for stage in smooth.stages:
            for layer in stage.time_layers():
                for pieces in layer.pieces_by_name().values():
                    for k, piece in enumerate(pieces):  # theta_k = theta_0 * (1 + k / 20): a slow drift
                        piece.copy_(pieces[0] * (1 + k / 20))
    smooth_jumps = [row["mean_relative_jump"] for row in depth_profile(smooth)[1]]
    rough_jumps = [row["mean_relative_jump"] for row in depth_profile(rough)[1]]
    assert all(s < 0.06 for s in smooth_jumps) and all(r > 0.5 for r in rough_jumps)


# ---------------------------------------------------------------------- compression and export
def test_compression_rows_count_parameters_and_leave_the_model_alone(trained_like_model, batches) -> None:
    state = {k: v.clone() for k, v in trained_like_model.state_dict().items()}
    rows = compression_sweep(trained_like_model, batches, pairs=[(4, 4), (2, 2), (1, 3)], progress=False)
    per_piece = sum(p.numel() for stage in trained_like_model.stages for p in stage.parameters()) // 4
    total = sum(p.numel() for p in trained_like_model.parameters())
    assert [(r["n_basis"], r["n_steps"]) for r in rows] == [(0, 0), (4, 4), (2, 2), (1, 3)]
    assert [r["parameters"] for r in rows] == [total - 4 * per_piece, total, total - 2 * per_piece,
                                               total - 3 * per_piece]
    assert rows[1]["accuracy"] == pytest.approx(evaluate(trained_like_model, batches)["accuracy"])
    for key, value in trained_like_model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="n_basis=8 is finer"):
        compression_sweep(trained_like_model, batches, pairs=[(8, 8)], progress=False)


def test_export_equals_eager(tmp_path, trained_like_model, batches) -> None:
    example = batches[0][0]
    trained_like_model.set_manifestation(scheme="rk4", n_steps=2)
    path = export_program(trained_like_model, example, tmp_path / "model.pt2")
    program = torch.export.load(path)
    torch.testing.assert_close(program.module()(batches[1][0]), trained_like_model(batches[1][0]))
    onnx_path = export_onnx(trained_like_model, example, tmp_path / "model.onnx")
    assert onnx_path.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]  # no temporary files left


def test_plots_are_pngs(tmp_path, trained_like_model, batches) -> None:
    rows = manifestation_sweep(trained_like_model, batches, schemes=["euler", "rk4"], n_steps=[1, 2, 4],
                               reference_steps=8, recalibration=batches, progress=False)
    assert _is_png(plot_manifestation({"a": rows, "b": rows}, tmp_path / "m.png"))
    errors, orders = convergence_study(trained_like_model, batches[:1], schemes=["euler", "rk4"], n_steps=[4, 8],
                                       reference_steps=64, progress=False)
    assert _is_png(plot_convergence(errors, orders, tmp_path / "c.png"))
    pieces, stages = depth_profile(trained_like_model, label="x")
    assert _is_png(plot_depth_profile({"x": pieces}, {"x": stages}, tmp_path / "d.png"))
    compression = compression_sweep(trained_like_model, batches, pairs=[(4, 4), (2, 2)], progress=False)
    assert _is_png(plot_compression(compression, tmp_path / "k.png", trained=(4, 4)))


# ---------------------------------------------------------------------- the command
def analyze(*args: str, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]),
           "LIGHTNING_CNET_THREADS": "1"}  # no line about the thread count chosen by the machine's load
    result = subprocess.run([sys.executable, "-m", "lightning_cnet.analysis.cli", *args], capture_output=True,
                            text=True, timeout=600, cwd=cwd, env=env)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    import pytorch_lightning as pl

    from lightning_cnet.data import DigitsDataModule
    from lightning_cnet.module import ContinuousNetClassifier

    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    data = {"class_path": "lightning_cnet.data.DigitsDataModule", "init_args": {"image_size": 8, "batch_size": 100}}
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    task = ContinuousNetClassifier("cnet_digits", scheme="rk4", n_steps=2, lr=0.05)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=DigitsDataModule(image_size=8))
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


@pytest.mark.slow
def test_every_subcommand_runs_on_a_checkpoint(run_dir, tmp_path) -> None:
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    out = tmp_path / "out"
    analyze("manifestation", "--ckpt_path", ckpt, ckpt, "--labels", "a", "b", "--schemes", "euler", "rk4",
            "--n_steps", "1", "2", "3", "--reference_steps", "16", "--recalibrate_bn", "--recalibration_batches",
            "2", "--out", str(out), cwd=tmp_path)
    with (out / "manifestation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (1 + 2 * 2 * 3) and {r["checkpoint"] for r in rows} == {"a", "b"}
    analyze("convergence", "--ckpt_path", ckpt, "--schemes", "euler", "rk4", "--n_steps", "2", "4", "8",
            "--reference_steps", "64", "--out", str(out), cwd=tmp_path)
    with (out / "convergence_orders.csv").open() as handle:
        orders = list(csv.DictReader(handle))
    assert {"scheme", "aligned", "fitted_order", "tableau_order"} <= set(orders[0])
    analyze("depth", "--ckpt_path", ckpt, "--out", str(out), cwd=tmp_path)
    analyze("compression", "--ckpt_path", ckpt, "--pairs", "2:2", "1:1", "1:4", "--save", str(out / "small"),
            "--out", str(out), cwd=tmp_path)
    analyze("export", "--ckpt_path", ckpt, "--scheme", "euler", "--n_steps", "3", "--out", str(out / "m.pt2"),
            "--onnx", cwd=tmp_path)
    for name in ("manifestation", "convergence", "depth_profile", "compression"):
        assert _is_png(out / f"{name}.png"), name
    assert (out / "m.pt2").is_file() and (out / "m.onnx").is_file()

    # the compressed checkpoints load and test to the accuracy the table reports
    from lightning_cnet.data import DigitsDataModule
    from lightning_cnet.module import ContinuousNetClassifier

    with (out / "compression.csv").open() as handle:
        table = {(int(r["n_basis"]), int(r["n_steps"])): float(r["accuracy"]) for r in csv.DictReader(handle)}
    loaded = ContinuousNetClassifier.load_from_checkpoint(out / "small" / "last-K1-N4.ckpt", weights_only=True)
    assert [(r.n_basis, r.n_steps) for r in loaded.model.resolution] == [(1, 4)] * 3
    data = DigitsDataModule(image_size=8, batch_size=100)
    data.setup("test")
    assert evaluate(loaded.model, as_batches(data.test_dataloader()))["accuracy"] == pytest.approx(table[(1, 4)])


BAD_INPUT = [
    (["manifestation", "--schemes", "rk5"], "scheme='rk5' is not known"),
    (["manifestation", "--n_steps", "0"], "n_steps=0 is not valid"),
    (["compression", "--pairs", "8:8"], "n_basis=8 is finer than the current 2"),
    (["compression", "--pairs", "2-2"], "'2-2' is not a pair"),
    (["manifestation", "--split", "val", "--config", "CONFIG_WITHOUT_VAL"], "has no 'val' split"),
    (["manifestation", "--out", "A_FILE/out"], "cannot write there"),
    (["manifestation", "--out", "/proc/1/forbidden"], "cannot write there"),
]


def analyze_in_process(*args: str, capsys: pytest.CaptureFixture) -> str:
    """Run the command in this process (no interpreter start-up); return its stderr. It must exit with status 2."""
    from lightning_cnet.analysis.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_from_the_console_command_is_one_line_and_exit_2(run_dir, tmp_path) -> None:
    result = analyze("manifestation", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), "--schemes", "rk5",
                     "--out", str(tmp_path / "out"), cwd=tmp_path, expect=2)
    assert result.stderr.strip().splitlines() == [
        "lightning-cnet-analyze: error: scheme='rk5' is not known: expected one of "
        "['bosh3', 'dopri5', 'euler', 'heun', 'midpoint', 'rk3', 'rk4', 'rk4_38']"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "message"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_nothing_written(run_dir, tmp_path, capsys, monkeypatch, arguments,
                                                         message) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    if "CONFIG_WITHOUT_VAL" in arguments:
        (tmp_path / "train_only.py").write_text(
            "import pytorch_lightning as pl\n"
            "class TrainOnly(pl.LightningDataModule):\n"
            "    def train_dataloader(self):\n"
            "        return []\n"
        )
        config = tmp_path / "no_val.yaml"
        config.write_text(yaml.safe_dump({"data": {"class_path": "train_only.TrainOnly"}}))
        arguments = [str(config) if a == "CONFIG_WITHOUT_VAL" else a for a in arguments]
    (tmp_path / "A_FILE").write_text("a file, not a folder")
    arguments = [a.replace("A_FILE", str(tmp_path / "A_FILE")) for a in arguments]
    if "--out" not in arguments:
        arguments = [*arguments, "--out", str(tmp_path / "out")]
    stderr = analyze_in_process(arguments[0], "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                                *arguments[1:], capsys=capsys)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-cnet-analyze: error:") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_continuous_net_checkpoint_is_refused(tmp_path, capsys) -> None:
    for name, content in (("random.ckpt", b"\x00garbage" * 10), ("other.ckpt", None)):
        path = tmp_path / name
        if content is None:
            torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"lr": 1}}, path)
        else:
            path.write_bytes(content)
        stderr = analyze_in_process("depth", "--ckpt_path", str(path), "--out", str(tmp_path / "out"), capsys=capsys)
        assert stderr.count("\n") == 1 and str(path) in stderr
    assert not (tmp_path / "out").exists()


def test_a_config_with_a_foreign_class_path_is_refused_and_nothing_runs(run_dir, tmp_path, capsys) -> None:
    marker = tmp_path / "ran"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "subprocess.run",
                                               "init_args": {"args": ["touch", str(marker)]}}}))
    stderr = analyze_in_process("manifestation", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                                "--config", str(config), "--out", str(tmp_path / "out"), capsys=capsys)
    assert "not a LightningDataModule" in stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_curve_reads_a_metrics_csv_and_marks_refinements(tmp_path, capsys) -> None:
    from lightning_cnet.analysis.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,step,val_acc,refinement/epoch\n0,10,0.5,\n1,20,0.7,1\n2,30,0.8,\n3,40,0.9,3\n"
    )
    main(["curve", "--metrics", str(run), "--out", str(tmp_path / "curve.png")])
    assert _is_png(tmp_path / "curve.png")
    stderr = analyze_in_process("curve", "--metrics", str(run), "--metric", "test_acc", "--out",
                                str(tmp_path / "other.png"), capsys=capsys)
    assert "has no column 'test_acc'" in stderr and not (tmp_path / "other.png").exists()


def test_outputs_are_written_atomically_with_ordinary_permissions(tmp_path) -> None:
    from lightning_cnet.analysis import write_csv

    path = write_csv([{"a": 1}, {"a": 2, "b": 3}], tmp_path / "table.csv")
    assert path.read_text().splitlines() == ["a,b", "1,", "2,3"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
