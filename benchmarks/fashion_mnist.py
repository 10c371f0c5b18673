"""The paper's claims on Fashion-MNIST: refinement against full depth (c), invariance (b) and compression (d).

Every run trains ``cnet_digits`` (widths 8-16-32) on Fashion-MNIST (28x28, 55,000 training and 5,000 held-out
validation images drawn with the run's seed, the 10,000 test images), midpoint rule, ``T = 2``, 4 steps and pieces
per stage at the end, 4 epochs, batch 128, SGD (Nesterov momentum 0.9, weight decay 5e-4, cosine schedule per
epoch), one thread (``benchmarks/_experiment.py``). *refined* starts at 1 step and doubles at epochs 2 and 3;
*full* trains at 4 steps from the start.

The study, in the order its jobs run (two at a time, each in its own process, ``nice``; every finished run appends
its row to ``OUT/runs.csv`` at once, so a partial study can be read and resumed):

1. the learning rate of each method on seed 0, chosen on the validation split: 0.1 and 0.2, then one more rate
   (half the smaller or twice the larger) beyond the better one;
2. seeds 1 and 2 of both methods at their rates (claim (c): test accuracy, wall time and process CPU time, with the
   load average while each ran);
3. claims (b) and (d) on the six trained models: every scheme and step count as trained and with BatchNorm
   statistics re-estimated (the first 2,000 test images; a reference of RK4 at 16 steps), compression to fewer
   pieces and steps (all test images), and the relative jump between neighbouring pieces, each with the
   stages-off baseline;
4. variants of the refined run at its rate, seeds 0-2: refinements at epochs 1 and 2, a learning-rate restart at
   each refinement, a plateau schedule that decides for itself, BatchNorm statistics re-estimated at each
   refinement, the optimizer state reset instead of interpolated.

Cost, measured on one thread: a refined run trains in ~7 CPU-minutes, a full-depth run in ~12.5 (plus ~0.5
CPU-minutes of start-up and evaluation each), the study of one model takes ~4; so steps 1-2 (10 runs) take ~1.7
CPU-hours, step 3 ~0.4 and step 4 (15 runs) ~2 (refinements at epochs 1, 2 cost ~9 CPU-minutes a run): about 4
CPU-hours in all, two hours on 2 idle cores (the variants come last, so a study stopped early keeps what matters
most).

Usage::

    python benchmarks/fashion_mnist.py --out outputs/fashion                 # the study; resumes what OUT holds
    python benchmarks/fashion_mnist.py --out outputs/fashion --summary       # tables from OUT, nothing run
    python benchmarks/fashion_mnist.py --smoke --out /tmp/fashion            # smoke run: tiny epochs, one worker
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _experiment import RunConfig, datamodule, run, set_threads

BASE = RunConfig(data="fashion-mnist", batch_size=128, scheme="midpoint", final_steps=4, refine_at=(2, 3), T=2.0,
                 epochs=4)
SMOKE = dict(epochs=2, refine_at=(1,), final_steps=2, limit_train_batches=3, limit_eval_batches=2)
#: Variants of the refined run: their label and what they change.
VARIANTS = {
    "refine12": ("refinements at epochs 1, 2", {"refine_at": (1, 2)}),
    "restart": ("learning-rate restart at refinements", {"lr_restart": True}),
    "plateau": ("plateau schedule (patience 1, 1 point)", {"plateau_patience": 1, "plateau_min_delta": 0.01}),
    "recalibrate": ("BatchNorm re-estimated at refinements", {"recalibrate_bn": True}),
    "reset": ("optimizer state reset", {"optimizer_state": "reset"}),
}
COLUMNS = ("method", "variant", "lr", "seed", "epochs", "wall", "cpu", "load", "val_acc", "test_acc",
           "test_acc_stages_off", "final_steps", "refine_epochs", "refine_seconds", "finished")
SCHEMES = ("euler", "midpoint", "rk4")
STEPS = (1, 2, 3, 4, 8)
PAIRS = ((4, 4), (4, 2), (4, 1), (2, 4), (2, 2), (1, 4), (1, 1))
SWEEP_IMAGES = 2000
RECALIBRATION_BATCHES = 20


@dataclass(frozen=True)
class Job:
    """One unit of the study: ``train`` a run or ``analyze`` a trained one."""

    kind: str
    method: str
    seed: int
    lr: float = 0.0
    variant: str = "plain"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.method}:{self.variant}:{self.lr:g}:{self.seed}"

    @classmethod
    def parse(cls, key: str) -> Job:
        kind, method, variant, lr, seed = key.split(":")
        return cls(kind, method, int(seed), float(lr), variant)


# ---------------------------------------------------------------------------------------------------- the plan
def read_rows(path: Path) -> list[dict[str, Any]]:
    """The finished runs of ``OUT/runs.csv``, typed."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    numbers = ("lr", "wall", "cpu", "load", "val_acc", "test_acc", "test_acc_stages_off", "refine_seconds")
    for row in rows:
        row.update({key: float(row[key]) for key in numbers})
        row.update({key: int(row[key]) for key in ("seed", "epochs", "final_steps")})
    return rows


def rate_search(rows: Sequence[dict[str, Any]], method: str, lrs: Sequence[float], seed: int, most: int
                ) -> tuple[list[float], float | None]:
    """The learning rates ``method`` runs on ``seed`` and the one chosen on validation (``None`` until known).

    All of ``lrs`` run first; while the best validation accuracy is at an end of the rates run, the grid grows by a
    factor 2 beyond that end, up to ``most`` rates, so that the chosen rate is inside the grid when the budget allows.
    """
    val = {row["lr"]: row["val_acc"] for row in rows
           if (row["method"], row["variant"], row["seed"]) == (method, "plain", seed)}
    rates = sorted(lrs)
    while all(lr in val for lr in rates):
        best = max(rates, key=lambda lr: val[lr])
        if len(rates) >= most or rates[0] < best < rates[-1]:
            return rates, best
        rates = [best / 2, *rates] if best == rates[0] else [*rates, best * 2]
    return rates, None


def plan(rows: Sequence[dict[str, Any]], lrs: Sequence[float], seeds: Sequence[int], variants: Sequence[str],
         most: int = 3) -> tuple[list[Job], bool]:
    """Every job whose inputs exist, in the order they should run, and whether more jobs will follow."""
    searches = {method: rate_search(rows, method, lrs, seeds[0], most) for method in ("refined", "full")}
    jobs = [Job("train", method, seeds[0], lr) for method in ("refined", "full") for lr in searches[method][0]]
    jobs.sort(key=lambda job: (job.lr not in lrs, lrs.index(job.lr) if job.lr in lrs else 0))  # pairs first
    rates = {method: chosen for method, (_, chosen) in searches.items() if chosen is not None}
    # a method whose rate is known goes on with its seeds while the other one still searches
    jobs += [Job("train", method, seed, rates[method]) for seed in seeds[1:] for method in rates]
    jobs += [Job("analyze", method, seed, rates[method]) for seed in seeds for method in rates]
    if "refined" in rates:
        jobs += [Job("train", "refined", seed, rates["refined"], variant) for variant in variants for seed in seeds]
    return jobs, len(rates) < 2


# ---------------------------------------------------------------------------------------------------- one job
def checkpoint_path(out: Path, job: Job) -> Path:
    return out / "checkpoints" / f"{job.method}_{job.variant}_lr{job.lr:g}_s{job.seed}.ckpt"


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV under an exclusive lock (two jobs may finish at once), header first if new."""
    with path.open("a", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if handle.tell() == 0:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_UN)


def train_job(out: Path, job: Job, base: RunConfig) -> dict[str, Any]:
    config = base.replace(lr=job.lr, seed=job.seed, checkpoint=str(checkpoint_path(out, job)))
    if job.method == "full":
        config = config.replace(refine_at=())
    if job.variant != "plain":
        config = config.replace(**VARIANTS[job.variant][1])
    checkpoint_path(out, job).parent.mkdir(parents=True, exist_ok=True)
    result = run(config)
    row = {"method": job.method, "variant": job.variant, "lr": job.lr, "seed": job.seed, "epochs": config.epochs,
           **{key: round(result[key], 3) for key in ("wall", "cpu", "load", "val_acc", "test_acc",
                                                     "test_acc_stages_off", "refine_seconds")},
           "final_steps": result["final_steps"], "refine_epochs": result["refine_epochs"],
           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    _append_row(out / "runs.csv", row)
    return row


def analyze_job(out: Path, job: Job, base: RunConfig, smoke: bool) -> None:
    """Claims (b) and (d) and the depth profile of one trained model, written to ``OUT/analysis/<method>_s<seed>``."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from lightning_cnet.analysis import as_batches, compression_sweep, depth_profile, manifestation_sweep
    from lightning_cnet.analysis._files import write_csv
    from lightning_cnet.module import ContinuousNetClassifier

    task = ContinuousNetClassifier.load_from_checkpoint(checkpoint_path(out, Job("train", job.method, job.seed,
                                                                                 job.lr)), map_location="cpu")
    model = task.model.eval()
    dm = datamodule(base.replace(seed=job.seed))
    dm.setup(None)
    images = min(256 if smoke else SWEEP_IMAGES, len(dm.test_dataset))
    sweep = as_batches(DataLoader(Subset(dm.test_dataset, range(images)), batch_size=128))
    test = sweep if smoke else as_batches(DataLoader(dm.test_dataset, batch_size=128))
    recalibration = [images for images, _ in DataLoader(dm.train_dataset, batch_size=128)][
        :2 if smoke else RECALIBRATION_BATCHES]
    target = analysis_dir(out, job)
    target.mkdir(parents=True, exist_ok=True)
    start = time.process_time()
    with torch.no_grad():
        rows = manifestation_sweep(model, sweep, schemes=SCHEMES, n_steps=(1, 2) if smoke else STEPS,
                                   reference_steps=4 if smoke else 16, recalibration=recalibration, progress=False)
        write_csv(rows, target / "manifestation.csv")
        write_csv(compression_sweep(model, test, pairs=((2, 2), (1, 1)) if smoke else PAIRS, progress=False),
                  target / "compression.csv")
    pieces, stages = depth_profile(model, label=job.method)
    write_csv(pieces, target / "depth.csv")
    write_csv(stages, target / "depth_stages.csv")
    (target / "cost.json").write_text(json.dumps({"cpu_seconds": time.process_time() - start}))


# ---------------------------------------------------------------------------------------------------- tables
def _mean_std(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "not measured"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _median_range(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def claim_c(rows: Sequence[dict[str, Any]], lrs: Sequence[float], seeds: Sequence[int], most: int) -> list[str]:
    """The learning-rate search, refined against full depth at their rates, and the variants of the refined run."""
    rates = {method: rate_search(rows, method, lrs, seeds[0], most) for method in ("refined", "full")}
    lines = [f"\nLearning rates on seed {seeds[0]} (chosen: best validation accuracy, **bold**).\n",
             "| method | lr | val % | test % | stages off % | wall s | CPU s | load |",
             "|---|---|---|---|---|---|---|---|"]
    for method, (tried, chosen) in rates.items():
        for lr in tried:
            for row in rows:
                if (row["method"], row["variant"], row["seed"], row["lr"]) == (method, "plain", seeds[0], lr):
                    mark = "**" if lr == chosen else ""
                    lines.append(f"| {method} | {mark}{lr:g}{mark} | {row['val_acc']:.2f} | {row['test_acc']:.2f} | "
                                 f"{row['test_acc_stages_off']:.2f} | {row['wall']:.0f} | {row['cpu']:.0f} | "
                                 f"{row['load']:.1f} |")
    chosen = {method: rate for method, (_, rate) in rates.items()}
    if None in chosen.values():
        return lines + ["\nThe learning-rate search has not finished."]

    def runs(variant: str, method: str = "refined") -> dict[int, dict[str, Any]]:
        return {row["seed"]: row for row in rows if (row["method"], row["variant"], row["lr"]) ==
                (method, variant, chosen[method])}

    full = runs("plain", "full")
    lines += [f"\nRefined against full depth at their rates, seeds {list(seeds)}: mean ± std over seeds; per seed, the "
              "refined run's wall time and CPU time over the full-depth run's of the same seed (median, range).\n",
              "| run | lr | seeds | test % | difference to full, points | stages off % | final steps | refined at "
              "| wall / full | CPU / full | CPU min | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    variants = ["plain", *VARIANTS]
    for method, variant in [("full", "plain")] + [("refined", v) for v in variants]:
        picked = runs(variant, method)
        label = method if variant == "plain" else f"refined, {VARIANTS[variant][0]}"
        if not picked:
            lines.append(f"| {label} | {chosen[method]:g} | - | not measured | | | | | | | | |")
            continue
        paired = [seed for seed in picked if seed in full]
        differences = [picked[s]["test_acc"] - full[s]["test_acc"] for s in paired]
        walls = [picked[s]["wall"] / full[s]["wall"] for s in paired]
        cpus = [picked[s]["cpu"] / full[s]["cpu"] for s in paired]
        values = list(picked.values())
        lines.append(
            f"| {label} | {chosen[method]:g} | {len(values)} | {_mean_std([r['test_acc'] for r in values])} | "
            f"{_mean_std(differences) if method == 'refined' else '-'} | "
            f"{_mean_std([r['test_acc_stages_off'] for r in values], 1)} | "
            f"{', '.join(str(r['final_steps']) for r in values)} | "
            f"{'; '.join(r['refine_epochs'] or '-' for r in values) if method == 'refined' else '-'} | "
            f"{_median_range(walls) if method == 'refined' else '1'} | "
            f"{_median_range(cpus) if method == 'refined' else '1'} | "
            f"{_mean_std([r['cpu'] / 60 for r in values], 1)} | {min(r['load'] for r in values):.1f}-"
            f"{max(r['load'] for r in values):.1f} |")
    return lines


def claims_b_d(out: Path, seeds: Sequence[int]) -> list[str]:
    """Accuracy at other schemes and step counts (b), compression (d) and the smoothness of theta(t)."""
    done = {(m, s): out / "analysis" / f"{m}_s{s}" for m in ("refined", "full") for s in seeds
            if (out / "analysis" / f"{m}_s{s}" / "cost.json").is_file()}
    if not done:
        return ["\nClaims (b) and (d): not measured yet."]
    lines = []
    sweeps = {key: _read_csv(path / "manifestation.csv") for key, path in done.items()}
    steps = sorted({int(r["n_steps"]) for rows in sweeps.values() for r in rows if r["scheme"] != "stages_off"})
    for mode in ("as trained", "recalibrated"):
        lines += [f"\n(b) Test accuracy (%, first {SWEEP_IMAGES} test images) by scheme and steps per stage, BatchNorm "
                  f"statistics {mode}; mean ± std over the seeds measured; **bold**: the training manifestation.\n",
                  "| model | seeds | scheme | stages off | " + " | ".join(f"N={n}" for n in steps) + " |",
                  "|---|---|---|---|" + "---|" * len(steps)]
        for method in ("refined", "full"):
            keys = [key for key in done if key[0] == method]
            if not keys:
                continue
            off = _mean_std([100 * float(r["accuracy"]) for key in keys for r in sweeps[key]
                             if r["scheme"] == "stages_off"], 1)
            for scheme in SCHEMES:
                cells = []
                for n in steps:
                    picked = [r for key in keys for r in sweeps[key]
                              if (r["scheme"], int(r["n_steps"]), r["bn"]) == (scheme, n, mode)]
                    text = _mean_std([100 * float(r["accuracy"]) for r in picked], 1)
                    cells.append(f"**{text}**" if picked and picked[0]["trained"] == "True" else text)
                lines.append(f"| {method} | {len(keys)} | {scheme} | {off} | " + " | ".join(cells) + " |")
    lines += ["\n(d) Compression without data (L2 projection onto K pieces, N steps per stage): test accuracy (%, all "
              "10,000 test images), mean ± std over the seeds measured; K = N = 0 is the stages-off baseline.\n"]
    compression = {key: _read_csv(path / "compression.csv") for key, path in done.items()}
    first = next(iter(compression.values()))
    pairs = [(int(r["n_basis"]), int(r["n_steps"])) for r in first]
    lines += ["| model | seeds | " + " | ".join("stages off" if k == 0 else f"K={k}, N={n}" for k, n in pairs) + " |",
              "|---|---|" + "---|" * len(pairs)]
    for method in ("refined", "full"):
        keys = [key for key in done if key[0] == method]
        if keys:
            cells = [_mean_std([100 * float(r["accuracy"]) for key in keys for r in compression[key]
                                if (int(r["n_basis"]), int(r["n_steps"])) == pair], 1) for pair in pairs]
            lines.append(f"| {method} | {len(keys)} | " + " | ".join(cells) + " |")
    lines.append("| parameters | | " + " | ".join(f"{int(r['parameters']):,}" for r in first) + " |")
    lines += ["\nMean relative jump between neighbouring pieces of theta(t), per stage (0: pieces equal; ~1.4: "
              "unrelated), mean ± std over the seeds measured.\n", "| model | stage 0 | stage 1 | stage 2 |",
              "|---|---|---|---|"]
    for method in ("refined", "full"):
        keys = [key for key in done if key[0] == method and (done[key] / "depth_stages.csv").is_file()]
        if keys:
            stages = [_read_csv(done[key] / "depth_stages.csv") for key in keys]
            cells = [_mean_std([float(r["mean_relative_jump"]) for rows in stages for r in rows
                                if int(r["stage"]) == i], 3) for i in range(3)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    costs = [json.loads((path / "cost.json").read_text())["cpu_seconds"] for path in done.values()]
    lines.append(f"\nStudy of one model: {statistics.mean(costs) / 60:.1f} CPU-minutes on average.")
    return lines


def figures(out: Path, lrs: Sequence[float], seeds: Sequence[int], most: int = 3) -> list[Path]:
    """``OUT/figures``: test accuracy against CPU time of every run at the chosen rates (claim (c)), and, for the
    first seed studied, the manifestation sweep of both models and the compression of the refined one."""
    from lightning_cnet.analysis.plots import _pyplot, _save, plot_compression, plot_manifestation

    target = out / "figures"
    written = []
    rows = read_rows(out / "runs.csv")
    chosen = {method: rate_search(rows, method, lrs, seeds[0], most)[1] for method in ("refined", "full")}
    if None not in chosen.values():
        plt = _pyplot()
        figure, ax = plt.subplots(figsize=(7.5, 4.5))
        groups = [("full", "plain", "full depth"), ("refined", "plain", "refined")] + [
            ("refined", key, f"refined, {label}") for key, (label, _) in VARIANTS.items()]
        off = []
        for index, (method, variant, label) in enumerate(groups):
            picked = [r for r in rows if (r["method"], r["variant"], r["lr"]) == (method, variant, chosen[method])]
            off += [r["test_acc_stages_off"] for r in picked]
            if picked:
                ax.plot([r["cpu"] / 60 for r in picked], [r["test_acc"] for r in picked], linestyle="none",
                        marker="os^v<>D"[index % 7], color=f"C{index}", label=label)
        ax.set_xlabel("CPU minutes of training (one thread)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Fashion-MNIST: one point per run (stages off: {min(off):.0f}-{max(off):.0f}%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        written.append(_save(figure, target / "refinement_fashion_mnist.png"))
    studied = [seed for seed in seeds if all((out / "analysis" / f"{m}_s{seed}" / "cost.json").is_file()
                                              for m in ("refined", "full"))]
    if studied:
        seed = studied[0]

        def typed(path: Path) -> list[dict[str, Any]]:
            return [{**row, "n_steps": int(row["n_steps"]), "accuracy": float(row["accuracy"]),
                     "logit_distance": float(row["logit_distance"]), "trained": row["trained"] == "True"}
                    for row in _read_csv(path)]

        sweeps = {f"{m} s{seed}": typed(out / "analysis" / f"{m}_s{seed}" / "manifestation.csv")
                  for m in ("refined", "full")}
        written.append(plot_manifestation(sweeps, target / "manifestation_fashion_mnist.png"))
        compression = [{**row, **{key: int(row[key]) for key in ("n_basis", "n_steps", "parameters")},
                        "accuracy": float(row["accuracy"]), "ms_per_batch": float(row["ms_per_batch"])}
                       for row in _read_csv(out / "analysis" / f"refined_s{seed}" / "compression.csv")]
        written.append(plot_compression(compression, target / "compression_fashion_mnist.png", trained=(4, 4)))
    return written


def tables(out: Path, lrs: Sequence[float], seeds: Sequence[int], most: int = 3) -> str:
    """Markdown tables of what ``OUT`` holds (missing parts are marked as not measured)."""
    rows = read_rows(out / "runs.csv")
    total = sum(row["cpu"] for row in rows) / 3600
    head = [f"# Fashion-MNIST study ({len(rows)} runs, {total:.2f} CPU-hours of training)"]
    return "\n".join(head + claim_c(rows, lrs, seeds, most) + claims_b_d(out, seeds)) + "\n"


# ---------------------------------------------------------------------------------------------------- driver
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drive(out: Path, args: argparse.Namespace) -> None:
    """Run the plan's jobs, ``--workers`` at a time, each in a fresh ``nice`` process; return when all are done."""
    running_dir = out / "running"
    running_dir.mkdir(parents=True, exist_ok=True)
    children: dict[str, subprocess.Popen] = {}
    while True:
        for key, child in list(children.items()):
            if child.poll() is not None:
                (running_dir / key).unlink(missing_ok=True)
                del children[key]
                if child.returncode:
                    print(f"job {key} failed with exit code {child.returncode}; see {out / 'logs'}", flush=True)
        busy = set()
        for path in running_dir.iterdir():  # jobs of this driver or of an earlier one (restarted with new code)
            if _alive(int(path.read_text() or 0)):
                busy.add(path.name)
            else:
                path.unlink()
        rows = read_rows(out / "runs.csv")
        jobs, more = plan(rows, args.lrs, args.seeds, args.variants, args.most_rates)
        failed = {path.name for path in (out / "failed").iterdir()} if (out / "failed").is_dir() else set()
        ready = [job for job in jobs if not is_done(out, rows, job) and job.key not in busy | failed]
        if not ready and not busy and not more:
            return
        while ready and len(busy) < args.workers:
            job = ready.pop(0)
            children[job.key] = _start(out, job, args)
            (running_dir / job.key).write_text(str(children[job.key].pid))
            busy.add(job.key)
            print(f"{time.strftime('%H:%M:%S')} started {job.key} (load {os.getloadavg()[0]:.1f})", flush=True)
        time.sleep(args.poll)


def analysis_dir(out: Path, job: Job) -> Path:
    return out / "analysis" / f"{job.method}_s{job.seed}"


def is_done(out: Path, rows: Sequence[dict[str, Any]], job: Job) -> bool:
    """Whether ``job`` finished: its row is in ``rows``, or its analysis wrote its cost."""
    if job.kind == "analyze":
        return (analysis_dir(out, job) / "cost.json").is_file()
    return any((row["method"], row["variant"], row["lr"], row["seed"]) == (job.method, job.variant, job.lr, job.seed)
               for row in rows)


def _start(out: Path, job: Job, args: argparse.Namespace) -> subprocess.Popen:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = ["nice", "-n", str(args.nice), sys.executable, __file__, "--job", job.key, "--out", str(out)]
    command += ["--data-dir", args.data_dir, "--val-size", str(args.val_size)] + (["--smoke"] if args.smoke else [])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with (logs / f"{job.key.replace(':', '_')}.log").open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                start_new_session=True)


def run_job(out: Path, key: str, smoke: bool, data_dir: str, val_size: int) -> None:
    job = Job.parse(key)
    base = (BASE.replace(**SMOKE) if smoke else BASE).replace(data_dir=data_dir, val_size=val_size)
    try:
        if job.kind == "train":
            print(train_job(out, job, base), flush=True)
        else:
            analyze_job(out, job, base, smoke)
    except Exception:
        (out / "failed").mkdir(exist_ok=True)
        (out / "failed" / key).touch()
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/fashion")
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.1, 0.2], help="the rates every method runs")
    parser.add_argument("--most-rates", type=int, default=3,
                        help="extend the rates by factors of 2 beyond the best one at an end, up to this many")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2, help="jobs at a time")
    parser.add_argument("--nice", type=int, default=5)
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between looks at the running jobs")
    parser.add_argument("--summary", action="store_true", help="print the tables of OUT, run nothing")
    parser.add_argument("--data-dir", default="data",
                        help="searched first for the four files (then /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--smoke", action="store_true", help="smoke run: 2 short epochs, lrs 0.1 0.2, seeds 0 1 2")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    set_threads(1)
    if args.job:
        run_job(out, args.job, args.smoke, args.data_dir, args.val_size)
        return
    if args.smoke:
        args.lrs, args.most_rates, args.workers, args.poll = args.lrs[:2], 2, 1, 0.5
    if not args.summary:
        drive(out, args)
    text = tables(out, args.lrs, args.seeds, args.most_rates)
    (out / "fashion_mnist.md").write_text(text)
    print(text)
    for path in figures(out, args.lrs, args.seeds, args.most_rates):
        print("figure:", path)


if __name__ == "__main__":
    main()
