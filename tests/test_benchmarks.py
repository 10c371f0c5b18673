"""The benchmark scripts cannot rot: each runs in its smoke mode (seconds) and writes its CSV, the checks they make
before timing can fail, and the tools they measure with count what they claim to count. No figure is asserted."""

from __future__ import annotations

import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_cnet.integrators import get_scheme, rk_integrate
from lightning_cnet.models import get_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name, with ``benchmarks/`` on the path as when it is run."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()

    def load(name: str):
        return importlib.import_module(name)

    yield load
    torch.set_num_threads(threads)  # the scripts set --threads


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_overhead_smoke(bench, tmp_path):
    overhead = bench("overhead")
    rows = overhead.main(["--smoke", "--ungated", "--rk4-modes", "train", "infer", "--csv", str(tmp_path / "o.csv")])
    assert [(row.mode, row.batch, row.n) for row in rows] == [("train", 2, 1), ("infer", 2, 1)]
    written = rows_of(tmp_path / "o.csv")
    assert len(written) == 2 and {"ratio", "ungated_ratio", "rk4_cost"} <= written[0].keys()
    assert all(float(row["ratio"]) > 0 and float(row["rk4_cost"]) > 0 for row in written)


def test_overhead_profile_smoke(bench, capsys):
    bench("overhead").main(["--smoke", "--profile"])
    out = capsys.readouterr().out
    assert "## train step, batch 2, N = 1" in out and "aten::" in out and "(all operators)" in out


def test_peers_smoke(bench, tmp_path):
    pytest.importorskip("torchdiffeq")
    pytest.importorskip("torchdyn")
    rows = bench("peers").main(["--smoke", "--csv", str(tmp_path / "p.csv")])
    groups = {(row.scope, row.scheme, row.mode) for row in rows}
    assert len(groups) == 2 * 3 * 2
    contenders = {row.contender for row in rows if row.scheme == "rk4"}
    assert contenders == {"cnet[rk4_38]", "cnet[rk4]", "torchdiffeq", "torchdyn"}
    assert {row.contender for row in rows if row.scheme == "euler"} == {"cnet[euler]", "resnet", "torchdiffeq",
                                                                           "torchdyn"}
    assert len(rows_of(tmp_path / "p.csv")) == len(rows)


def test_peers_consistency_check_can_fail(bench):
    """torchdiffeq's rk4 without ``perturb`` reads the next step's piece in its last stage: the check refuses it."""
    pytest.importorskip("torchdiffeq")
    pytest.importorskip("torchdyn")
    peers = bench("peers")

    def build():
        models = peers.contenders("stage", "rk4", 2, 0, torch.device("cpu"))
        models["torchdiffeq"].options["perturb"] = False
        return models

    x = torch.randn(2, peers.STAGE_WIDTH, 8, 8)
    with pytest.raises(AssertionError, match="torchdiffeq differs from cnet\\[rk4_38\\]"):
        peers.check_consistency(build, "rk4", x, 1e-4)


def test_memory_smoke(bench, tmp_path):
    rows = bench("memory").main(["--smoke", "--csv", str(tmp_path / "m.csv")])
    methods = {row.method for row in rows}
    assert {"stored", "recompute"} <= methods
    assert all(row.gradient_error < 1e-6 for row in rows if row.method == "recompute"), "recomputation is exact"
    assert len(rows_of(tmp_path / "m.csv")) == len(rows)


def test_cost_bounds_smoke(bench, tmp_path):
    rows = bench("cost_bounds").main(["--smoke", "--csv", str(tmp_path / "c.csv")])
    assert len(rows) == 1 and rows[0].measured_mib > 0 and rows[0].estimated_mib > 0
    assert len(rows_of(tmp_path / "c.csv")) == 1


def test_memory_peak_counts_allocations_exactly(bench):
    """The CPU peak of a hand-made allocation pattern: 1 + 2 MiB live, then 1 MiB freed, then 3 MiB: peak 5 MiB."""
    memory = bench("memory")

    def pattern() -> None:
        a = torch.empty(2**18)  # 1 MiB of float32
        b = torch.empty(2**19)  # 2 MiB
        del a
        c = torch.empty(3 * 2**18)  # 3 MiB: 5 MiB live with b
        del b, c

    assert memory.peak_bytes(pattern, torch.device("cpu")) == 5 * 2**20


def test_compile_speed_smoke(bench, tmp_path):
    rows = bench("compile_speed").main(["--smoke", "--csv", str(tmp_path / "c.csv")])
    assert [(row.phase, row.n_steps) for row in rows] == [("initial", 1), ("refined", 2)]
    assert all(row.graphs == 1 for row in rows), "one graph for the whole backbone, once per resolution"
    assert all(row.max_loss_diff == 0.0 for row in rows), "the eager backend runs the same operators"
    assert len(rows_of(tmp_path / "c.csv")) == 2


def test_hard_digits_difficulty_smoke(bench):
    results = bench("hard_digits_difficulty").main(["--smoke", "--threads", "1"])
    assert len(results) == 1 and 0.0 <= results[0]["test"] <= 1.0


def test_threads_smoke(bench, tmp_path):
    threads = bench("threads")
    rows = threads.main(["--smoke", "--counts", "1", "2", "--csv", str(tmp_path / "t.csv")])
    workloads = list(dict.fromkeys(row.workload for row in rows))
    assert workloads == ["train N=1", "evaluate rk4 N=2", "recalibrate rk4 N=2"]
    assert [row.threads for row in rows] == [1, 2] * 3
    assert all(row.ratio_to_one_thread == 1.0 for row in rows if row.threads == 1)
    assert all(row.ms > 0 and row.load_before for row in rows)
    assert len(rows_of(tmp_path / "t.csv")) == 6


def test_threads_measures_at_the_count_it_names(bench):
    threads = bench("threads")
    assert threads.with_threads(3, torch.get_num_threads)() == 3
    assert threads.with_threads(1, torch.get_num_threads)() == 1


def test_every_script_names_its_smoke_mode_alike():
    """One name for the quick mode: ``--smoke``, whether a script defines it or takes it from ``_bench``."""
    for script in sorted(BENCHMARKS.glob("*.py")):
        if script.name.startswith("_"):
            continue
        text = script.read_text()
        assert '"--quick"' not in text, script.name
        assert '"--smoke"' in text or "add_common_arguments" in text, script.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_is_refused_clearly_without_a_gpu(bench):
    with pytest.raises(SystemExit, match="--device cuda: this machine has no CUDA device"):
        bench("overhead").main(["--smoke", "--device", "cuda"])


def test_reference_resnet_check_can_fail(bench):
    resnet = bench("_resnet")
    cnet = get_model("cnet_cifar", n_steps=2)
    resnet.randomise_(cnet, torch.Generator().manual_seed(0))
    reference = resnet.resnet_from(cnet)
    images = torch.randn(2, 3, 16, 16)
    assert resnet.check_same_output(cnet, reference, images) < 1e-5
    assert resnet.check_same_output(cnet, resnet.ungated_copy(cnet), images) < 1e-5
    with torch.no_grad():
        reference.stages[1][0].conv1.weight[0, 0, 0, 0] += 0.5
    with pytest.raises(AssertionError, match="differ"):
        resnet.check_same_output(cnet, reference, images)


@pytest.mark.slow
def test_gpu_suite_runs_in_smoke_mode_on_cpu(tmp_path):
    """The GPU suite's own script, on CPU and in bf16, every benchmark in its smoke mode."""
    pytest.importorskip("torchdiffeq")
    pytest.importorskip("torchdyn")
    env = {**os.environ, "DEVICE": "cpu", "PRECISIONS": "bf16", "EXTRA": "--smoke", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    scripts = ("overhead", "peers", "memory", "compile")
    assert written == sorted(["device.txt"] + [f"{name}-bf16.{ext}" for name in scripts for ext in ("csv", "txt")])


def test_in_place_runge_kutta_combinations_are_bitwise_the_out_of_place_ones():
    """The integrator adds a combination's later terms in place: values and gradients are bitwise those of adding
    every term out of place, left to right (written here by hand for the classic RK4 step)."""
    torch.manual_seed(0)
    weight = torch.randn(5, 5, requires_grad=True)
    x0 = torch.randn(3, 5, requires_grad=True)

    def rate(t: float, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight) * (1.0 + t)

    h = 0.3
    ours = rk_integrate(rate, x0, get_scheme("rk4"), h, [[0.0, 0.15, 0.15, 0.3]])
    k1 = rate(0.0, x0)
    k2 = rate(0.15, torch.add(x0, k1, alpha=h * 0.5))
    k3 = rate(0.15, torch.add(x0, k2, alpha=h * 0.5))
    k4 = rate(0.3, torch.add(x0, k3, alpha=h))
    expected = x0
    for k, b in ((k1, 1 / 6), (k2, 1 / 3), (k3, 1 / 3), (k4, 1 / 6)):
        expected = torch.add(expected, k, alpha=h * b)
    assert torch.equal(ours, expected)
    ours_grads = torch.autograd.grad(ours.square().sum(), (weight, x0))
    expected_grads = torch.autograd.grad(expected.square().sum(), (weight, x0))
    for a, b in zip(ours_grads, expected_grads):
        assert torch.equal(a, b)
