"""How hard is HardDigitsDataModule? Train a small ResNet on it and print the test accuracy.

The network is ``cnet_digits`` with Euler, two steps, two weight pieces and ``T = 2``: exactly a
pre-activation ResNet (3x3 stem, stages of widths 8-16-32 with two basic blocks each, stride-2
transitions, BN-ReLU-avgpool-linear head). Training follows the digits baseline: SGD with
Nesterov momentum 0.9, weight decay 5e-4, OneCycle peaking at lr 0.1, batch 64; accuracy is
read after the final epoch, with no model selection. ``--plain`` trains the same way on the
undistorted digits at the same image size, for reference.

Usage::

    python benchmarks/hard_digits_difficulty.py --epochs 12 --seeds 0 1 2
    python benchmarks/hard_digits_difficulty.py --plain --seeds 0
    python benchmarks/hard_digits_difficulty.py --noise 0.3 --rotation 20   # other strengths
    python benchmarks/hard_digits_difficulty.py --device cuda --precision bf16
    python benchmarks/hard_digits_difficulty.py --smoke                     # one epoch at 8x8: checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import _bench
import torch
import torch.nn.functional as F

from lightning_cnet.data import DigitsDataModule, HardDigitsDataModule
from lightning_cnet.models import get_model


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             precision: str) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with _bench.autocast(device, precision):
            predicted = model(images.to(device)).argmax(1)
        correct += (predicted.cpu() == labels).sum().item()
        total += len(labels)
    return correct / total


def train_once(args: argparse.Namespace, seed: int, device: torch.device) -> dict[str, float]:
    if args.plain:
        dm = DigitsDataModule(image_size=args.image_size, batch_size=64, seed=seed)
    else:
        strengths = {k: getattr(args, k) for k in ("rotation", "shear", "scale", "translation", "noise")}
        dm = HardDigitsDataModule(image_size=args.image_size, batch_size=64, seed=seed, **strengths)
    dm.setup("fit")
    torch.manual_seed(seed)
    model = get_model("cnet_digits", num_classes=10, in_chans=1, scheme="euler", n_steps=2, n_basis=2, T=2.0)
    model.to(device)
    train_loader = dm.train_dataloader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.1, epochs=args.epochs, steps_per_epoch=len(train_loader), pct_start=0.15
    )
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad(set_to_none=True)
            with _bench.autocast(device, args.precision):
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            scheduler.step()
    seconds = time.perf_counter() - start
    return {
        "train": accuracy(model, dm.train_dataloader(), device, args.precision),
        "val": accuracy(model, dm.val_dataloader(), device, args.precision),
        "test": accuracy(model, dm.test_dataloader(), device, args.precision),
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model and data seeds")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--plain", action="store_true", help="train on the undistorted digits instead")
    defaults = HardDigitsDataModule().hparams
    for name in ("rotation", "shear", "scale", "translation", "noise"):
        parser.add_argument(f"--{name}", type=float, default=defaults[name])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=sorted(_bench.PRECISIONS), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one epoch at 8x8, one seed: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds, args.image_size = 1, [0], 8
    device = _bench.configure(args)

    print(f"{'plain' if args.plain else 'hard'} digits, {args.image_size}x{args.image_size}, {args.epochs} epochs")
    if not args.plain:
        print(", ".join(f"{k}={getattr(args, k)}" for k in ("rotation", "shear", "scale", "translation", "noise")))
    results = []
    for seed in args.seeds:
        result = train_once(args, seed, device)
        results.append(result)
        print(
            f"seed {seed}: train {100 * result['train']:.2f}%  val {100 * result['val']:.2f}%  "
            f"test {100 * result['test']:.2f}%  ({result['seconds']:.1f} s)",
            flush=True,
        )
    tests = [result["test"] for result in results]
    print(f"test accuracy: mean {100 * statistics.mean(tests):.2f}%, min {100 * min(tests):.2f}%, "
          f"max {100 * max(tests):.2f}% over {len(tests)} seeds")
    return results


if __name__ == "__main__":
    main()
