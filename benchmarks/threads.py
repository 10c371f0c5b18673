"""One torch thread against torch's default (one per core) for the main job and the README's study, with the load.

What the command-line tools' thread rule (:mod:`lightning_cnet.threads`) rests on. Three workloads, each timed
with every thread count in turn (interleaved, order rotated every repeat, ``torch.set_num_threads`` before each
sample), the load average recorded before and after each row:

- ``train N``: a training step of the main job's network (``cnet_digits``, midpoint, K = N pieces and steps, T = 2,
  batch 64 of 16x16 images: forward, cross-entropy, backward, SGD) at each resolution it passes through (1, 2, 4, 8);
- ``evaluate``: the manifestation study's evaluation pass (eval mode, no autograd) of 297 test-sized images in
  batches of 64, RK4 at 16 steps (the study's finest row);
- ``recalibrate``: its BatchNorm re-estimation (10 training batches of 64), RK4 at 16 steps.

``--end-to-end`` also times the two README commands as written, ``lightning-cnet fit --config
configs/hard_digits.yaml`` and ``lightning-cnet-analyze manifestation ... --recalibrate_bn``, in subprocesses with
``LIGHTNING_CNET_THREADS`` set to each count in turn (minutes).

Usage::

    python benchmarks/threads.py                      # 1 vs torch's default, the three workloads
    python benchmarks/threads.py --end-to-end         # and the README's fit and study, wall and CPU seconds
    python benchmarks/threads.py --counts 1 2 4       # other thread counts
    python benchmarks/threads.py --smoke
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import _bench
import torch
import torch.nn.functional as F

from lightning_cnet import get_model, recalibrate_bn
from lightning_cnet.threads import THREADS_VARIABLE, usable_cores

REPO = Path(__file__).resolve().parents[1]
DEFAULT_THREADS = torch.get_num_threads() if "OMP_NUM_THREADS" not in os.environ else usable_cores()


@dataclass
class Row:
    workload: str
    threads: int
    ms: float
    ratio_to_one_thread: float
    load_before: str
    load_after: str


def main_job_network(steps: int) -> torch.nn.Module:
    """The main job's network at ``steps`` pieces and steps per stage (weights random: only the time matters)."""
    return get_model("cnet_digits", num_classes=10, in_chans=1, scheme="midpoint", n_steps=steps, n_basis=steps,
                     T=2.0)


def workloads(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(0)
    size, batch = (8, 4) if args.smoke else (16, 64)
    images = torch.randn(batch, 1, size, size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    found: dict[str, Callable[[], object]] = {}
    for steps in (1,) if args.smoke else (1, 2, 4, 8):
        found[f"train N={steps}"] = _bench.sgd_step(main_job_network(steps), images,
                                                    lambda logits: F.cross_entropy(logits, labels), "fp32")
    study = main_job_network(8).eval()
    fine = 2 if args.smoke else 16
    test = [torch.randn(n, 1, size, size, generator=generator) for n in ((4,) if args.smoke else (64,) * 4 + (41,))]
    train = [torch.randn(batch, 1, size, size, generator=generator) for _ in range(1 if args.smoke else 10)]

    def evaluate() -> None:
        with torch.inference_mode(), study.manifestation(scheme="rk4", n_steps=fine):
            for x in test:
                study(x)

    def recalibrate() -> None:
        with study.manifestation(scheme="rk4", n_steps=fine):
            recalibrate_bn(study, train)

    found[f"evaluate rk4 N={fine}"] = evaluate
    found[f"recalibrate rk4 N={fine}"] = recalibrate
    return found


def with_threads(count: int, fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        torch.set_num_threads(count)
        return fn()

    return call


def measure(args: argparse.Namespace) -> list[Row]:
    rows = []
    for name, fn in workloads(args).items():
        before = _bench.load_average()
        samples = _bench.time_interleaved({str(c): with_threads(c, fn) for c in args.counts}, repeats=args.repeats,
                                          warmup=args.warmup, min_seconds=args.min_seconds)
        after = _bench.load_average()
        one = samples[str(args.counts[0])]
        for count in args.counts:
            ratio = _bench.ratio_quartiles(samples[str(count)], one)[1]
            rows.append(Row(name, count, 1e3 * _bench.quartiles(samples[str(count)])[1], ratio, before, after))
            print(f"{name:<24} {count:>2} threads {rows[-1].ms:9.1f} ms  x{ratio:5.2f} of {args.counts[0]} thread(s)"
                  f"  load {before} -> {after}", flush=True)
    return rows


def end_to_end(args: argparse.Namespace) -> list[Row]:
    """The README's fit and study as written, once per thread count in turn, in subprocesses."""
    rows = []
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="threads-") as work:
        fit = [str(bin_dir / "lightning-cnet"), "fit", "--config", str(REPO / "configs" / "hard_digits.yaml"),
               "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", work]
        if args.smoke:
            fit += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches",
                    "1"]
        times: dict[str, dict[int, float]] = {}
        for count in args.counts:
            times.setdefault("fit", {})[count] = _timed_run(fit, count, rows, "fit (README)", cwd=work)
        checkpoint = next(Path(work).rglob("last.ckpt"))
        study = [str(bin_dir / "lightning-cnet-analyze"), "manifestation", "--ckpt_path", str(checkpoint),
                 "--recalibrate_bn", "--out", str(Path(work) / "analysis")]
        if args.smoke:
            study += ["--schemes", "euler", "--n_steps", "1", "--recalibration_batches", "1", "--num_batches", "1"]
        for count in args.counts:
            times.setdefault("study", {})[count] = _timed_run(study, count, rows, "manifestation study (README)",
                                                              cwd=work)
    for row in rows:
        key = "fit" if row.workload.startswith("fit") else "study"
        row.ratio_to_one_thread = times[key][row.threads] / times[key][args.counts[0]]
    return rows


def _timed_run(command: list[str], count: int, rows: list[Row], label: str, *, cwd: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env[THREADS_VARIABLE] = str(count)
    before = _bench.load_average()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    rows.append(Row(label, count, 1e3 * wall, float("nan"), before, _bench.load_average()))
    print(f"{label:<30} {count:>2} threads {wall:7.1f} s wall {cpu:7.1f} s CPU  load {before} -> "
          f"{rows[-1].load_after}", flush=True)
    return wall


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", nargs="+", type=int, default=sorted({1, DEFAULT_THREADS}),
                        help=f"thread counts to compare, the first is the baseline (default: 1 and torch's default, "
                             f"{DEFAULT_THREADS} here)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time the README's fit and manifestation study in subprocesses")
    _bench.add_common_arguments(parser, repeats=5, min_seconds=3.0)
    args = parser.parse_args(argv)
    if any(count < 1 for count in args.counts):
        parser.error(f"--counts {args.counts}: thread counts must be >= 1")
    if args.smoke:
        args.repeats, args.min_seconds, args.warmup = 1, 0.0, 0
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    _bench.resolve_device(args.device)
    print(f"{_bench.machine(torch.device('cpu'), 'fp32')}\n# thread counts {args.counts}: medians of >= {args.repeats}"
          f" interleaved samples; ratio > 1: slower than {args.counts[0]} thread(s)", flush=True)
    rows = measure(args)
    if args.end_to_end:
        rows += end_to_end(args)
    torch.set_num_threads(args.counts[0])
    _bench.write_csv(args.csv, [asdict(row) for row in rows])
    return rows


if __name__ == "__main__":
    main()
