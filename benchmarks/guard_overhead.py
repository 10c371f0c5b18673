"""Cost of NonFiniteGuard per training step, relative to the same step without it, inside ``Trainer.fit``.

Each row runs one fit whose training steps are shared out between three configurations, one step each per
cycle, in an order shuffled every cycle (seeded), so that all of them run on the same model, data and machine
load and no configuration always follows the same one:

- ``none``: no guard (the baseline);
- ``stop``: ``NonFiniteGuard()``, the default (one fused check of loss, gradients, parameters, buffers and
  optimizer state after every step, one host sync);
- ``rollback``: ``NonFiniteGuard("rollback")`` (the same check, plus refreshing the snapshot after it).

A second fit per row, interleaved the same way, compares ``none`` with ``anomaly``: autograd's anomaly mode during
the step, what ``Trainer(detect_anomaly=True)`` turns on for a whole fit (``--no-anomaly`` leaves it out; it runs
apart because the garbage it leaves behind slows the next step down, whichever that is).

A step is timed from the first callback's ``on_train_batch_start`` to the last callback's ``on_train_batch_end``:
forward, backward, optimizer step, Lightning's logging and the guard's hooks, without data loading. The clock is
the main thread's CPU time on CPU (``--clock cpu``: with one torch thread all the work runs on it, and time the
core spends on other processes is not counted) and wall time with CUDA synchronisation on GPU (``--clock
wall``). The table shows median step times, the median over cycles of the per-cycle ratio to ``none`` with its
quartiles, and the time spent inside the guard's hooks alone (median per step, and as a share of the step without a
guard), the direct part of its cost and the steadier figure on a busy machine.

Models: ``cnet_digits`` on scikit-learn's digits at 16x16 (``DigitsDataModule``, batch 64, the data of the
shipped ``configs/digits.yaml``) and ``cnet_cifar`` on random 3x32x32 images (batch 32; the cost of a step does
not depend on the pixel values), SGD with momentum, at each ``--n-steps`` (``n_basis = n_steps``).

Usage::

    python benchmarks/guard_overhead.py                 # n_steps 1 and 4, 40 cycles, 1 thread
    python benchmarks/guard_overhead.py --smoke         # smoke run: n_steps 1, 3 cycles
    python benchmarks/guard_overhead.py --models cnet_cifar --n-steps 8 --cycles 20 --scheme rk4
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnet.callbacks import NonFiniteGuard
from lightning_cnet.data import DigitsDataModule
from lightning_cnet.module import ContinuousNetClassifier

BATCH_SIZES = {"cnet_digits": 64, "cnet_cifar": 32}
INPUTS = {"cnet_digits": (1, 16, 16), "cnet_cifar": (3, 32, 32)}
CIFAR_IMAGES = 1024
GUARDS = ("stop", "rollback")


# ---------------------------------------------------------------------- configurations
class AnomalyMode(pl.Callback):
    """Autograd's anomaly detection during the step (``Trainer(detect_anomaly=True)`` keeps it on for the fit)."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        torch.autograd.set_detect_anomaly(True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        torch.autograd.set_detect_anomaly(False)


class Interleaved(pl.Callback):
    """Hands each training batch to one configuration (a callback, or ``None`` for none): every cycle runs each
    configuration once, in a shuffled order. ``setup`` and ``on_fit_start`` reach every configuration; the time
    spent in the active configuration's batch hooks is recorded per step."""

    def __init__(self, configurations: dict[str, pl.Callback | None], clock: Callable[[], float], seed: int) -> None:
        self.configurations = configurations
        self.clock = clock
        self.order = random.Random(seed)
        self.schedule: list[str] = []
        self.hook_seconds: list[float] = []
        self._pending: list[str] = []

    def _run(self, hook: str, *args: Any) -> None:
        callback = self.configurations[self.schedule[-1]]
        if callback is not None:
            start = self.clock()
            getattr(callback, hook)(*args)
            self.hook_seconds[-1] += self.clock() - start

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for callback in filter(None, self.configurations.values()):
            callback.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        for callback in filter(None, self.configurations.values()):
            callback.on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._pending:
            self._pending = list(self.configurations)
            self.order.shuffle(self._pending)
        self.schedule.append(self._pending.pop())
        self.hook_seconds.append(0.0)
        self._run("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._run("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)


class StepStart(pl.Callback):
    """The first callback: marks the start of a step."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock, self.started = clock, 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.started = self.clock()


class StepEnd(pl.Callback):
    """The last callback: records the step's duration."""

    def __init__(self, start: StepStart) -> None:
        self.start = start
        self.seconds: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seconds.append(self.start.clock() - self.start.started)


def make_clock(kind: str) -> Callable[[], float]:
    if kind == "cpu":
        return time.thread_time

    def wall() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    return wall


# ---------------------------------------------------------------------- measurement
@dataclass
class Interleaving:
    """Per-configuration results of one interleaved fit."""

    milliseconds: dict[str, float]  # median step time
    ratios: dict[str, tuple[float, float, float]]  # (q1, median, q3) over cycles of step time / step time of none
    hook_milliseconds: dict[str, float]  # median time inside the configuration's hooks per step
    cycles: int
    seconds: float


@dataclass
class Row:
    model: str
    batch: int
    scheme: str
    n_steps: int
    parameters: int
    guards: Interleaving
    anomaly: Interleaving | None


def train_loader(model: str, seed: int) -> DataLoader:
    if model == "cnet_digits":
        data = DigitsDataModule(image_size=16, batch_size=BATCH_SIZES[model], seed=seed)
        data.setup("fit")
        return data.train_dataloader()
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(CIFAR_IMAGES, *INPUTS[model], generator=generator)
    labels = torch.randint(0, 10, (CIFAR_IMAGES,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZES[model], shuffle=True,
                      generator=generator, drop_last=True)


def make_task(model: str, n_steps: int, args: argparse.Namespace) -> ContinuousNetClassifier:
    torch.manual_seed(args.seed)
    return ContinuousNetClassifier(model, scheme=args.scheme, n_steps=n_steps, optimizer="sgd", lr=0.01,
                                   momentum=0.9, lr_schedule="constant")


def interleave(task: ContinuousNetClassifier, model: str, configurations: dict[str, pl.Callback | None],
               args: argparse.Namespace) -> Interleaving:
    clock = make_clock(args.clock)
    start = StepStart(clock)
    end = StepEnd(start)
    interleaved = Interleaved(configurations, clock, args.seed)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=(args.warmup + args.cycles) * len(configurations),
        max_epochs=-1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[start, interleaved, end],
    )
    began = time.perf_counter()
    trainer.fit(task, train_dataloaders=train_loader(model, args.seed))
    seconds = time.perf_counter() - began

    n = len(configurations)
    cycles = [
        {name: (step, hook) for name, step, hook in zip(interleaved.schedule[first:first + n],
                                                         end.seconds[first:first + n],
                                                         interleaved.hook_seconds[first:first + n])}
        for first in range(n * args.warmup, len(end.seconds) - n + 1, n)
    ]
    return Interleaving(
        milliseconds={name: 1000 * statistics.median(c[name][0] for c in cycles) for name in configurations},
        ratios={name: quartiles([c[name][0] / c["none"][0] for c in cycles]) for name in configurations
                if name != "none"},
        hook_milliseconds={name: 1000 * statistics.median(c[name][1] for c in cycles) for name in configurations},
        cycles=len(cycles), seconds=seconds,
    )


def measure(model: str, n_steps: int, args: argparse.Namespace) -> Row:
    task = make_task(model, n_steps, args)
    parameters = sum(p.numel() for p in task.parameters())
    guards = interleave(task, model, {"none": None, "stop": NonFiniteGuard(),
                                      "rollback": NonFiniteGuard("rollback", verbose=False)}, args)
    anomaly = None
    if not args.no_anomaly:
        anomaly = interleave(make_task(model, n_steps, args), model, {"none": None, "anomaly": AnomalyMode()}, args)
    return Row(model, BATCH_SIZES[model], args.scheme, n_steps, parameters, guards, anomaly)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


# ---------------------------------------------------------------------- report
def header(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else "CPU"
    clock = "main-thread CPU time" if args.clock == "cpu" else "wall time (CUDA synchronised)"
    return (
        f"# NonFiniteGuard overhead per training step on {device}; torch {torch.__version__}, pytorch_lightning "
        f"{pl.__version__}, {torch.get_num_threads()} threads (of {os.cpu_count()} CPUs: {cpu}), python "
        f"{platform.python_version()}\n"
        f"# {args.warmup} warm-up + {args.cycles} timed cycles per fit, each configuration once per cycle in a "
        f"shuffled order; clock: {clock}; ratio = median [q1, q3] over cycles of step time / step time of none; "
        "hooks = median time inside the guard's hooks per step (% of the median step of none)"
    )


def _ratio(values: tuple[float, float, float]) -> str:
    return f"{values[1]:.3f}x [{values[0]:.3f}, {values[2]:.3f}]"


def print_table(rows: list[Row]) -> None:
    print(f"{'model':<12}{'batch':>6} {'scheme':<9}{'N':>3}{'params':>10} |{'none ms':>9}"
          + "".join(f"{name + ' ms':>13}{name + '/none':>25}{'hooks ms':>10}{'hooks %':>9}" for name in GUARDS)
          + f" |{'anomaly/none':>25} |{'cycles':>7}")
    for r in rows:
        g = r.guards
        line = (f"{r.model:<12}{r.batch:>6} {r.scheme:<9}{r.n_steps:>3}{r.parameters:>10,} |"
                f"{g.milliseconds['none']:>9.2f}")
        for name in GUARDS:
            share = 100 * g.hook_milliseconds[name] / g.milliseconds["none"]
            line += (f"{g.milliseconds[name]:>13.2f}{_ratio(g.ratios[name]):>25}{g.hook_milliseconds[name]:>10.3f}"
                     f"{share:>8.1f}%")
        line += f" |{_ratio(r.anomaly.ratios['anomaly']) if r.anomaly else '-':>25} |{g.cycles:>7}"
        print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(BATCH_SIZES), default=list(BATCH_SIZES))
    parser.add_argument("--n-steps", type=int, nargs="+", default=[1, 4], help="steps (= basis pieces) per stage")
    parser.add_argument("--scheme", default="midpoint", help="Runge-Kutta scheme of the stages")
    parser.add_argument("--cycles", type=int, default=40, help="timed cycles (one step per configuration each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed cycles first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="main-thread CPU time (default on CPU) or wall time (default on GPU)")
    parser.add_argument("--no-anomaly", action="store_true", help="leave out the anomaly-mode comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="smoke run: n_steps 1, 1 warm-up and 3 timed cycles")
    args = parser.parse_args()
    if args.smoke:
        args.n_steps, args.cycles, args.warmup = [1], 3, 1
    if min(args.n_steps) < 1 or args.cycles < 1 or args.warmup < 0:
        parser.error("--n-steps and --cycles must be >= 1 and --warmup >= 0")
    if args.clock is None:
        args.clock = "cpu" if args.accelerator == "cpu" else "wall"
    if args.clock == "cpu" and (args.accelerator == "gpu" or args.threads != 1):
        parser.error("--clock cpu measures one thread's work: use it with --accelerator cpu --threads 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    print(header(args), flush=True)
    rows = []
    for model in args.models:
        for n_steps in args.n_steps:
            rows.append(measure(model, n_steps, args))
            guards = rows[-1].guards
            print(f"  {model} N={n_steps}: stop/none {guards.ratios['stop'][1]:.3f} ({guards.seconds:.0f} s)",
                  flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
