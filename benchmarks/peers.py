"""lightning-cnet side by side with its peers: the same dynamics, integrated four ways.

The dynamics are those of a ContinuousNet stage, ``dx/dt = T s(t) R(x; theta(t))`` on ``t in [0, 1]`` with one
set of weights (preact_basic unit, piecewise-constant ``theta`` with ``K = N = T`` pieces), integrated with ``N``
fixed steps by

- **cnet**: lightning-cnet's ``ODEBlock`` (a Butcher tableau, piece lookups computed once per resolution);
- **resnet** (Euler only): the hand-written module-per-block ResNet that Euler computes (``_resnet.py``), the
  limit of what any integrator can cost;
- **torchdiffeq**: ``odeint(field, x, [0, T], method, options={"step_size": T / N})`` on the physical depth
  ``tau = T t`` (so the field is ``R`` itself and nothing scales it), reading the piece from the time it is called
  at. Its ``rk4`` is Kutta's 3/8 rule and needs ``perturb=True`` so that the last stage of a step reads that step's
  piece: it is compared with our ``rk4_38``; its ``euler`` and ``midpoint`` with ours;
- **torchdyn**: ``NeuralODE(field, solver, sensitivity="autograd")`` on ``t_span = linspace(0, T, N + 1)``, saving
  the final state only. Its ``rk4`` is the classic tableau, compared with our ``rk4`` (its stages sit at
  ``t, t, t + h/2, t + h/2`` instead of ``t, t + h/2, t + h/2, t + h``; with ``K = N`` every stage still reads its
  step's piece, so the outputs agree).

Each peer gets its best use: the cheapest piece lookup (an integer from the float time), the options that save work.
Rows: one stage (``[B, 16, 32, 32]``) and the whole ``cnet_cifar`` (stem, stitches and head shared, the three
stages integrated by the contender); euler, midpoint and rk4; batch 8 and 128; a training step (forward, loss,
backward, SGD step) and inference (``eval()``, ``no_grad``). Before timing, every contender's output is checked
against lightning-cnet's with the same tableau (eval and training mode, in float32). Timing is interleaved, the order
rotated every repeat; a row reports each peer's time relative to lightning-cnet's (median of per-repeat ratios; above 1:
lightning-cnet is faster). Targets: lightning-cnet never slower than either peer in any row, and at least 1.15x
faster than torchdiffeq in training at batch 128.

Needs the ``bench`` extra (``pip install torchdiffeq torchdyn``).

Usage::

    python benchmarks/peers.py --csv outputs/peers.csv               # the whole grid, N = 4, 1 thread
    python benchmarks/peers.py --scopes stage --schemes rk4 --batch-sizes 128 --modes train
    python benchmarks/peers.py --device cuda --precision bf16
    python benchmarks/peers.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import _bench
import torch
import torch.nn.functional as F
from _field import StageField
from _resnet import blocks_from, randomise_, resnet_from
from torch import nn

from lightning_cnet.models import ContinuousNet, get_model
from lightning_cnet.ode_block import ODEBlock

try:
    from torchdiffeq import odeint
    from torchdyn.core import NeuralODE
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise SystemExit(f"benchmarks/peers.py needs torchdiffeq and torchdyn ({missing}): pip install torchdiffeq "
                     "torchdyn (the project's 'bench' extra)") from None

STAGE_WIDTH, STAGE_SIZE = 16, 32
IMAGE_SHAPE, NUM_CLASSES = (3, 32, 32), 10

#: scheme -> lightning-cnet tableaux timed, and which one each peer is compared with
OURS = {"euler": ("euler",), "midpoint": ("midpoint",), "rk4": ("rk4_38", "rk4")}
REFERENCE = {("euler", "resnet"): "euler", ("euler", "torchdiffeq"): "euler", ("euler", "torchdyn"): "euler",
             ("midpoint", "torchdiffeq"): "midpoint", ("midpoint", "torchdyn"): "midpoint",
             ("rk4", "torchdiffeq"): "rk4_38", ("rk4", "torchdyn"): "rk4"}
TRAIN_TARGET = 1.15  # torchdiffeq time / lightning-cnet time, training at batch 128


# ---------------------------------------------------------------------- the peers' view of a stage
class TorchdiffeqStage(nn.Module):
    """A stage integrated by ``torchdiffeq.odeint`` with ``N`` fixed steps of its ``method``."""

    def __init__(self, stage: ODEBlock, method: str) -> None:
        super().__init__()
        self.field = StageField(stage)
        self.method = method
        self.options = {"step_size": stage.T / stage.n_steps, "perturb": method == "rk4"}
        self.depth = stage.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, self.depth], device=x.device)
        return odeint(self.field, x, t, method=self.method, options=self.options)[-1]


class TorchdynStage(nn.Module):
    """A stage integrated by ``torchdyn``'s ``NeuralODE`` on ``N`` equal steps of its ``solver``."""

    def __init__(self, stage: ODEBlock, solver: str) -> None:
        super().__init__()
        self.node = NeuralODE(StageField(stage), solver=solver, sensitivity="autograd", return_t_eval=False)
        self.register_buffer("t_span", torch.linspace(0.0, stage.T, stage.n_steps + 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.node(x, self.t_span, save_at=self.t_span[-1:])[-1]


class PeerNet(nn.Module):
    """A ContinuousNet whose stages are integrated by a peer; stem, stitches and head are the ContinuousNet's."""

    def __init__(self, net: ContinuousNet, integrator: Callable[[ODEBlock], nn.Module]) -> None:
        super().__init__()
        self.net = net
        self.integrators = nn.ModuleList(integrator(stage) for stage in net.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.stem(x)
        for index, integrate in enumerate(self.integrators):
            if index:
                x = net.stitches[index - 1](x)
            x = integrate(x)
        return net.forward_head(torch.relu(net.norm(x)))


def with_scheme(module: nn.Module, scheme: str) -> nn.Module:
    copied = copy.deepcopy(module)
    copied.set_manifestation(scheme=scheme)
    return copied


def contenders(scope: str, scheme: str, n: int, seed: int, device: torch.device) -> dict[str, nn.Module]:
    """Every contender of a row, each with its own copy of the same weights."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if scope == "stage":
        base: nn.Module = ODEBlock(STAGE_WIDTH, n_basis=n, n_steps=n, T=float(n))
    else:
        base = get_model("cnet_cifar", n_steps=n, n_basis=n, T=float(n), num_classes=NUM_CLASSES,
                         in_chans=IMAGE_SHAPE[0])
    randomise_(base, generator)
    base.to(device)
    models = {f"cnet[{tableau}]": with_scheme(base, tableau) for tableau in OURS[scheme]}
    if scheme == "euler":
        models["resnet"] = blocks_from(base) if scope == "stage" else resnet_from(base)
    peers = {"torchdiffeq": lambda stage: TorchdiffeqStage(stage, scheme),
             "torchdyn": lambda stage: TorchdynStage(stage, scheme)}
    for name, integrator in peers.items():
        copied = copy.deepcopy(base)
        models[name] = (integrator(copied) if scope == "stage" else PeerNet(copied, integrator)).to(device)
    return models


# ---------------------------------------------------------------------- steps
def inputs_of(scope: str, batch: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed + 1)
    if scope == "stage":
        return torch.randn(batch, STAGE_WIDTH, STAGE_SIZE, STAGE_SIZE, generator=generator).to(device), None
    images = torch.randn(batch, *IMAGE_SHAPE, generator=generator)
    return images.to(device), torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)


def loss_of(output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return output.float().square().mean() if labels is None else F.cross_entropy(output.float(), labels)


def step_fn(model: nn.Module, mode: str, x: torch.Tensor, labels: torch.Tensor | None,
            precision: str) -> Callable[[], None]:
    if mode == "infer":
        model.eval()

        def forward() -> None:
            with torch.no_grad(), _bench.autocast(x.device, precision):
                model(x)

        return forward
    return _bench.sgd_step(model, x, lambda output: loss_of(output, labels), precision)


def reference_of(scheme: str, name: str) -> str:
    return f"cnet[{REFERENCE[scheme, name]}]" if (scheme, name) in REFERENCE else name


def check_consistency(build: Callable[[], dict[str, nn.Module]], scheme: str, x: torch.Tensor,
                      tolerance: float) -> dict[str, float]:
    """Relative max difference of each contender's output to lightning-cnet's with the same tableau, in eval and in
    training mode (on fresh contenders: torchdyn's keeps a non-leaf tensor, so it cannot be deep-copied); raise
    ``AssertionError`` above ``tolerance``."""
    outputs: dict[tuple[str, bool], torch.Tensor] = {}
    for training in (False, True):
        with torch.no_grad():
            for name, model in build().items():
                outputs[name, training] = model.train(training)(x).float()
    differences = {}
    for name, _ in outputs:
        reference = reference_of(scheme, name)
        worst = 0.0
        for training in (False, True):
            ours, theirs = outputs[reference, training], outputs[name, training]
            worst = max(worst, ((theirs - ours).abs().max() / ours.abs().max().clamp_min(1e-12)).item())
        if worst > tolerance:
            raise AssertionError(f"{name} differs from {reference}: relative max |diff| {worst:.3g} > {tolerance}")
        differences[name] = worst
    return differences


@dataclass
class Row:
    scope: str
    scheme: str
    batch: int
    mode: str
    contender: str
    reference: str  # the lightning-cnet tableau it is compared with (itself for ours)
    ms: float  # median milliseconds per call
    ratio: float  # median over repeats of time contender / time reference (> 1: lightning-cnet is faster)
    ratio_q1: float
    ratio_q3: float
    max_rel_diff: float  # consistency check: relative max difference of the output to the reference's
    repeats: int


def measure(scope: str, scheme: str, batch: int, mode: str, args: argparse.Namespace,
            device: torch.device) -> list[Row]:
    def build() -> dict[str, nn.Module]:
        return contenders(scope, scheme, args.steps, args.seed, device)

    x, labels = inputs_of(scope, batch, args.seed, device)
    differences = check_consistency(build, scheme, x[: min(batch, 4)], args.tolerance)
    models = build()
    fns = {name: step_fn(model, mode, x, labels, args.precision) for name, model in models.items()}
    samples = _bench.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, min_seconds=args.min_seconds,
                                      device=device)
    rows = []
    for name in models:
        reference = reference_of(scheme, name)
        q1, ratio, q3 = _bench.ratio_quartiles(samples[name], samples[reference])
        rows.append(Row(scope, scheme, batch, mode, name, reference, 1e3 * _bench.quartiles(samples[name])[1],
                        ratio, q1, q3, differences[name], len(samples[name])))
    return rows


# ---------------------------------------------------------------------- report
def verdict(rows: Sequence[Row]) -> str:
    """'+' when lightning-cnet is faster than every peer of the row (and by 1.15x than torchdiffeq in training at
    batch 128), '!' otherwise."""
    peers = [row for row in rows if row.contender in ("torchdiffeq", "torchdyn")]
    ok = all(row.ratio >= 1.0 for row in peers)
    if rows[0].mode == "train" and rows[0].batch == 128:
        ok = ok and all(row.ratio >= TRAIN_TARGET for row in peers if row.contender == "torchdiffeq")
    return "+" if ok else "!"


def _ratio_cell(by_name: dict[str, Row], name: str, width: int, spread: bool) -> str:
    """The contender ``name``'s time relative to lightning-cnet's, right-aligned in ``width`` columns ('-' when it
    did not run)."""
    if name not in by_name:
        return f"{'-':>{width}}"
    row = by_name[name]
    text = f"{row.ratio:.2f}x" + (f" [{row.ratio_q1:.2f}, {row.ratio_q3:.2f}]" if spread else "")
    return f"{text:>{width}}"


def print_table(rows: Sequence[Row]) -> None:
    print(f"{'scope':<6}{'scheme':>9}{'batch':>6}{'mode':>6} | {'cnet ms':>15} | {'resnet':>7}{'torchdiffeq':>21}"
          f"{'torchdyn':>21} | ok | {'max rel diff':>12}")
    groups: dict[tuple[str, str, int, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.scope, row.scheme, row.batch, row.mode), []).append(row)
    for (scope, scheme, batch, mode), group in groups.items():
        by_name = {row.contender: row for row in group}
        ours = " / ".join(f"{by_name[f'cnet[{t}]'].ms:.1f}" for t in OURS[scheme])
        worst = max(row.max_rel_diff for row in group)
        print(f"{scope:<6}{scheme:>9}{batch:>6}{mode:>6} | {ours:>15} | {_ratio_cell(by_name, 'resnet', 7, False)}"
              f"{_ratio_cell(by_name, 'torchdiffeq', 21, True)}{_ratio_cell(by_name, 'torchdyn', 21, True)} | "
              f"{verdict(group):>2} | {worst:>12.1e}")
    print("# cnet ms: lightning-cnet per call (rk4 rows: rk4_38 / classic rk4); resnet, torchdiffeq, torchdyn: their "
          "time / lightning-cnet's with the same tableau, median [q1, q3] of per-repeat ratios (> 1: lightning-cnet "
          f"is faster); ok '+': faster than both peers (and >= {TRAIN_TARGET}x torchdiffeq in training at batch 128)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scopes", nargs="+", choices=["stage", "model"], default=["stage", "model"])
    parser.add_argument("--schemes", nargs="+", choices=sorted(OURS), default=["euler", "midpoint", "rk4"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 8])
    parser.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--steps", type=int, default=4, help="N = K = T of every stage")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative output difference accepted by the consistency check (in float32)")
    parser.add_argument("--seed", type=int, default=0)
    _bench.add_common_arguments(parser, repeats=5, min_seconds=3.0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.steps, args.repeats, args.min_seconds, args.warmup = [2], 1, 1, 0.0, 1
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = _bench.configure(args)
    print(f"# one stage [B, {STAGE_WIDTH}, {STAGE_SIZE}, {STAGE_SIZE}] and cnet_cifar, preact_basic, piecewise "
          f"constant K = N = T = {args.steps}\n{_bench.machine(device, args.precision)}\n"
          f"# >= {args.repeats} repeats and >= {args.min_seconds:g} s per row after {args.warmup} warm-up calls, "
          "interleaved, order rotated every repeat", flush=True)
    rows: list[Row] = []
    for scope in args.scopes:
        for scheme in args.schemes:
            for batch in args.batch_sizes:
                for mode in args.modes:
                    start = time.perf_counter()
                    rows.extend(measure(scope, scheme, batch, mode, args, device))
                    print(f"  {scope} {scheme} batch={batch} {mode} ({time.perf_counter() - start:.0f} s)",
                          flush=True)
    print_table(rows)
    print(f"# load average at the end {_bench.load_average()}")
    _bench.write_csv(args.csv, [asdict(row) for row in rows])
    return rows


if __name__ == "__main__":
    main()
