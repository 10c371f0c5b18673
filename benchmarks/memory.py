"""Peak training memory of one ODE stage at 1 and 32 steps: stored steps, recomputed steps, torchdiffeq's adjoint.

For each scheme and step count ``N = n_basis = n_steps = T`` one training step (forward, mean-square loss,
backward; the input requires a gradient, as inside a network) of ``ODEBlock(channels, scheme=...)`` runs in three
ways:

- **stored**: autograd keeps every activation of every step;
- **recompute**: ``recompute_steps=True``; each step's input is kept and its activations are recomputed in the
  backward pass, one step at a time (same gradients and statistics);
- **adjoint**: the same dynamics (``_field.py``) through ``torchdiffeq.odeint_adjoint`` with the same fixed steps,
  which keeps nothing and integrates the state back in time in the backward pass (its ``rk4`` is the 3/8 rule; its
  gradient is not the exact one of the discrete forward pass: the error is reported).

Memory is the peak of the bytes allocated for tensors during the step above what was allocated before it: on CPU
summed from ``torch.profiler``'s allocation events (``profile_memory=True``: every allocation and free of the CPU
allocator, in order), on CUDA ``torch.cuda.max_memory_allocated``. It is exact, unlike the resident set size,
which also holds the allocator's cache. The step times come from interleaved timing without the profiler.

What the ratios can be: storing every step makes memory grow with the ``N s`` evaluations of ``R`` (``s`` stages
per step). Recomputation keeps the ``N`` step inputs, one state each, plus one step's activations ``A`` (about
``4 s + 4`` states for the preact_basic unit), so 32 steps cost ``(32 + A) / (1 + A)`` times one step.

Usage::

    python benchmarks/memory.py                                # rk4 and euler, N in {1, 32}, batch 32
    python benchmarks/memory.py --schemes rk4 --steps 1 8 32 --batch-size 128 --csv outputs/memory.csv
    python benchmarks/memory.py --device cuda --precision bf16
    python benchmarks/memory.py --smoke
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import _bench
import torch
from _field import StageField
from torch.profiler import ProfilerActivity, profile

from lightning_cnet.ode_block import ODEBlock

try:
    from torchdiffeq import odeint_adjoint
except ImportError:  # pragma: no cover - depends on the environment
    odeint_adjoint = None

MIB = 2**20
TARGET_MEMORY, TARGET_TIME = 1.5, 1.4  # recompute: memory at 32 steps / at 1 step; time / stored steps' time


class AdjointStage(torch.nn.Module):
    """A stage integrated by ``torchdiffeq.odeint_adjoint`` with the stage's fixed steps."""

    def __init__(self, stage: ODEBlock) -> None:
        super().__init__()
        self.field = StageField(stage)
        self.method = "rk4" if stage.scheme in ("rk4", "rk4_38") else stage.scheme
        self.options = {"step_size": stage.T / stage.n_steps, "perturb": self.method == "rk4"}
        self.depth = stage.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, self.depth], device=x.device)
        return odeint_adjoint(self.field, x, t, method=self.method, options=self.options,
                              adjoint_params=tuple(self.field.parameters()))[-1]


def build(method: str, scheme: str, n: int, channels: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    stage = ODEBlock(channels, n_basis=n, n_steps=n, scheme=scheme, recompute_steps=method == "recompute")
    with torch.no_grad():
        for piece in stage.gate.gate:
            piece.fill_(1.0)  # a non-trivial R, so that no gradient is skipped as zero
    stage.to(device).train()
    return AdjointStage(stage) if method == "adjoint" else stage


def training_step(model: torch.nn.Module, x: torch.Tensor, precision: str) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        inputs = x.detach().requires_grad_(True)
        with _bench.autocast(x.device, precision):
            loss = model(inputs).float().square().mean()
        loss.backward()

    return step


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` above the bytes allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as result:
        step()
    events = sorted((event.start_ns(), event.nbytes()) for event in result.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def gradients(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


@dataclass
class Row:
    scheme: str
    n: int
    method: str
    peak_mib: float  # peak tensor memory of the step above the memory before it
    states: float  # the same in units of one state tensor [batch, channels, size, size]
    memory_ratio: float  # peak / peak of the same method at the smallest N
    ms: float  # median step time
    time_ratio: float  # median over repeats of step time / stored steps' step time at the same N
    gradient_error: float  # relative L2 distance of the parameters' gradients to the stored steps'


def measure_scheme(scheme: str, args: argparse.Namespace, device: torch.device) -> list[Row]:
    methods = ["stored", "recompute"] + (["adjoint"] if odeint_adjoint is not None and not args.no_adjoint else [])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, generator=generator).to(device)
    state_bytes = x.numel() * x.element_size()
    rows: list[Row] = []
    smallest: dict[str, float] = {}
    for n in sorted(args.steps):
        models = {method: build(method, scheme, n, args.channels, device) for method in methods}
        steps = {method: training_step(model, x, args.precision) for method, model in models.items()}
        peaks, grads = {}, {}
        for method, step in steps.items():
            step()  # warm-up: lazy initialisation is not counted
            peaks[method] = peak_bytes(step, device)
            grads[method] = gradients(models[method])
        samples = _bench.time_interleaved(steps, repeats=args.repeats, warmup=0, min_seconds=args.min_seconds,
                                          device=device)
        for method in methods:
            smallest.setdefault(method, peaks[method])
            error = (grads[method] - grads["stored"]).norm() / grads["stored"].norm()
            rows.append(Row(scheme, n, method, peaks[method] / MIB, peaks[method] / state_bytes,
                            peaks[method] / smallest[method], 1e3 * _bench.quartiles(samples[method])[1],
                            _bench.ratio_quartiles(samples[method], samples["stored"])[1], error.item()))
        print(f"  {scheme} N={n} done", flush=True)
    return rows


def print_table(rows: Sequence[Row], args: argparse.Namespace) -> None:
    print(f"{'scheme':<8}{'N':>4}{'method':>11} | {'peak MiB':>9}{'states':>8}{'vs N=' + str(min(args.steps)):>9} | "
          f"{'step ms':>9}{'vs stored':>10} | {'grad err':>9}")
    for r in rows:
        print(f"{r.scheme:<8}{r.n:>4}{r.method:>11} | {r.peak_mib:>9.1f}{r.states:>8.1f}{r.memory_ratio:>8.2f}x | "
              f"{r.ms:>9.0f}{r.time_ratio:>9.2f}x | {r.gradient_error:>9.1e}")
    largest = max(args.steps)
    for r in rows:
        if r.method == "recompute" and r.n == largest and len(args.steps) > 1:
            ok = r.memory_ratio <= TARGET_MEMORY and r.time_ratio <= TARGET_TIME
            print(f"# {r.scheme}, recompute at N={largest}: memory {r.memory_ratio:.2f}x N={min(args.steps)} (target "
                  f"<= {TARGET_MEMORY}x), time {r.time_ratio:.2f}x stored (target <= {TARGET_TIME}x): "
                  f"{'met' if ok else 'missed'}")
    print("# states: peak / bytes of one state tensor; grad err: ||g - g_stored|| / ||g_stored|| over the parameters")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", nargs="+", default=["rk4", "euler"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 32], help="values of N = n_basis = n_steps = T")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="height and width of the state")
    parser.add_argument("--no-adjoint", action="store_true", help="leave torchdiffeq's adjoint out")
    _bench.add_common_arguments(parser, repeats=3, min_seconds=0.0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.channels, args.size, args.repeats = [1, 2], 2, 4, 8, 1
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = _bench.configure(args)
    print(f"# one ODEBlock stage (preact_basic, piecewise constant K = N = T), state [{args.batch_size}, "
          f"{args.channels}, {args.size}, {args.size}], one training step; MiB = 2**20 bytes\n"
          f"{_bench.machine(device, args.precision)}\n# step times: {args.repeats} interleaved repeats"
          + ("" if odeint_adjoint is not None else "; torchdiffeq is not installed: no adjoint rows"), flush=True)
    rows = [row for scheme in args.schemes for row in measure_scheme(scheme, args, device)]
    print_table(rows, args)
    print(f"# load average at the end {_bench.load_average()}")
    _bench.write_csv(args.csv, [asdict(row) for row in rows])
    return rows


if __name__ == "__main__":
    main()
