"""What ``ContinuousNetClassifier(compile=...)`` buys: compile time, training-step speed-up, recompiles per
refinement.

``cnet_cifar`` (``--scheme``, ``--steps`` per stage) is trained eagerly and through
:class:`~lightning_cnet.task.CompiledBackbone` (the classifier's ``compile`` option) from the same weights.
The script reports:

- how TorchDynamo sees the backbone (graphs and graph breaks, from ``torch._dynamo.explain``);
- compile time: the first compiled training step (forward, cross-entropy, backward, SGD step), in a fresh inductor
  cache directory unless ``--warm-cache``;
- the steady-state speed-up of the training step over eager (interleaved timing, median of per-repeat ratios;
  target >= 1.4x at batch 128 on CPU);
- after ``model.refine()``: the graphs compiled for the refined model (target: at most one per stage; the whole
  backbone is one graph, so one), the recompile time and the speed-up again;
- the largest difference between the compiled and the eager loss over the timed steps.

Usage::

    python benchmarks/compile_speed.py                           # euler, N = 2 -> 4, batch 128, 1 thread
    python benchmarks/compile_speed.py --scheme rk4 --steps 2 --options '{"mode": "max-autotune-no-cudagraphs"}'
    python benchmarks/compile_speed.py --channels-last           # both models in channels_last
    python benchmarks/compile_speed.py --device cuda --precision bf16
    python benchmarks/compile_speed.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import _bench
import torch
import torch.nn.functional as F
from _resnet import randomise_
from torch import nn

from lightning_cnet.models import get_model
from lightning_cnet.task import CompiledBackbone, compile_options

IMAGE_SHAPE, NUM_CLASSES = (3, 32, 32), 10
TARGET_SPEEDUP = 1.4


def training_step(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  labels: torch.Tensor, precision: str, losses: list[float]) -> Callable[[], None]:
    sgd = _bench.sgd_step(model, images, lambda logits: F.cross_entropy(logits, labels), precision, forward=forward)

    def step() -> None:
        losses.append(sgd().item())

    return step


@dataclass
class Row:
    phase: str  # "initial" or "refined"
    n_steps: int
    graphs: int  # graphs compiled for this phase (training mode)
    compile_s: float  # first compiled step minus the median compiled step
    eager_ms: float
    compiled_ms: float
    speedup: float  # median over repeats of eager time / compiled time
    speedup_q1: float
    speedup_q3: float
    max_loss_diff: float  # largest |compiled loss - eager loss| over the steps timed


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def measure_phase(phase: str, eager: nn.Module, compiled_model: nn.Module, compiled: CompiledBackbone,
                  images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> Row:
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    fns = {
        "eager": training_step(eager, eager, images, labels, args.precision, losses["eager"]),
        "compiled": training_step(compiled_model, lambda x: compiled(compiled_model, x), images, labels,
                                  args.precision, losses["compiled"]),
    }
    graphs_before = unique_graphs()
    _bench.synchronize(device)
    start = time.perf_counter()
    fns["compiled"]()
    _bench.synchronize(device)
    first = time.perf_counter() - start
    fns["eager"]()
    samples = _bench.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, min_seconds=args.min_seconds,
                                      device=device)
    q1, speedup, q3 = _bench.ratio_quartiles(samples["eager"], samples["compiled"])
    compiled_s = _bench.quartiles(samples["compiled"])[1]
    difference = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))
    return Row(phase, eager.stages[0].n_steps, unique_graphs() - graphs_before, first - compiled_s,
               1e3 * _bench.quartiles(samples["eager"])[1], 1e3 * compiled_s, speedup, q1, q3, difference)


def explain(model: nn.Module, images: torch.Tensor) -> str:
    """Graphs and graph breaks TorchDynamo finds in the backbone's training forward."""
    torch._dynamo.reset()
    result = torch._dynamo.explain(copy.deepcopy(model).train())(images)
    torch._dynamo.reset()
    reasons = "; ".join(str(reason.reason) for reason in result.break_reasons[:3])
    return f"{result.graph_count} graph(s), {result.graph_break_count} graph break(s)" + (
        f" ({reasons})" if reasons else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="euler")
    parser.add_argument("--steps", type=int, default=2, help="N = K = T per stage before the refinement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--options", type=json.loads, default={},
                        help='torch.compile keyword arguments as JSON, e.g. \'{"dynamic": false}\'')
    parser.add_argument("--channels-last", action="store_true", help="models and images in channels_last")
    parser.add_argument("--no-refine", action="store_true", help="leave the refinement out")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's on-disk cache (default: a fresh one, so compile times are cold)")
    _bench.add_common_arguments(parser, repeats=7, min_seconds=5.0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.repeats, args.min_seconds, args.warmup = 1, 2, 1, 0.0, 0
        args.options = {"backend": "eager", **args.options}
    compile_options(args.options)  # a bad key fails here, with the keys torch.compile takes
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = _bench.configure(args)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    eager = get_model("cnet_cifar", scheme=args.scheme, n_steps=args.steps, n_basis=args.steps, T=float(args.steps),
                      num_classes=NUM_CLASSES, in_chans=IMAGE_SHAPE[0])
    randomise_(eager, generator)
    images = torch.randn(args.batch_size, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator).to(device)
    form = torch.channels_last if args.channels_last else torch.contiguous_format
    eager.to(device=device, memory_format=form).train()
    images = images.to(device=device, memory_format=form)
    compiled_model = copy.deepcopy(eager)
    print(f"# cnet_cifar, {args.scheme}, K = N = T = {args.steps} per stage, batch {args.batch_size}, training step "
          f"(forward, cross-entropy, backward, SGD); torch.compile options {args.options or '{}'}; "
          f"{'channels_last' if args.channels_last else 'contiguous'}; "
          f"{'warm' if args.warm_cache else 'fresh'} inductor cache\n{_bench.machine(device, args.precision)}\n"
          f"# >= {args.repeats} repeats and >= {args.min_seconds:g} s per phase, eager and compiled interleaved, "
          "order rotated every repeat", flush=True)
    print(f"# TorchDynamo: {explain(eager, images)}", flush=True)
    torch._dynamo.utils.counters.clear()
    compiled = CompiledBackbone(args.options)
    rows = [measure_phase("initial", eager, compiled_model, compiled, images, labels, args, device)]
    if not args.no_refine:
        eager.refine()
        compiled_model.refine()
        rows.append(measure_phase("refined", eager, compiled_model, compiled, images, labels, args, device))
    print(f"{'phase':<8}{'N':>4}{'graphs':>8}{'compile s':>11} | {'eager ms':>9}{'compiled ms':>12}{'speed-up':>10}"
          f"{'[q1, q3]':>16} | {'max |loss diff|':>15}")
    for r in rows:
        print(f"{r.phase:<8}{r.n_steps:>4}{r.graphs:>8}{r.compile_s:>11.1f} | {r.eager_ms:>9.0f}{r.compiled_ms:>12.0f}"
              f"{r.speedup:>9.2f}x{f'[{r.speedup_q1:.2f}, {r.speedup_q3:.2f}]':>16} | {r.max_loss_diff:>15.1e}")
    print(f"# graphs: compiled in that phase (training mode; one per stage at most is the target, the backbone is one "
          f"graph); compile s: first compiled step minus a steady one; speed-up target >= {TARGET_SPEEDUP}x")
    print(f"# load average at the end {_bench.load_average()}")
    _bench.write_csv(args.csv, [asdict(row) for row in rows])
    return rows


if __name__ == "__main__":
    main()
