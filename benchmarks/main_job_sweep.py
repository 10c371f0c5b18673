"""How the main job was chosen: refined training on the hard digits over schemes, depths ``T`` and learning rates.

Every (scheme, T, lr) trains on every seed (1 -> ``final`` steps at ``--refine-at``); per (scheme, T) the learning
rate with the best mean *validation* accuracy is kept, and its test accuracy (mean and standard deviation over
seeds), its stages-off test accuracy (every ODE stage replaced by the identity) and its wall time are reported.
Rows are appended to ``--out`` as they finish, so a long sweep can be read while it runs.

Usage::

    python benchmarks/main_job_sweep.py --schemes rk4 midpoint --T 2 4 8 --lrs 0.05 0.1 0.2 --seeds 0 1 2
    python benchmarks/main_job_sweep.py --smoke          # smoke run: one tiny configuration
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
from pathlib import Path

from _experiment import RunConfig, run, set_threads

COLUMNS = ("scheme", "T", "lr", "seed", "wall", "val_acc", "test_acc", "test_acc_stages_off")


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    def mean(key: str) -> float:
        return statistics.mean(float(row[key]) for row in rows)

    tests = [float(row["test_acc"]) for row in rows]
    return {"val": mean("val_acc"), "test": statistics.mean(tests),
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "off": mean("test_acc_stages_off"), "wall": mean("wall")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["rk4", "midpoint"])
    parser.add_argument("--T", nargs="+", type=float, default=[2.0, 4.0, 8.0])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--refine-at", nargs="*", type=int, default=[3, 6, 9])
    parser.add_argument("--final-steps", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="main_job_sweep.csv")
    parser.add_argument("--smoke", action="store_true", help="smoke run: one configuration, 2 epochs, 2 batches")
    args = parser.parse_args()
    set_threads(args.threads)
    base = RunConfig(final_steps=args.final_steps, refine_at=tuple(args.refine_at), epochs=args.epochs,
                     image_size=args.image_size)
    if args.smoke:
        args.schemes, args.T, args.lrs, args.seeds = args.schemes[:1], args.T[:1], args.lrs[:1], args.seeds[:1]
        base = base.replace(final_steps=2, refine_at=(1,), epochs=2, limit_train_batches=2)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, float]] = []
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for scheme, depth, lr, seed in itertools.product(args.schemes, args.T, args.lrs, args.seeds):
            result = run(base.replace(scheme=scheme, T=depth, lr=lr, seed=seed))
            row = {"scheme": scheme, "T": depth, "lr": lr, "seed": seed,
                   **{key: round(result[key], 3) for key in COLUMNS[4:]}}
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    print(f"\nhard digits {args.image_size}x{args.image_size}, refined 1 -> {base.final_steps} at "
          f"{list(base.refine_at)}, {base.epochs} epochs, seeds {args.seeds}; lr chosen on validation")
    print(f"{'scheme':9s} {'T':>4s} {'lr':>5s} | {'val %':>6s} {'test % (mean +- std)':>21s} {'stages off %':>13s} "
          f"{'wall s':>7s}")
    for scheme, depth in itertools.product(args.schemes, args.T):
        by_lr = {lr: _summary([r for r in rows if (r["scheme"], r["T"], r["lr"]) == (scheme, depth, lr)])
                 for lr in args.lrs}
        lr, best = max(by_lr.items(), key=lambda item: item[1]["val"])
        print(f"{scheme:9s} {depth:4.1f} {lr:5.2f} | {best['val']:6.2f} {best['test']:13.2f} "
              f"+- {best['test_std']:5.2f} {best['off']:13.2f} {best['wall']:7.1f}")


if __name__ == "__main__":
    main()
