"""Incremental-in-depth vs full-depth training, each with its own learning rate: wall time and test accuracy.

Both methods train the same final model (``cnet_digits`` on the hard digits, ``--final-steps`` steps and pieces
per stage, ``T`` fixed) for the same epochs with SGD and a cosine schedule. *refined* starts at
``final / 2**len(refine_at)`` steps and doubles at ``--refine-at``; *full* trains at ``final`` from the start. For
every ``T`` and method, every learning rate of ``--lrs`` runs on every seed; the rate with the best mean
**validation** accuracy is that method's, and its test accuracy (mean and standard deviation over seeds) and wall
time (``trainer.fit``, no validation during fit) are reported, with the paired difference refined - full per seed;
the wall-time ratio is the median over every pair of runs of one rate and seed, which run back to back.
Then variants of the refined run that may close an accuracy gap run at its chosen rate: the optimizer state reset
instead of interpolated, refinement noise 0.1, BatchNorm statistics re-estimated after each refinement, and
``--extra-epochs`` more epochs at the final resolution (refinements at the same epochs). Runs of one seed are
interleaved (order alternating by seed), one thread, so the machine's load drifts alike over both methods.

Usage::

    python benchmarks/refinement.py                               # T 2 and 8, lrs 0.05 0.1 0.2, seeds 0 1 2
    python benchmarks/refinement.py --T 8 --lrs 0.1 --seeds 0     # one setting
    python benchmarks/refinement.py --smoke                       # smoke run, seconds
    python benchmarks/refinement.py --from-csv t2.csv t8.csv      # the summary of earlier runs, e.g. one per T
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Any

from _experiment import RunConfig, run, set_threads

COLUMNS = ("T", "method", "variant", "lr", "seed", "epochs", "wall", "val_acc", "test_acc", "test_acc_stages_off",
           "refine_seconds")
VARIANTS = {
    "reset optimizer state": {"optimizer_state": "reset"},
    "noise 0.1": {"noise_std": 0.1},
    "recalibrate BN": {"recalibrate_bn": True},
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _record(handle: Any, writer: csv.DictWriter, rows: list[dict], config: RunConfig, method: str,
            variant: str) -> dict:
    result = run(config)
    row = {"T": config.T, "method": method, "variant": variant, "lr": config.lr, "seed": config.seed,
           "epochs": config.epochs, **{key: round(result[key], 3) for key in COLUMNS[6:]}}
    writer.writerow(row)
    handle.flush()  # rows can be read while a long run goes on
    rows.append(row)
    print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def chosen_rates(rows: list[dict]) -> dict[tuple[float, str], float]:
    """Each ``(T, method)``'s learning rate: the best mean validation accuracy over seeds (plain runs only)."""
    chosen = {}
    for depth, method in dict.fromkeys((r["T"], r["method"]) for r in rows):
        plain = [r for r in rows if (r["T"], r["method"], r["variant"]) == (depth, method, "")]
        by_lr = {lr: statistics.mean(r["val_acc"] for r in plain if r["lr"] == lr) for lr in dict.fromkeys(
            r["lr"] for r in plain)}
        chosen[depth, method] = max(by_lr, key=by_lr.get)
    return chosen


def summary(rows: list[dict], base: RunConfig, scheme: str, image_size: int) -> str:
    """The table of every ``T`` and run at its chosen rate, and the paired differences refined - full."""
    chosen = chosen_rates(rows)
    seeds = sorted({r["seed"] for r in rows})
    lrs = sorted({r["lr"] for r in rows if not r["variant"]})
    lines = [f"\nhard digits {image_size}x{image_size}, {scheme}, refined {base.start_steps} -> {base.final_steps} "
             f"at {list(base.refine_at)} vs {base.final_steps} from the start, {base.epochs} epochs, seeds {seeds}; "
             f"each method's lr chosen on validation from {lrs}",
             f"{'T':>4s} {'run':34s} {'lr':>5s} | {'val %':>6s} {'test % mean +- std':>19s} {'off %':>6s} "
             f"{'wall s':>7s}"]
    for depth in dict.fromkeys(r["T"] for r in rows):
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["T"] == depth and r["variant"]))
        for method, variant in [("full", ""), ("refined", "")] + [("refined", v) for v in variants]:
            # a variant runs at one rate only: the refined run's rate when it ran
            lr = chosen[depth, method] if not variant else next(
                r["lr"] for r in rows if (r["T"], r["variant"]) == (depth, variant))
            picked = [r for r in rows if (r["T"], r["method"], r["variant"], r["lr"]) == (depth, method, variant, lr)]
            test, spread = _mean_std([r["test_acc"] for r in picked])
            label = method + (f", {variant}" if variant else "")
            lines.append(f"{depth:4.1f} {label:34s} {lr:5.2f} | {statistics.mean(r['val_acc'] for r in picked):6.2f} "
                         f"{test:11.2f} +- {spread:5.2f} "
                         f"{statistics.mean(r['test_acc_stages_off'] for r in picked):6.2f} "
                         f"{statistics.mean(r['wall'] for r in picked):7.1f}")
        full, refined = ({r["seed"]: r for r in rows if (r["T"], r["method"], r["variant"], r["lr"]) ==
                          (depth, method, "", chosen[depth, method])} for method in ("full", "refined"))
        differences = [refined[s]["test_acc"] - full[s]["test_acc"] for s in seeds]
        mean, spread = _mean_std(differences)
        # the cost does not depend on the rate: time every pair of runs made back to back (same rate and seed)
        plain = {(r["method"], r["lr"], r["seed"]): r["wall"] for r in rows if r["T"] == depth and not r["variant"]}
        ratios = sorted(wall / plain["full", lr, seed] for (method, lr, seed), wall in plain.items()
                        if method == "refined" and ("full", lr, seed) in plain)
        lines.append(f"T={depth:g}: refined - full test accuracy {mean:+.2f} +- {spread:.2f} points (per seed "
                     f"{', '.join(f'{d:+.2f}' for d in differences)}); wall time refined / full, runs of the same "
                     f"rate and seed made back to back: median {statistics.median(ratios):.2f} over {len(ratios)} "
                     f"pairs (range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    return "\n".join(lines)


def read_rows(paths: list[str]) -> list[dict]:
    """Rows of earlier runs' CSV files, typed as :func:`_record` writes them."""
    rows = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append({key: value if key in ("method", "variant") else
                             int(value) if key in ("seed", "epochs") else float(value) for key, value in row.items()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="rk4")
    parser.add_argument("--T", nargs="+", type=float, default=[2.0, 8.0])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--refine-at", nargs="+", type=int, default=[3, 6, 9])
    parser.add_argument("--final-steps", type=int, default=8)
    parser.add_argument("--extra-epochs", type=int, default=4, help="the 'more epochs at the final resolution' variant")
    parser.add_argument("--no-variants", action="store_true")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="refinement.csv")
    parser.add_argument("--from-csv", nargs="+", metavar="CSV",
                        help="print the summary of earlier runs' CSV files (e.g. one per T) instead of running")
    parser.add_argument("--smoke", action="store_true", help="smoke run: tiny sizes, one seed")
    args = parser.parse_args()
    set_threads(args.threads)
    base = RunConfig(scheme=args.scheme, final_steps=args.final_steps, refine_at=tuple(args.refine_at),
                     epochs=args.epochs, image_size=args.image_size)
    if args.smoke:
        args.T, args.lrs, args.seeds, args.extra_epochs = args.T[:1], args.lrs[:2], args.seeds[:1], 1
        base = base.replace(final_steps=2, refine_at=(1,), epochs=2, limit_train_batches=2)

    if args.from_csv:
        print(summary(read_rows(args.from_csv), base, args.scheme, args.image_size))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for depth in args.T:
            for lr in args.lrs:
                for seed in args.seeds:
                    methods = ("refined", "full") if seed % 2 == 0 else ("full", "refined")
                    for method in methods:
                        config = base.replace(T=depth, lr=lr, seed=seed)
                        if method == "full":
                            config = config.replace(refine_at=())
                        _record(handle, writer, rows, config, method, "")
            if args.no_variants:
                continue
            refined = base.replace(T=depth, lr=chosen_rates(rows)[depth, "refined"])
            variants = {**VARIANTS,
                        f"+{args.extra_epochs} epochs at the end": {"epochs": base.epochs + args.extra_epochs}}
            for variant, changes in variants.items():
                for seed in args.seeds:
                    _record(handle, writer, rows, refined.replace(seed=seed, **changes), "refined", variant)

    print(summary(rows, base, args.scheme, args.image_size))


if __name__ == "__main__":
    main()
