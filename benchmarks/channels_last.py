"""Throughput of a ContinuousNet in ``channels_last`` memory format against the default (contiguous) format.

The same model (same weights) is copied twice: one copy stays contiguous, the other is converted with
``model.to(memory_format=torch.channels_last)`` and fed ``channels_last`` images. The script checks that both give
the same logits, then times, interleaved and with the order rotated every repeat:

- a training step: forward, cross-entropy, backward, SGD step (``train`` rows);
- inference: ``eval()`` under ``torch.no_grad()`` (``infer`` rows).

The table shows median throughputs and ``CL/contig``, the median of the per-repeat throughput ratios
(``channels_last`` over contiguous; above 1 is faster) with its quartiles. On CPU, oneDNN runs convolutions in
either format; the format pays off mostly on GPUs with tensor cores under mixed precision (``--device cuda
--amp``).

Usage::

    python benchmarks/channels_last.py                       # batch 128 and 8, train and infer, 1 thread
    python benchmarks/channels_last.py --smoke               # smoke run, a few seconds
    python benchmarks/channels_last.py --device cuda --amp --batch-sizes 256
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnet.models import get_model

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def to_format(model: nn.Module, channels_last: bool) -> nn.Module:
    form = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=form)


def autocast(args: argparse.Namespace) -> object:
    return torch.autocast(args.device, dtype=torch.bfloat16) if args.amp else nullcontext()


def step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str,
            args: argparse.Namespace) -> Callable[[], None]:
    """One training step (SGD, a tiny learning rate keeps the weights sane) or one inference forward."""
    if mode == "infer":
        model.eval()

        def forward() -> None:
            with torch.no_grad(), autocast(args):
                model(images)

        return forward
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(args):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return train


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], None]], args: argparse.Namespace, inner: int
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``args.repeats`` samples of ``inner`` calls, the order rotated every
    repeat, after ``args.warmup`` untimed calls of each."""
    names = list(fns)
    for _ in range(args.warmup):
        for name in names:
            fns[name]()
    synchronize(args.device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            synchronize(args.device)
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def check_same_output(contiguous: nn.Module, channels_last: nn.Module, images: torch.Tensor) -> float:
    """Largest absolute difference of the logits in eval mode; raise if they differ beyond float32 rounding."""
    with torch.no_grad():
        a = copy.deepcopy(contiguous).eval()(images)
        b = copy.deepcopy(channels_last).eval()(images.contiguous(memory_format=torch.channels_last))
    difference = (a - b).abs().max().item()
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise AssertionError(f"channels_last changes the logits: max |diff| = {difference:.3g}")
    return difference


def measure(batch: int, mode: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = get_model(args.model, scheme=args.scheme, n_steps=args.steps, T=float(args.steps)).to(args.device)
    with torch.no_grad():
        for stage in model.stages:  # non-zero gates, so the stages do their share of the work
            for gate in stage.gate.gate:
                gate.fill_(0.5)
    models = {"contiguous": to_format(copy.deepcopy(model), False), "channels_last": to_format(model, True)}
    images = torch.randn(batch, *IMAGE_SHAPE, device=args.device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=args.device)
    difference = check_same_output(models["contiguous"], models["channels_last"], images[:8])
    inputs = {"contiguous": images, "channels_last": images.contiguous(memory_format=torch.channels_last)}
    fns = {name: step_fn(m, inputs[name], labels, mode, args) for name, m in models.items()}
    samples = time_interleaved(fns, args, inner=max(1, round(args.images_per_sample / batch)))
    ratios = [c / cl for c, cl in zip(samples["contiguous"], samples["channels_last"])]
    q1, ratio, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"batch": batch, "mode": mode, "contiguous": batch / statistics.median(samples["contiguous"]),
            "channels_last": batch / statistics.median(samples["channels_last"]), "ratio": ratio, "q1": q1, "q3": q3,
            "difference": difference}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnet_cifar", help="a registered ContinuousNet builder")
    parser.add_argument("--scheme", default="euler")
    parser.add_argument("--steps", type=int, default=2, help="integration steps per stage (K = N = T)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 8])
    parser.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=9, help="timed samples per model and row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model before timing")
    parser.add_argument("--images-per-sample", type=int, default=128,
                        help="each sample runs max(1, this / batch) calls back to back")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="smoke run: batch 8, 3 repeats, 1 warm-up")
    args = parser.parse_args()
    if args.smoke:
        args.batch_sizes, args.repeats, args.warmup, args.images_per_sample = [8], 3, 1, 8
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.model}, input {'x'.join(map(str, IMAGE_SHAPE))}, {args.scheme} N={args.steps}, device "
          f"{args.device}{' bf16 autocast' if args.amp else ''}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, python {platform.python_version()}; {args.repeats} repeats after {args.warmup} warm-up, "
          "interleaved, order rotated every repeat")
    print(f"{'mode':<6}{'batch':>6} | {'contig img/s':>13}{'CL img/s':>11}{'CL/contig':>11}{'[q1, q3]':>17}"
          f" | {'max |diff|':>10}")
    for mode in args.modes:
        for batch in args.batch_sizes:
            r = measure(batch, mode, args)
            spread = f"[{r['q1']:.3f}, {r['q3']:.3f}]"
            print(f"{mode:<6}{batch:>6} | {r['contiguous']:>13.1f}{r['channels_last']:>11.1f}{r['ratio']:>11.3f}"
                  f"{spread:>17} | {r['difference']:>10.2g}")
    print("# CL/contig: median of the per-repeat throughput ratios, channels_last over contiguous (>= 1: no slower)")


if __name__ == "__main__":
    main()
