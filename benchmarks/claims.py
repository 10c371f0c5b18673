"""The paper's claims (a), (b) and (d) measured on the hard digits, with the commands a user would run.

Three models are trained with ``lightning-cnet fit`` on every seed (``--seed_everything S --data.init_args.seed S``):

* ``resnet``  ``configs/hard_digits_resnet.yaml``: Euler with 8 steps and 8 pieces from the start, T = 8 (a
  pre-activation ResNet with 8 blocks per stage);
* ``rk4``     ``configs/hard_digits_rk4.yaml``: classic RK4 with 8 steps and 8 pieces from the start, T = 8;
* ``refined`` ``configs/hard_digits.yaml``: the main job (midpoint, refined 1 -> 8, T = 2).

Each checkpoint (``last.ckpt``) is then studied with ``lightning-cnet-analyze``: ``manifestation`` (every scheme,
step counts 1-16, as trained and with BatchNorm statistics re-estimated, stages-off baseline), ``convergence``
(fitted orders) and ``compression`` (pairs K:N); the depth profiles of the three models of seed 0 are drawn side by
side. The tables of means and standard deviations over seeds are written to ``OUT/claims.md`` and printed. Claim
(c), refinement against full-depth training, is ``benchmarks/refinement.py``.

Usage::

    python benchmarks/claims.py --out outputs/claims                 # 3 seeds; about an hour on 2 CPU cores
    python benchmarks/claims.py --out outputs/claims --skip-training # studies and tables from existing runs
    python benchmarks/claims.py --out outputs/claims --resume        # only what is missing (seeds can run apart)
    python benchmarks/claims.py --smoke --out /tmp/claims            # smoke run: one seed, two short epochs
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "resnet": REPO / "configs" / "hard_digits_resnet.yaml",
    "rk4": REPO / "configs" / "hard_digits_rk4.yaml",
    "refined": REPO / "configs" / "hard_digits.yaml",
}
PAIRS = ("8:8", "4:4", "4:8", "2:2", "2:8", "1:1", "1:8")
SMOKE = ("--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1")


#: Run the commands in this process (``--smoke``: seconds of work would otherwise wait on interpreter start-ups and
#: imports); otherwise each runs in its own process, as a user would run it.
IN_PROCESS = False


def _run(module: str, *arguments: str) -> None:
    print("$", "python -m", module, " ".join(arguments), flush=True)
    if IN_PROCESS:
        main = import_module(module if module.endswith(".cli") else f"{module}.cli").main
        saved, sys.argv = sys.argv, [module]  # LightningCLI reads sys.argv too: only the arguments given here
        try:
            main(list(arguments))
        finally:
            sys.argv = saved
        return
    result = subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}):\n{result.stderr[-3000:]}")


def _cli(*arguments: str) -> None:
    _run("lightning_cnet", *arguments)


def _analyze(*arguments: str) -> None:
    _run("lightning_cnet.analysis.cli", *arguments)


def run_directory(out: Path, model: str, seed: int) -> Path:
    return out / "runs" / f"{model}_s{seed}" / "version_0"


def train(out: Path, model: str, seed: int, extra: Sequence[str]) -> None:
    common = ["--config", str(MODELS[model]), "--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    logger = ["--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name",
              f"{model}_s{seed}", "--trainer.enable_progress_bar", "false"]
    _cli("fit", *common, *logger, *extra)


def study(out: Path, model: str, seed: int, smoke: bool) -> None:
    run = run_directory(out, model, seed)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    target = str(out / "analysis" / f"{model}_s{seed}")
    steps = ["--n_steps", "1", "2", "4", "--schemes", "euler", "rk4"] if smoke else []
    _analyze("manifestation", "--ckpt_path", ckpt, "--labels", model, "--recalibrate_bn", "--out", target, *steps,
             *(["--reference_steps", "16"] if smoke else []))
    _analyze("convergence", "--ckpt_path", ckpt, "--out", target,
             *(["--n_steps", "2", "4", "--schemes", "euler", "rk4", "--reference_steps", "16"] if smoke else []))
    _analyze("compression", "--ckpt_path", ckpt, "--pairs", *(("1:1", "1:4") if smoke else PAIRS), "--out", target)


def overlay(out: Path, seed: int) -> Path:
    """One manifestation figure of the three models of ``seed`` (from their tables, nothing recomputed)."""
    from lightning_cnet.analysis.plots import plot_manifestation

    rows = {}
    for model in MODELS:
        rows[model] = [{**row, "n_steps": int(row["n_steps"]), "accuracy": float(row["accuracy"]),
                        "logit_distance": float(row["logit_distance"]), "trained": row["trained"] == "True"}
                       for row in _read(out / "analysis" / f"{model}_s{seed}" / "manifestation.csv")]
    return plot_manifestation(rows, out / "analysis" / "manifestation_overlay.png")


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def _fitted_order(orders: dict[int, list[dict[str, str]]], seeds: Sequence[int], scheme: str, aligned: str) -> str:
    """Mean ± std over seeds of the fitted order of the logits for ``scheme`` (``aligned``: 'True' or 'False')."""
    values = [float(r["fitted_order"]) for s in seeds for r in orders[s]
              if (r["scheme"], r["output"], r["aligned"]) == (scheme, "logits", aligned)]
    values = [v for v in values if v == v]
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}" \
        if values else "-"


def tables(out: Path, seeds: Sequence[int]) -> str:
    """Markdown tables of the studies, means and standard deviations over seeds."""
    lines = []
    manifestation = {(m, s): _read(out / "analysis" / f"{m}_s{s}" / "manifestation.csv") for m in MODELS for s in seeds}
    steps = sorted({int(r["n_steps"]) for rows in manifestation.values() for r in rows if r["scheme"] != "stages_off"})
    for mode in ("as trained", "recalibrated"):
        lines += [f"\nTest accuracy (%) by scheme and steps per stage, BatchNorm statistics {mode}; mean ± std over "
                  f"seeds {list(seeds)}; **bold**: the training manifestation.\n",
                  "| model | scheme | stages off | " + " | ".join(f"N={n}" for n in steps) + " |",
                  "|---|---|---|" + "---|" * len(steps)]
        for model in MODELS:
            schemes = list(dict.fromkeys(r["scheme"] for r in manifestation[model, seeds[0]]
                                         if r["scheme"] != "stages_off"))
            off = _mean_std([100 * float(r["accuracy"]) for s in seeds for r in manifestation[model, s]
                             if r["scheme"] == "stages_off"])
            for scheme in schemes:
                cells = []
                for n in steps:
                    picked = [r for s in seeds for r in manifestation[model, s]
                              if (r["scheme"], int(r["n_steps"]), r["bn"]) == (scheme, n, mode)]
                    text = _mean_std([100 * float(r["accuracy"]) for r in picked])
                    cells.append(f"**{text}**" if picked and picked[0]["trained"] == "True" else text)
                lines.append(f"| {model} | {scheme} | {off} | " + " | ".join(cells) + " |")
    lines += ["\nRelative distance of the logits at the training manifestation to the fine reference (RK4 at the step "
              "count of the study's convergence check, its reference_steps column), as trained; mean ± std over "
              "seeds.\n", "| model | distance |", "|---|---|"]
    for model in MODELS:
        distances = [float(r["logit_distance"]) for s in seeds for r in manifestation[model, s]
                     if r["trained"] == "True" and r["bn"] == "as trained"]
        spread = statistics.stdev(distances) if len(distances) > 1 else 0.0
        lines.append(f"| {model} | {statistics.mean(distances):.3g} ± {spread:.2g} |"
                     if distances else f"| {model} | - |")

    lines += ["\nFitted order of convergence of the logits (slope of log error against log N, N >= the pieces), "
              "mean ± std over seeds.\n", "| model | scheme | tableau order | aligned N | other N |",
              "|---|---|---|---|---|"]
    for model in MODELS:
        orders = {s: _read(out / "analysis" / f"{model}_s{s}" / "convergence_orders.csv") for s in seeds}
        for scheme in dict.fromkeys(r["scheme"] for r in orders[seeds[0]]):
            order = next(r["tableau_order"] for r in orders[seeds[0]] if r["scheme"] == scheme)
            lines.append(f"| {model} | {scheme} | {order} | {_fitted_order(orders, seeds, scheme, 'True')} | "
                         f"{_fitted_order(orders, seeds, scheme, 'False')} |")

    lines += ["\nCompression without data (L2 projection onto K pieces, N steps): test accuracy (%) and parameters; "
              "mean ± std over seeds.\n"]
    compression = {(m, s): _read(out / "analysis" / f"{m}_s{s}" / "compression.csv") for m in MODELS for s in seeds}
    pairs = [(int(r["n_basis"]), int(r["n_steps"])) for r in compression[next(iter(MODELS)), seeds[0]]]
    lines += ["| model | " + " | ".join("stages off" if k == 0 else f"K={k}, N={n}" for k, n in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for model in MODELS:
        cells = [_mean_std([100 * float(r["accuracy"]) for s in seeds for r in compression[model, s]
                            if (int(r["n_basis"]), int(r["n_steps"])) == pair]) for pair in pairs]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    parameters = {(int(r["n_basis"]), int(r["n_steps"])): r["parameters"]
                  for r in compression[next(iter(MODELS)), seeds[0]]}
    lines.append("| parameters | " + " | ".join(f"{int(parameters[p]):,}" for p in pairs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/claims")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--skip-training", action="store_true", help="reuse the runs under OUT/runs")
    parser.add_argument("--resume", action="store_true",
                        help="keep the trained runs and finished studies under OUT, do only what is missing")
    parser.add_argument("--smoke", action="store_true", help="smoke run: one seed, two short epochs")
    args = parser.parse_args()
    global IN_PROCESS
    IN_PROCESS = args.smoke
    out = Path(args.out)
    seeds = args.seeds[:1] if args.smoke else args.seeds
    for seed in seeds:
        for model in MODELS:
            finished = run_directory(out, model, seed) / "finished"
            if not args.skip_training and not (args.resume and finished.is_file()):
                train(out, model, seed, SMOKE if args.smoke else ())
                finished.touch()
            studied = (out / "analysis" / f"{model}_s{seed}" / "compression.csv").is_file()
            if not (args.resume and studied):
                study(out, model, seed, args.smoke)
    checkpoints = [str(run_directory(out, m, seeds[0]) / "checkpoints" / "last.ckpt") for m in MODELS]
    _analyze("depth", "--ckpt_path", *checkpoints, "--labels", *MODELS, "--out", str(out / "analysis" / "depth"))
    overlay(out, seeds[0])
    text = tables(out, seeds)
    (out / "claims.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
