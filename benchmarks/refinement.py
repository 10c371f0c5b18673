"""Incremental-in-depth training vs full-depth training: wall time and test accuracy side by side.

Both runs train the same final architecture (``cnet_digits``, RK4, 8 steps and 8 weight pieces per stage,
``T`` fixed) for the same number of epochs with the same optimizer and LR schedule. The *refined* run starts
at 1 step per stage and doubles at ``--refine-at`` (1 -> 2 -> 4 -> 8) with :class:`DepthRefinementCallback`;
the *full* run trains at 8 from the start. Runs are interleaved per seed (the machine is shared, so compare
ratios), each in its own Trainer; the time of ``trainer.fit`` is reported, and the refinement itself (the
callback's ``seconds``) is reported as a share of the mean refined epoch. Data: ``HardDigitsDataModule``
(offline), or CIFAR-10 with ``--data cifar10`` when it is present.

Usage::

    python benchmarks/refinement.py --epochs 12 --refine-at 3 6 9 --seeds 0 1   # 16x16 hard digits
    python benchmarks/refinement.py --data cifar10 --root data/ --epochs 30 --refine-at 5 10 15
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pytorch_lightning as pl
import torch

from lightning_cnet.callbacks import DepthRefinementCallback
from lightning_cnet.module import ContinuousNetClassifier


def datamodule(args: argparse.Namespace, seed: int) -> pl.LightningDataModule:
    if args.data == "cifar10":
        from lightning_cnet.data import CIFAR10DataModule

        return CIFAR10DataModule(root=args.root, batch_size=args.batch_size, seed=seed)
    from lightning_cnet.data import HardDigitsDataModule

    return HardDigitsDataModule(image_size=args.image_size, batch_size=args.batch_size, seed=seed)


def run(args: argparse.Namespace, seed: int, refined: bool) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    final_steps = 2 ** len(args.refine_at)
    dm = datamodule(args, seed)
    task = ContinuousNetClassifier(
        "cnet_cifar" if args.data == "cifar10" else "cnet_digits", num_classes=dm.num_classes, in_chans=dm.in_chans,
        scheme=args.scheme, n_steps=1 if refined else final_steps, T=args.T, optimizer="sgd", lr=args.lr,
        momentum=0.9, weight_decay=5e-4, lr_schedule="cosine",
    )
    callbacks = []
    if refined:
        callbacks.append(DepthRefinementCallback(args.refine_at, optimizer_state=args.optimizer_state,
                                                 noise_std=args.noise, seed=seed, evaluate=False, verbose=False))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    wall = time.perf_counter() - start
    test_acc = trainer.test(task, datamodule=dm, verbose=False)[0]["test_acc"]
    refine_seconds = sum(entry["seconds"] for entry in callbacks[0].history) if refined else 0.0
    assert [r.n_steps for r in task.model.resolution] == [final_steps] * 3
    return {"wall": wall, "test_acc": 100 * test_acc, "refine_seconds": refine_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["hard_digits", "cifar10"], default="hard_digits")
    parser.add_argument("--root", default="data", help="CIFAR-10 directory")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--refine-at", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--scheme", default="rk4")
    parser.add_argument("--T", type=float, default=1.0, help="physical depth per stage (the same in both runs)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--noise", type=float, default=0.0, help="refinement noise (the paper: 0.1)")
    parser.add_argument("--optimizer-state", choices=["interpolate", "reset"], default="interpolate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, list[dict[str, float]]] = {"refined": [], "full": []}
    for seed in args.seeds:
        for name in ("refined", "full") if seed % 2 == 0 else ("full", "refined"):
            result = run(args, seed, refined=name == "refined")
            results[name].append(result)
            print(f"seed {seed} {name:8s} wall {result['wall']:7.1f} s  test acc {result['test_acc']:6.2f}%", flush=True)

    steps = 2 ** len(args.refine_at)
    print(f"\n{args.data}, {args.scheme}, 1 -> {steps} at {args.refine_at} vs {steps} from the start, "
          f"{args.epochs} epochs, T={args.T}, lr={args.lr}, seeds {args.seeds}")
    print(f"{'run':10s} {'wall s (mean)':>14s} {'test acc % (mean)':>18s}  per seed")
    for name, runs in results.items():
        walls, accs = [r["wall"] for r in runs], [r["test_acc"] for r in runs]
        per_seed = ", ".join(f"{a:.2f}" for a in accs)
        print(f"{name:10s} {statistics.mean(walls):14.1f} {statistics.mean(accs):18.2f}  {per_seed}")
    ratios = [r["wall"] / f["wall"] for r, f in zip(results["refined"], results["full"])]
    delta = statistics.mean(r["test_acc"] - f["test_acc"] for r, f in zip(results["refined"], results["full"]))
    refine_share = [
        r["refine_seconds"] / len(args.refine_at) / (r["wall"] / args.epochs) for r in results["refined"]
    ]
    print(f"wall time refined / full: {', '.join(f'{x:.3f}' for x in ratios)} "
          f"(mean saving {100 * (1 - statistics.mean(ratios)):.1f}%)")
    print(f"accuracy refined - full: {delta:+.2f} points")
    print(f"one refinement / mean refined epoch: {100 * max(refine_share):.3f}% (max over seeds)")
    if not all(math.isfinite(x) for x in ratios):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()
