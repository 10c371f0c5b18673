"""Throughput of ContinuousNet against the equivalent hand-written ResNet, and RK4 against Euler.

With Euler steps, a piecewise-constant basis and ``n_basis = n_steps = T = N``, ``cnet_cifar`` computes
exactly a pre-activation ResNet with ``N`` basic blocks per stage. This script builds that ResNet from
plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` modules, loads it with the ContinuousNet's weights (the skip-init
gate folded into the second kernel), checks that both give the same output, then times, interleaved and
with the order rotated every repeat:

- a training step: forward, cross-entropy, backward, SGD step (``train`` rows);
- inference: ``eval()`` under ``torch.no_grad()`` (``infer`` rows);
- the same ContinuousNet integrated with classic RK4 (4 evaluations of ``R`` per step), for the cost
  of RK4 relative to Euler. The ideal is 4x on the stages and less overall, because the stem, the
  stitches and the head are shared.

Each timed sample runs a few iterations back to back; the table shows median throughputs and the median
of the per-repeat ratios (robust to load from other processes on the machine).

Usage::

    python benchmarks/overhead.py                      # N in {2, 8}, batch in {128, 8}, 2 threads
    python benchmarks/overhead.py --quick              # smoke run, about 30 s
    python benchmarks/overhead.py --steps 4 --batch-sizes 32 --threads 1 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cnet.models import ContinuousNet, get_model
from lightning_cnet.units import PreActBasicUnit

IMAGE_SHAPE = (3, 32, 32)
MAX_REPEATS = 200
NUM_CLASSES = 10


# ---------------------------------------------------------------------- the hand-written ResNet
class PreActBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))``: a pre-activation basic block of constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return x + out


class PreActDownBlock(nn.Module):
    """A stride-2 pre-activation block with a strided 1x1 shortcut (the ContinuousNet's stitch)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.norm1(x)))
        out = self.conv2(self.relu(self.norm2(out)))
        return self.shortcut(x) + out


class PreActResNet(nn.Module):
    """stem -> [N blocks] -> down block -> [N blocks] -> down block -> [N blocks] -> BN-ReLU-pool-linear."""

    def __init__(self, widths: list[int], blocks_per_stage: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(IMAGE_SHAPE[0], widths[0], 3, padding=1, bias=False)
        self.stages = nn.ModuleList(
            nn.Sequential(*(PreActBlock(width) for _ in range(blocks_per_stage))) for width in widths
        )
        self.downs = nn.ModuleList(PreActDownBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norm = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            if index:
                x = self.downs[index - 1](x)
            x = stage(x)
        x = torch.relu(self.norm(x)).mean(dim=(2, 3))
        return self.fc(x)


@torch.no_grad()
def resnet_from(cnet: ContinuousNet) -> PreActResNet:
    """The ResNet that computes what ``cnet`` (Euler, piecewise constant, ``K = N = T``) computes."""
    widths = [stage.unit.conv1.weight[0].shape[1] for stage in cnet.stages]
    n_blocks = cnet.stages[0].n_steps
    for stage in cnet.stages:
        r = stage.resolution
        if (r.scheme, r.basis, r.n_basis, r.n_steps, r.T) != ("euler", "piecewise_constant", n_blocks, n_blocks, n_blocks):
            raise ValueError(f"no equivalent ResNet for a stage at {r}")
        if not isinstance(stage.unit, PreActBasicUnit) or stage.unit.conv1.bias is not None:
            raise ValueError("the reference ResNet has pre-activation basic blocks without convolution biases")
    resnet = PreActResNet(widths, n_blocks)
    resnet.stem.load_state_dict(cnet.stem.state_dict())
    for down, stitch in zip(resnet.downs, cnet.stitches):
        down.load_state_dict(stitch.state_dict())
    resnet.norm.load_state_dict(cnet.norm.state_dict())
    resnet.fc.load_state_dict(cnet.fc.state_dict())
    for stage, blocks in zip(cnet.stages, resnet.stages):
        for k, block in enumerate(blocks):
            unit = stage.unit
            for bn, time_bn in ((block.bn1, unit.norm1.pieces[k]), (block.bn2, unit.norm2.pieces[k])):
                bn.load_state_dict(time_bn.state_dict())
                bn.momentum, bn.eps = time_bn.momentum, time_bn.eps
            block.conv1.weight.copy_(unit.conv1.weight[k])
            gain = 1.0 if stage.gate is None else stage.gate.gate[k]
            block.conv2.weight.copy_(unit.conv2.weight[k] * gain)
    return resnet


@torch.no_grad()
def randomise_(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm affine map, running statistic and skip-init gate a random non-trivial value,
    so that the equality check exercises all of them."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        parts = name.split(".")
        leaf = parts[-2] if parts[-1].isdigit() else parts[-1]  # a piece of a time-dependent tensor: "<name>.<k>"
        if leaf in ("gate", "running_var") or (leaf == "weight" and tensor.dim() <= 1 and "fc" not in name):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        elif leaf in ("bias", "running_mean") and "fc" not in name:
            tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))


def check_same_output(cnet: nn.Module, resnet: nn.Module, images: torch.Tensor) -> float:
    """Largest absolute difference of the two models' logits in eval and training mode; raise if not close."""
    worst = 0.0
    with torch.no_grad():
        for training in (False, True):
            a, b = copy.deepcopy(cnet).train(training), copy.deepcopy(resnet).train(training)
            out_a, out_b = a(images), b(images)
            if not torch.allclose(out_a, out_b, rtol=1e-5, atol=1e-5):
                raise AssertionError(
                    f"ContinuousNet and ResNet differ (training={training}): "
                    f"max |diff| = {(out_a - out_b).abs().max().item():.3g}"
                )
            worst = max(worst, (out_a - out_b).abs().max().item())
    return worst


# ---------------------------------------------------------------------- timing
def train_step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One SGD training step of ``model`` on a fixed batch (a tiny learning rate keeps the weights sane)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def inference_fn(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """One eval-mode forward of ``model`` without autograd."""
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(images)

    return forward


def time_interleaved(
    fns: dict[str, Callable[[], None]], *, repeats: int, warmup: int, inner: int, min_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each function: samples of ``inner`` calls, the order of the functions rotated
    every repeat, after ``warmup`` untimed calls of each; at least ``repeats`` samples, and more until
    the timed part has lasted ``min_seconds`` (at most ``MAX_REPEATS``)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    repeat = 0
    while repeat < repeats or (time.perf_counter() - start < min_seconds and repeat < MAX_REPEATS):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            sample_start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - sample_start) / inner)
        repeat += 1
    return samples


@dataclass
class Row:
    mode: str
    batch: int
    n: int
    resnet: float  # images per second (median)
    cnet: float
    ratio: float  # median over repeats of throughput ContinuousNet / throughput ResNet
    ratio_q1: float
    ratio_q3: float
    repeats: int
    rk4: float | None  # images per second of the RK4 ContinuousNet, if timed
    rk4_cost: float | None  # median over repeats of time RK4 / time Euler
    seconds: float


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def measure(n: int, batch: int, mode: str, args: argparse.Namespace) -> Row:
    """Build the three models for ``N = n``, check the ResNet against the ContinuousNet and time them."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    cnet = get_model(args.model, scheme="euler", n_steps=n, n_basis=n, T=float(n), skip_init=not args.no_skip_init)
    randomise_(cnet, generator)
    resnet = resnet_from(cnet)
    models: dict[str, nn.Module] = {"resnet": resnet, "cnet": cnet}
    if mode in args.rk4_modes:
        models["rk4"] = copy.deepcopy(cnet)
        models["rk4"].set_manifestation(scheme="rk4")
    images = torch.randn(batch, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    check_same_output(cnet, resnet, images[: min(batch, 8)])

    if mode == "train":
        fns = {name: train_step_fn(model, images, labels) for name, model in models.items()}
    else:
        fns = {name: inference_fn(model, images) for name, model in models.items()}
    inner = max(1, round(args.images_per_sample / batch))
    start = time.perf_counter()
    samples = time_interleaved(
        fns, repeats=args.repeats, warmup=args.warmup, inner=inner, min_seconds=args.min_seconds
    )
    ratios = [r / c for r, c in zip(samples["resnet"], samples["cnet"])]
    costs = [k / c for k, c in zip(samples.get("rk4", ()), samples["cnet"])]
    q1, ratio, q3 = quartiles(ratios)
    return Row(
        mode=mode, batch=batch, n=n,
        resnet=batch / statistics.median(samples["resnet"]),
        cnet=batch / statistics.median(samples["cnet"]),
        ratio=ratio, ratio_q1=q1, ratio_q3=q3, repeats=len(ratios),
        rk4=batch / statistics.median(samples["rk4"]) if costs else None,
        rk4_cost=statistics.median(costs) if costs else None,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------- report
TARGETS = {128: 0.97, 8: 0.90}
RK4_TARGET = 4.1


def header(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"# {args.model}, input {'x'.join(map(str, IMAGE_SHAPE))}, euler/piecewise_constant K=N=T, "
        f"skip_init={not args.no_skip_init}\n"
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads (of {os.cpu_count()} CPUs: {cpu}), "
        f"python {platform.python_version()}, {platform.system()} {platform.release()}\n"
        f"# >= {args.repeats} repeats and >= {args.min_seconds:g} s per row (after {args.warmup} warm-up), "
        f"~{args.images_per_sample} images per sample, interleaved, order rotated every repeat; "
        f"RK4 timed in: {' '.join(args.rk4_modes) or 'none'}"
    )


def print_table(rows: list[Row]) -> None:
    print(
        f"{'mode':<6}{'batch':>6}{'N':>4} | {'ResNet img/s':>12}{'CNet img/s':>12}{'CNet/ResNet':>12}"
        f"{'[q1, q3]':>15}{'target':>8} | {'RK4 img/s':>10}{'RK4/Euler':>10} | {'reps':>5}{'s':>5}"
    )
    for r in rows:
        target = TARGETS.get(r.batch)
        verdict = "" if target is None else f"{target:.2f}{'+' if r.ratio >= target else '!'}"
        rk4 = f"{'-':>10}{'-':>10}" if r.rk4 is None else f"{r.rk4:>10.1f}{r.rk4_cost:>9.2f}x"
        print(
            f"{r.mode:<6}{r.batch:>6}{r.n:>4} | {r.resnet:>12.1f}{r.cnet:>12.1f}{r.ratio:>12.3f}"
            f"{f'[{r.ratio_q1:.3f}, {r.ratio_q3:.3f}]':>15}{verdict:>8} | {rk4} | {r.repeats:>5}{r.seconds:>5.0f}"
        )
    print(
        "# CNet/ResNet: throughput ratio, median of per-repeat ratios ('+' meets the target, '!' misses it); "
        f"RK4/Euler: cost per call of the RK4 ContinuousNet relative to Euler (target <= {RK4_TARGET}x)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnet_cifar", help="a registered ContinuousNet builder")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8], help="values of N = K = T")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 8])
    parser.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per model and row")
    parser.add_argument("--min-seconds", type=float, default=6.0,
                        help="keep taking samples of a row until its timed part lasts this long")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model before timing")
    parser.add_argument("--images-per-sample", type=int, default=32,
                        help="each sample runs max(1, this / batch) calls back to back")
    parser.add_argument("--no-skip-init", action="store_true", help="build the ContinuousNet without gates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rk4-modes", nargs="*", choices=["train", "infer"], default=["infer"],
                        help="modes in which the RK4 ContinuousNet is timed too (its training step is the costliest)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=2 only, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.min_seconds = [2], 3, 1.0
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(header(args), flush=True)
    rows = []
    for mode in args.modes:
        for batch in args.batch_sizes:
            for n in args.steps:
                rows.append(measure(n, batch, mode, args))
                print(f"  {mode} batch={batch} N={n}: ratio {rows[-1].ratio:.3f} ({rows[-1].seconds:.0f} s)", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
