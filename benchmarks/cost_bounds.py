"""The measurements behind ``lightning_cnet.cost``: its memory estimate against the measured peak of a training
step, and what a step plan, a weight piece, an evaluation and an unrolled export cost.

1. **Training memory.** For each row, ``estimate_cost(model, batch_shape=..., training=True)`` (activations from four
   small forward passes) is compared with the exact peak of one training step (forward, cross-entropy, backward;
   gradients start as ``None``) above the memory before it: on CPU summed from ``torch.profiler``'s allocation
   events, on CUDA ``torch.cuda.max_memory_allocated``. The step allocates the activations and the gradients (one
   copy of the weights), so the row compares that with the estimate's activations plus one copy of the weights; the
   estimate's full figure adds the weights, two optimizer moments and the step plans.
2. **Step plans.** Bytes kept per Runge-Kutta stage of a step (``tracemalloc``) and the time to build them.
3. **Weight pieces.** Time to build a stage per piece (the reason for ``MAX_PIECES_PER_STAGE``).
4. **Evaluations.** Inference time per residual-unit evaluation for a batch (the reason for the warning).
5. **Export** (``--export``): ``torch.export`` time per unrolled evaluation (the reason for ``MAX_EXPORT_EVALUATIONS``).

Usage::

    python benchmarks/cost_bounds.py
    python benchmarks/cost_bounds.py --export --csv outputs/cost_bounds.csv
    python benchmarks/cost_bounds.py --device cuda
    python benchmarks/cost_bounds.py --smoke
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import _bench
import torch
import torch.nn.functional as F
from memory import peak_bytes

from lightning_cnet import get_model
from lightning_cnet.bases import get_basis
from lightning_cnet.cost import estimate_cost
from lightning_cnet.integrators import get_scheme
from lightning_cnet.ode_block import rk_stage_plan

MIB = 2**20


@dataclass
class MemoryRow:
    model: str
    image: int
    batch: int
    scheme: str
    n: int
    measured_mib: float  # peak of a training step above the memory before it
    estimated_mib: float  # the estimate's activations + one copy of the weights (the gradients)
    ratio: float  # estimated / measured
    full_estimate_mib: float  # what check_cost compares with the available memory


MEMORY_CASES = [  # (model, image size, batch, scheme, N)
    ("cnet_digits", 8, 64, "euler", 8),
    ("cnet_digits", 16, 64, "rk4", 4),
    ("cnet_digits", 28, 128, "midpoint", 8),
    ("cnet_cifar", 32, 32, "rk4", 2),
    ("cnet_cifar", 32, 32, "euler", 8),
]


def measure_memory(case: tuple[str, int, int, str, int], device: torch.device) -> MemoryRow:
    name, size, batch, scheme, n = case
    torch.manual_seed(0)
    in_chans = 1 if name == "cnet_digits" else 3
    model = get_model(name, scheme=scheme, n_steps=n, in_chans=in_chans).to(device).train()
    x = torch.randn(batch, in_chans, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()  # warm-up: lazy initialisation is not counted
    model.zero_grad(set_to_none=True)
    measured = peak_bytes(step, device)
    cost = estimate_cost(model, batch_shape=tuple(x.shape), training=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    estimated = cost.activation_bytes + weights
    return MemoryRow(name, size, batch, scheme, n, measured / MIB, estimated / MIB, estimated / measured,
                     cost.memory_bytes / MIB)


@dataclass
class PlanRow:
    basis: str
    scheme: str
    n_basis: int
    n_steps: int
    bytes_per_evaluation: float
    us_per_evaluation: float


def measure_plan(basis: str, scheme: str, n_basis: int, n_steps: int) -> PlanRow:
    tableau = get_scheme(scheme)
    evaluations = n_steps * tableau.n_stages
    start = time.perf_counter()
    rk_stage_plan(get_basis(basis), n_basis, tableau, n_steps)
    seconds = time.perf_counter() - start  # untraced build time
    tracemalloc.start()
    plan = rk_stage_plan(get_basis(basis), n_basis, tableau, n_steps)
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del plan
    return PlanRow(basis, scheme, n_basis, n_steps, kept / evaluations, 1e6 * seconds / evaluations)


def build_ms_per_piece(name: str, pieces: int) -> float:
    start = time.perf_counter()
    model = get_model(name, n_basis=pieces, n_steps=1)
    seconds = time.perf_counter() - start
    return 1e3 * seconds / (pieces * len(model.stages))


def inference_ms_per_evaluation(name: str, size: int, batch: int, n: int, device: torch.device) -> float:
    in_chans = 1 if name == "cnet_digits" else 3
    model = get_model(name, n_steps=1, in_chans=in_chans).to(device).eval()
    x = torch.randn(batch, in_chans, size, size, device=device)
    with torch.no_grad(), model.manifestation(n_steps=n):
        model(x)
        samples = _bench.time_interleaved({"forward": lambda: model(x)}, repeats=3, warmup=0, device=device)
        evaluations = model.function_evaluations
    return 1e3 * _bench.quartiles(samples["forward"])[1] / evaluations


def export_ms_per_evaluation(n: int) -> float:
    model = get_model("cnet_digits", n_steps=1).eval()
    model.set_manifestation(n_steps=n)
    start = time.perf_counter()
    torch.export.export(model, (torch.randn(2, 1, 8, 8),))
    return 1e3 * (time.perf_counter() - start) / model.function_evaluations


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", action="store_true", help="also time torch.export (slow: tens of seconds)")
    _bench.add_common_arguments(parser, repeats=3, min_seconds=0.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[MemoryRow]:
    args = parse_args(argv)
    device = _bench.configure(args)
    print(f"# lightning_cnet.cost against measurement; MiB = 2**20 bytes\n{_bench.machine(device, 'fp32')}", flush=True)
    cases = [("cnet_digits", 8, 4, "rk4", 2)] if args.smoke else MEMORY_CASES
    rows = [measure_memory(case, device) for case in cases]
    print("\n## 1. training step: estimated activations + gradients against the measured peak")
    print(f"{'model':<12}{'image':>6}{'batch':>6}{'scheme':>9}{'N':>4} | {'measured':>9}{'estimated':>10}{'ratio':>7}"
          f" | {'full estimate':>13}")
    for r in rows:
        print(f"{r.model:<12}{r.image:>6}{r.batch:>6}{r.scheme:>9}{r.n:>4} | {r.measured_mib:>9.1f}"
              f"{r.estimated_mib:>10.1f}{r.ratio:>7.2f} | {r.full_estimate_mib:>13.1f}")

    steps = 256 if args.smoke else 16_384
    plans = [measure_plan(basis, scheme, k, steps) for basis in ("piecewise_constant", "piecewise_linear")
             for scheme in ("euler", "rk4") for k in (4, steps)]
    print(f"\n## 2. step plans ({steps} steps)")
    for p in plans:
        print(f"{p.basis:<20}{p.scheme:>7} K={p.n_basis:<6} | {p.bytes_per_evaluation:>6.0f} B and "
              f"{p.us_per_evaluation:>5.1f} us per Runge-Kutta stage of a step")

    pieces = 16 if args.smoke else 512
    print(f"\n## 3. building weight pieces: {build_ms_per_piece('cnet_digits', pieces):.2f} ms per piece and stage "
          f"(cnet_digits, {pieces} pieces), {build_ms_per_piece('cnet_cifar', pieces):.2f} ms (cnet_cifar)")

    evaluation_cases = [("cnet_digits", 8, 2, 2)] if args.smoke else [
        ("cnet_digits", 8, 64, 16), ("cnet_digits", 28, 128, 4), ("cnet_cifar", 32, 128, 4)]
    print("\n## 4. inference, per residual-unit evaluation of a batch")
    for name, size, batch, n in evaluation_cases:
        print(f"{name:<12} {size}x{size} batch {batch:<4}: "
              f"{inference_ms_per_evaluation(name, size, batch, n, device):.2f} ms")

    if args.export:
        print("\n## 5. torch.export of cnet_digits, per unrolled evaluation")
        for n in ([2] if args.smoke else [16, 64, 256]):
            print(f"n_steps {n:<4} ({3 * n} evaluations): {export_ms_per_evaluation(n):.1f} ms")
    print(f"# load average at the end {_bench.load_average()}")
    _bench.write_csv(args.csv, [asdict(row) for row in rows])
    return rows


if __name__ == "__main__":
    main()
