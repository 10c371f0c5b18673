"""The study scripts behind the README's results: smoke runs, and the refinement summary against hand statistics."""

from __future__ import annotations

import csv
import importlib
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=1200)


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def refinement(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("refinement")


def test_refinement_summary_picks_rates_on_validation_and_pairs_by_seed(refinement, tmp_path):
    """Hand-made rows: full is best on validation at 0.2 (though 0.1 tests better), refined at 0.1."""
    header = "T,method,variant,lr,seed,epochs,wall,val_acc,test_acc,test_acc_stages_off,refine_seconds\n"
    lines = [
        "2.0,full,,0.1,0,4,10.0,70.0,90.0,30.0,0", "2.0,full,,0.1,1,4,12.0,72.0,92.0,30.0,0",
        "2.0,full,,0.2,0,4,10.0,80.0,81.0,30.0,0", "2.0,full,,0.2,1,4,8.0,82.0,85.0,34.0,0",
        "2.0,refined,,0.1,0,4,4.0,79.0,80.0,10.0,0.1", "2.0,refined,,0.1,1,4,6.0,79.0,82.0,12.0,0.1",
        "2.0,refined,,0.2,0,4,6.0,60.0,99.0,10.0,0.1", "2.0,refined,,0.2,1,4,4.0,60.0,99.0,10.0,0.1",
        "2.0,refined,noise 0.1,0.1,0,4,4.0,75.0,70.0,10.0,0.1", "2.0,refined,noise 0.1,0.1,1,4,4.0,77.0,74.0,10.0,0.1",
    ]
    path = tmp_path / "rows.csv"
    path.write_text(header + "\n".join(lines) + "\n")
    rows = refinement.read_rows([str(path)])
    assert refinement.chosen_rates(rows) == {(2.0, "full"): 0.2, (2.0, "refined"): 0.1}
    base = refinement.RunConfig(scheme="rk4", final_steps=8, refine_at=(1, 2, 3), epochs=4, image_size=16)
    text = refinement.summary(rows, base, "rk4", 16)
    differences = [80.0 - 81.0, 82.0 - 85.0]
    spread = statistics.stdev(differences)  # sqrt(2): the two differences are -1 and -3
    ratios = sorted([4 / 10, 6 / 12, 6 / 10, 4 / 8])  # every back-to-back pair, whatever the rate
    assert (f"T=2: refined - full test accuracy {statistics.mean(differences):+.2f} +- {spread:.2f} points "
            "(per seed -1.00, -3.00)") in text
    assert f"median {statistics.median(ratios):.2f} over 4 pairs (range 0.40-0.60)" in text
    full_line = next(line for line in text.splitlines() if line.startswith(" 2.0 full "))
    assert full_line.split()[4:7] == ["81.00", "83.00", "+-"], full_line  # lr 0.2, val mean 81, test mean 83
    assert any(line.startswith(" 2.0 refined, noise 0.1") and " 72.00 +- " in line for line in text.splitlines())


def test_refinement_smoke_run_and_its_summary_from_csv(tmp_path):
    out = tmp_path / "refinement.csv"
    run = run_script("refinement.py", "--smoke", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = rows_of(out)
    plain = {(row["method"], row["lr"]) for row in rows if not row["variant"]}
    assert plain == {(method, lr) for method in ("refined", "full") for lr in ("0.05", "0.1")}
    assert {row["variant"] for row in rows} == {"", "reset optimizer state", "noise 0.1", "recalibrate BN",
                                                "+1 epochs at the end"}
    assert all(0 <= float(row["test_acc"]) <= 100 and float(row["wall"]) > 0 for row in rows)
    def summary(output: str) -> list[str]:
        return output[output.index("\nhard digits"):].splitlines()

    again = run_script("refinement.py", "--smoke", "--from-csv", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(summary(run.stdout)) == 10 and summary(again.stdout) == summary(run.stdout)


def test_main_job_sweep_smoke_run(tmp_path):
    out = tmp_path / "sweep.csv"
    run = run_script("main_job_sweep.py", "--smoke", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = rows_of(out)
    assert rows and all(0 <= float(row["test_acc"]) <= 100 for row in rows)


@pytest.mark.slow
def test_claims_smoke_run_writes_every_table(tmp_path):
    out = tmp_path / "claims"
    run = run_script("claims.py", "--smoke", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (out / "claims.md").read_text()
    for heading in ("BatchNorm statistics as trained", "BatchNorm statistics recalibrated", "Fitted order",
                    "Compression without data"):
        assert heading in text
    for model in ("resnet", "rk4", "refined"):
        assert f"| {model} |" in text
        assert (out / "analysis" / f"{model}_s0" / "manifestation.csv").is_file()
    assert (out / "analysis" / "manifestation_overlay.png").stat().st_size > 0
    resumed = run_script("claims.py", "--smoke", "--resume", "--out", str(out), cwd=tmp_path)
    assert resumed.returncode == 0 and " fit " not in resumed.stdout, "a resumed run trains nothing again"


@pytest.fixture
def fashion(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("fashion_mnist")


def test_fashion_rate_search_grows_the_grid_beyond_the_best_end(fashion):
    """Hand-made validation accuracies: 0.2 beats 0.1, so 0.4 runs next; then 0.2 is inside the grid and chosen."""
    rows = [{"method": "full", "variant": "plain", "seed": 0, "lr": lr, "val_acc": acc}
            for lr, acc in ((0.1, 80.0), (0.2, 85.0))]
    assert fashion.rate_search(rows, "full", [0.1, 0.2], 0, most=3) == ([0.1, 0.2, 0.4], None)
    rows.append({"method": "full", "variant": "plain", "seed": 0, "lr": 0.4, "val_acc": 84.0})
    assert fashion.rate_search(rows, "full", [0.1, 0.2], 0, most=3) == ([0.1, 0.2, 0.4], 0.2)
    # the best at the lower end, with room for one more rate: half of it (0.4 was not asked for); with none: the end
    low = [{**row, "val_acc": 90.0 - 10 * row["lr"]} for row in rows]
    assert fashion.rate_search(low, "full", [0.1, 0.2], 0, most=3) == ([0.05, 0.1, 0.2], None)
    assert fashion.rate_search(low, "full", [0.1, 0.2], 0, most=2) == ([0.1, 0.2], 0.1)
    jobs, more = fashion.plan(rows + [{**row, "method": "refined"} for row in rows], [0.1, 0.2], [0, 1], ["reset"])
    assert not more and [job.key for job in jobs[6:]] == [
        "train:refined:plain:0.2:1", "train:full:plain:0.2:1", "analyze:refined:plain:0.2:0",
        "analyze:full:plain:0.2:0", "analyze:refined:plain:0.2:1", "analyze:full:plain:0.2:1",
        "train:refined:reset:0.2:0", "train:refined:reset:0.2:1"]


@pytest.mark.slow
def test_fashion_smoke_study_on_tiny_idx_files(tmp_path):
    """The whole pipeline (rate search, seeds, (b)/(d) studies, variants, tables, figures) on IDX files written here."""
    from test_mnist_data import write_dataset

    write_dataset(tmp_path / "data")
    run = run_script("fashion_mnist.py", "--smoke", "--out", str(tmp_path / "study"), "--seeds", "0", "--variants",
                     "plateau", "restart", "--val-size", "8", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = rows_of(tmp_path / "study" / "runs.csv")
    assert sorted((row["method"], row["variant"]) for row in rows) == sorted(
        [("refined", "plain")] * 2 + [("full", "plain")] * 2 + [("refined", "plateau"), ("refined", "restart")])
    assert all(float(row["cpu"]) > 0 and float(row["load"]) >= 0 for row in rows)
    text = (tmp_path / "study" / "fashion_mnist.md").read_text()
    for heading in ("Learning rates on seed 0", "Refined against full depth", "(b) Test accuracy", "(d) Compression"):
        assert heading in text
    assert "not measured" in text  # the variants left out
    assert (tmp_path / "study" / "figures" / "manifestation_fashion_mnist.png").stat().st_size > 0
