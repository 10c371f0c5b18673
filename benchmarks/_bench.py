"""What every timing script of ``benchmarks/`` shares: device and precision options, interleaved timing, ratios
with quartiles, a description of the machine and CSV output.

Timing protocol (``time_interleaved``): the functions compared are called in turn, the order rotated every repeat,
each sample running a few calls back to back; a CUDA device is synchronised around every sample. Results are
medians of samples and medians of the per-repeat ratios, which a load that comes and goes on a shared machine
moves much less than the throughputs themselves.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""``--precision`` choices: ``fp32``, or ``bf16`` autocast (weights and the optimizer stay in float32)."""

MAX_REPEATS = 200


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int, min_seconds: float) -> None:
    """``--device``, ``--precision``, ``--threads``, ``--repeats``, ``--min-seconds``, ``--warmup``, ``--csv`` and
    ``--smoke``."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="fp32, or bf16 autocast of the forward pass and the loss")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1 gives the steadiest ratios on a shared machine)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed samples per function and row")
    parser.add_argument("--min-seconds", type=float, default=min_seconds,
                        help="keep taking samples of a row until its timed part lasts this long")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per function before timing")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one or two samples: checks that the script runs, measures nothing")


def resolve_device(name: str) -> torch.device:
    """The ``--device`` as a ``torch.device``.

    Raises:
        SystemExit: a device this machine does not have, with the reason.
    """
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device {name!r} is not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA device (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: expected cpu or cuda")
    return device


def configure(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and return the ``--device``."""
    torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of ``--precision`` (``fp32``: none)."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def sgd_step(
    model: torch.nn.Module, inputs: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor], precision: str, *,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[], torch.Tensor]:
    """One SGD training step of ``model`` on a fixed batch, returning its loss; a tiny learning rate keeps the
    weights sane over many timed steps. ``forward`` replaces ``model`` in the forward pass (a compiled call)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    forward = model if forward is None else forward

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(inputs.device, precision):
            value = loss(forward(inputs))
        value.backward()
        optimizer.step()
        return value

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int,
    inner: int = 1,
    min_seconds: float = 0.0,
    device: torch.device = torch.device("cpu"),
) -> dict[str, list[float]]:
    """Seconds per call of each function.

    Samples of ``inner`` calls, the order of the functions rotated every repeat, after ``warmup`` untimed calls of
    each; at least ``repeats`` samples, and more until the timed part has lasted ``min_seconds`` (at most
    ``MAX_REPEATS``).

    Example:
        >>> samples = time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=1)
        >>> sorted(samples), len(samples["a"])
        (['a', 'b'], 3)
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    repeat = 0
    while repeat < repeats or (time.perf_counter() - start < min_seconds and repeat < MAX_REPEATS):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize(device)
            sample_start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - sample_start) / inner)
        repeat += 1
    return samples


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)``; for one value, that value three times."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def ratio_quartiles(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float, float]:
    """Quartiles of the per-repeat ratios ``numerators[i] / denominators[i]``."""
    return quartiles([a / b for a, b in zip(numerators, denominators)])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device: torch.device, precision: str) -> str:
    """One line: torch, device, threads, CPU, load average (1/5/15 min) and python."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"# torch {torch.__version__} on {where} ({precision}), {torch.get_num_threads()} threads of "
        f"{os.cpu_count()} CPUs ({cpu_name()}), load average {load_average()}, python {platform.python_version()}"
    )


def write_csv(path: Path | None, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path``, floats with 6 significant digits."""
    if path is None or not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})


@contextmanager
def timed(label: str) -> Iterator[None]:
    """Print ``label`` and the seconds the block took."""
    start = time.perf_counter()
    yield
    print(f"  {label} ({time.perf_counter() - start:.0f} s)", flush=True)
