"""Throughput of ContinuousNet against the equivalent hand-written ResNet, and RK4 against Euler.

With Euler steps, a piecewise-constant basis and ``n_basis = n_steps = T = N``, ``cnet_cifar`` computes exactly a
pre-activation ResNet with ``N`` basic blocks per stage (``_resnet.py``): the ResNet is loaded with the
ContinuousNet's weights, both are checked to give the same logits, then timed interleaved (``_bench.py``):

- a training step: forward, cross-entropy, backward, SGD step (``train`` rows);
- inference: ``eval()`` under ``torch.no_grad()`` (``infer`` rows);
- with ``--ungated``, the same ContinuousNet without skip-init gates (each gate folded into its kernel: the same
  function), which isolates what the gate costs;
- the ContinuousNet integrated with classic RK4 (4 evaluations of ``R`` per step), for the cost of RK4 relative to
  Euler; the ideal is 4x on the stages and less overall, since the stem, stitches and head are shared.

``--profile`` prints instead, per row, the operators of both models side by side (calls and self time, forward and
backward apart) from ``torch.profiler``: where the ContinuousNet spends time the ResNet does not.

Usage::

    python benchmarks/overhead.py                                  # N in {2, 8}, batch in {128, 8}, 1 thread
    python benchmarks/overhead.py --modes train --ungated --csv outputs/overhead.csv
    python benchmarks/overhead.py --profile --steps 8 --batch-sizes 8 --modes train
    python benchmarks/overhead.py --device cuda --precision bf16
    python benchmarks/overhead.py --smoke                          # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import collections
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import _bench
import torch
import torch.nn.functional as F
from _resnet import check_same_output, randomise_, resnet_from, ungated_copy
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_cnet.models import get_model

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
TARGETS = {128: 0.97, 8: 0.93}
RK4_TARGET = 4.1


def train_step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str) -> Callable[[], None]:
    """One SGD training step of ``model`` on a fixed batch (cross-entropy)."""
    return _bench.sgd_step(model, images, lambda logits: F.cross_entropy(logits, labels), precision)


def inference_fn(model: nn.Module, images: torch.Tensor, precision: str) -> Callable[[], None]:
    """One eval-mode forward of ``model`` without autograd."""
    model.eval()

    def forward() -> None:
        with torch.no_grad(), _bench.autocast(images.device, precision):
            model(images)

    return forward


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
    ungated: float | None  # images per second of the ContinuousNet without gates, if timed
    ungated_ratio: float | None  # median over repeats of throughput ungated / throughput ResNet
    rk4: float | None  # images per second of the RK4 ContinuousNet, if timed
    rk4_cost: float | None  # median over repeats of time RK4 / time Euler
    repeats: int
    seconds: float


def build_models(n: int, args: argparse.Namespace, device: torch.device, mode: str) -> dict[str, nn.Module]:
    """The ResNet, the ContinuousNet (and its ungated and RK4 variants when asked for) for ``N = n``."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    cnet = get_model(args.model, scheme="euler", n_steps=n, n_basis=n, T=float(n), num_classes=NUM_CLASSES,
                     in_chans=IMAGE_SHAPE[0])
    randomise_(cnet, generator)
    cnet.to(device)
    models: dict[str, nn.Module] = {"resnet": resnet_from(cnet), "cnet": cnet}
    if args.ungated:
        models["ungated"] = ungated_copy(cnet)
    if mode in args.rk4_modes:
        models["rk4"] = copy.deepcopy(cnet)
        models["rk4"].set_manifestation(scheme="rk4")
    return models


def batch_of(batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def measure(n: int, batch: int, mode: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Build the models for ``N = n``, check them against each other and time them."""
    models = build_models(n, args, device, mode)
    images, labels = batch_of(batch, device, args.seed)
    check_same_output(models["cnet"], models["resnet"], images[: min(batch, 8)])
    if "ungated" in models:
        check_same_output(models["cnet"], models["ungated"], images[: min(batch, 8)])
    if mode == "train":
        fns = {name: train_step_fn(model, images, labels, args.precision) for name, model in models.items()}
    else:
        fns = {name: inference_fn(model, images, args.precision) for name, model in models.items()}
    inner = max(1, round(args.images_per_sample / batch))
    start = time.perf_counter()
    samples = _bench.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, inner=inner,
                                      min_seconds=args.min_seconds, device=device)
    q1, ratio, q3 = _bench.ratio_quartiles(samples["resnet"], samples["cnet"])

    def throughput(name: str) -> float | None:
        return batch / _bench.quartiles(samples[name])[1] if name in samples else None

    return Row(
        mode=mode, batch=batch, n=n, resnet=throughput("resnet"), cnet=throughput("cnet"),
        ratio=ratio, ratio_q1=q1, ratio_q3=q3,
        ungated=throughput("ungated"),
        ungated_ratio=_bench.ratio_quartiles(samples["resnet"], samples["ungated"])[1] if "ungated" in samples
        else None,
        rk4=throughput("rk4"),
        rk4_cost=_bench.ratio_quartiles(samples["rk4"], samples["cnet"])[1] if "rk4" in samples else None,
        repeats=len(samples["cnet"]), seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------- operator profile
OperatorTable = dict[str, dict[str, tuple[int, float]]]  # phase -> operator -> (calls per step, self ms per step)


def operator_profile(step_parts: Callable[[], Callable[[], None]], steps: int, device: torch.device) -> OperatorTable:
    """Calls and self time per operator of ``steps`` training steps, forward and backward profiled apart.

    ``step_parts()`` runs a forward pass and returns the function that runs its backward pass and optimizer step.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    totals: OperatorTable = {"forward": collections.defaultdict(lambda: (0, 0.0)),
                             "backward": collections.defaultdict(lambda: (0, 0.0))}
    for _ in range(steps):
        with profile(activities=activities) as forward_profile:
            backward = step_parts()
            _bench.synchronize(device)
        with profile(activities=activities) as backward_profile:
            backward()
            _bench.synchronize(device)
        for phase, result in (("forward", forward_profile), ("backward", backward_profile)):
            for event in result.key_averages():
                self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
                calls, ms = totals[phase][event.key]
                totals[phase][event.key] = (calls + event.count, ms + self_us / 1e3)
    return {phase: {op: (calls // steps, ms / steps) for op, (calls, ms) in ops.items()}
            for phase, ops in totals.items()}


def profiled_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  precision: str) -> Callable[[], Callable[[], None]]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def forward() -> Callable[[], None]:
        optimizer.zero_grad(set_to_none=True)
        with _bench.autocast(images.device, precision):
            loss = F.cross_entropy(model(images), labels)

        def backward() -> None:
            loss.backward()
            optimizer.step()

        return backward

    return forward


def print_profile(tables: dict[str, OperatorTable], top: int) -> None:
    names = list(tables)
    calls_width, ms_width = 11 * len(names), 12 * len(names)
    print(f"{'operator':<52}" + "".join(f"{phase + ' calls':>{calls_width}}{phase + ' self ms':>{ms_width}}"
                                         for phase in ("fwd", "bwd")))
    print(f"{'':<52}" + ("".join(f"{name:>11}" for name in names) + "".join(f"{name:>12}" for name in names)) * 2)
    ops = {op for table in tables.values() for phase in table.values() for op in phase}

    def total_ms(op: str) -> float:
        return sum(table[phase].get(op, (0, 0.0))[1] for table in tables.values() for phase in table)

    for op in sorted(ops, key=total_ms, reverse=True)[:top]:
        cells = ""
        for phase in ("forward", "backward"):
            cells += "".join(f"{tables[name][phase].get(op, (0, 0.0))[0]:>11}" for name in names)
            cells += "".join(f"{tables[name][phase].get(op, (0, 0.0))[1]:>12.2f}" for name in names)
        print(f"{op[:51]:<52}{cells}")
    cells = ""
    for phase in ("forward", "backward"):
        cells += "".join(f"{sum(c for c, _ in tables[name][phase].values()):>11}" for name in names)
        cells += "".join(f"{sum(ms for _, ms in tables[name][phase].values()):>12.2f}" for name in names)
    print(f"{'(all operators)':<52}{cells}")


def profile_row(n: int, batch: int, args: argparse.Namespace, device: torch.device) -> None:
    models = build_models(n, args, device, "train")
    models.pop("rk4", None)
    images, labels = batch_of(batch, device, args.seed)
    for model in models.values():  # warm-up
        backward = profiled_step(model, images, labels, args.precision)()
        backward()
    tables = {name: operator_profile(profiled_step(model, images, labels, args.precision), args.profile_steps,
                                     device) for name, model in models.items()}
    print(f"\n## train step, batch {batch}, N = {n}: calls and self ms per step (mean of {args.profile_steps})")
    print_profile(tables, args.top)


# ---------------------------------------------------------------------- report
def print_table(rows: Sequence[Row]) -> None:
    print(
        f"{'mode':<6}{'batch':>6}{'N':>4} | {'ResNet img/s':>12}{'CNet img/s':>12}{'CNet/ResNet':>12}"
        f"{'[q1, q3]':>16}{'target':>8} | {'ungated':>9}{'/ResNet':>8} | {'RK4 img/s':>10}{'RK4/Euler':>10} |"
        f"{'reps':>5}{'s':>5}"
    )
    for r in rows:
        target = TARGETS.get(r.batch)
        verdict = "" if target is None else f"{target:.2f}{'+' if r.ratio >= target else '!'}"
        ungated = f"{'-':>9}{'-':>8}" if r.ungated is None else f"{r.ungated:>9.1f}{r.ungated_ratio:>8.3f}"
        rk4 = f"{'-':>10}{'-':>10}" if r.rk4 is None else f"{r.rk4:>10.1f}{r.rk4_cost:>9.2f}x"
        print(
            f"{r.mode:<6}{r.batch:>6}{r.n:>4} | {r.resnet:>12.1f}{r.cnet:>12.1f}{r.ratio:>12.3f}"
            f"{f'[{r.ratio_q1:.3f}, {r.ratio_q3:.3f}]':>16}{verdict:>8} | {ungated} | {rk4} |"
            f"{r.repeats:>5}{r.seconds:>5.0f}"
        )
    print(
        "# CNet/ResNet: throughput ratio, median of per-repeat ratios ('+' meets the target, '!' misses it); "
        "ungated: the ContinuousNet without skip-init gates (same function); "
        f"RK4/Euler: cost per call of the RK4 ContinuousNet relative to Euler (target <= {RK4_TARGET}x)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnet_cifar", help="a registered ContinuousNet builder")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8], help="values of N = K = T")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 8])
    parser.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--images-per-sample", type=int, default=32,
                        help="each sample runs max(1, this / batch) calls back to back")
    parser.add_argument("--ungated", action="store_true", help="also time the ContinuousNet without gates")
    parser.add_argument("--rk4-modes", nargs="*", choices=["train", "infer"], default=["infer"],
                        help="modes in which the RK4 ContinuousNet is timed too (its training step is the costliest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print operator profiles instead of timing")
    parser.add_argument("--profile-steps", type=int, default=3, help="training steps averaged per profile")
    parser.add_argument("--top", type=int, default=25, help="operators shown per profile")
    _bench.add_common_arguments(parser, repeats=7, min_seconds=6.0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_sizes, args.repeats, args.min_seconds, args.warmup = [1], [2], 1, 0.0, 1
        args.images_per_sample, args.profile_steps, args.top = 1, 1, 5
    return args


def header(args: argparse.Namespace, device: torch.device) -> str:
    return (
        f"# {args.model}, input {'x'.join(map(str, IMAGE_SHAPE))}, euler/piecewise_constant K=N=T, skip-init gates\n"
        f"{_bench.machine(device, args.precision)}\n"
        f"# >= {args.repeats} repeats and >= {args.min_seconds:g} s per row (after {args.warmup} warm-up), "
        f"~{args.images_per_sample} images per sample, interleaved, order rotated every repeat; "
        f"RK4 timed in: {' '.join(args.rk4_modes) or 'none'}"
    )


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = _bench.configure(args)
    print(header(args, device), flush=True)
    if args.profile:
        for batch in args.batch_sizes:
            for n in args.steps:
                profile_row(n, batch, args, device)
        return []
    rows = []
    for mode in args.modes:
        for batch in args.batch_sizes:
            for n in args.steps:
                rows.append(measure(n, batch, mode, args, device))
                print(f"  {mode} batch={batch} N={n}: ratio {rows[-1].ratio:.3f} ({rows[-1].seconds:.0f} s)",
                      flush=True)
    print_table(rows)
    print(f"# load average at the end {_bench.load_average()}")
    _bench.write_csv(args.csv, [asdict(row) for row in rows])
    return rows


if __name__ == "__main__":
    main()
