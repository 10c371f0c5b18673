"""Training memory of one RK4 ContinuousNet stage, with and without ``recompute_steps=True``.

For each ``N = n_basis = n_steps`` a fresh subprocess builds ``ODEBlock(channels, scheme="rk4")``, runs one
training step (forward, mean-square loss, backward; after a one-image warm-up step) on a ``[batch, channels, size, size]`` input and reports:

- **saved**: bytes autograd keeps for the backward pass after the forward, counted by a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook, deduplicated by storage (a tensor saved by
  several nodes, or views of one buffer, count once). With checkpointing this is what the graph holds
  between forward and backward: each step's input.
- **peak RSS**: ``ru_maxrss`` of the subprocess after the step, and its growth over the value measured just
  before the step (the subprocess has imported torch and built the stage and input by then).

Without checkpointing the saved bytes grow with the ``4 N`` evaluations of ``R``; with it they grow with
the ``N`` step inputs only, and the backward pass recomputes one step at a time.

Usage::

    python benchmarks/memory.py                        # N in {2, 8, 16}, batch 32, 16 channels, 32x32
    python benchmarks/memory.py --steps 4 32 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from lightning_cnet.ode_block import ODEBlock

MIB = 2**20


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves while active (a pack hook keyed by storage).

    Saved storages stay alive until the backward pass, so their addresses identify them for the whole forward.
    """

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_row(n: int, recompute_steps: bool, args: argparse.Namespace) -> dict[str, float]:
    """One training step of a fresh RK4 stage in this process: saved bytes, peak RSS and time."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = ODEBlock(args.channels, n_basis=n, n_steps=n, scheme="rk4", recompute_steps=recompute_steps)
    with torch.no_grad():
        for piece in block.gate.gate:
            piece.fill_(1.0)  # a non-trivial R, so that no gradient is skipped as zero
    # a one-image step first, so that lazy initialisation (kernels, autograd threads) is not counted
    block(torch.randn(1, args.channels, args.size, args.size, requires_grad=True)).square().mean().backward()
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, requires_grad=True)
    saved = SavedBytes()
    rss_before = max_rss_bytes()
    start = time.perf_counter()
    with saved.hooks():
        out = block(x)
    out.square().mean().backward()
    seconds = time.perf_counter() - start
    rss_peak = max_rss_bytes()
    return {
        "saved": saved.total,
        "rss_peak": rss_peak,
        "rss_growth": rss_peak - rss_before,
        "seconds": seconds,
    }


def run_in_subprocess(n: int, recompute_steps: bool, args: argparse.Namespace) -> dict[str, float]:
    """Measure one row in a fresh interpreter, so that ``ru_maxrss`` belongs to that row alone."""
    command = [
        sys.executable, __file__, "--row", str(n), str(int(recompute_steps)),
        "--batch-size", str(args.batch_size), "--channels", str(args.channels), "--size", str(args.size),
        "--threads", str(args.threads),
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8, 16], help="values of N = n_basis = n_steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="height and width of the input")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--row", nargs=2, type=int, metavar=("N", "CHECKPOINT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.row is not None:
        n, recompute_steps = args.row
        print(json.dumps(measure_row(n, bool(recompute_steps), args)))
        return
    print(
        f"# one ODEBlock stage, rk4, piecewise_constant K=N, input [{args.batch_size}, {args.channels}, "
        f"{args.size}, {args.size}] float32, one training step per fresh subprocess\n"
        f"# torch {torch.__version__}, {args.threads} threads; MiB = 2**20 bytes; "
        "ratio = checkpointed / plain"
    )
    groups = {"saved": "saved MiB", "rss_peak": "peak RSS MiB", "rss_growth": "RSS growth MiB", "seconds": "step s"}
    print(f"{'N':>3}{'evals':>6}" + "".join(f" | {title:>24}" for title in groups.values()))
    print(f"{'':>9}" + f" | {'plain':>8}{'ckpt':>8}{'ratio':>8}" * len(groups))
    for n in args.steps:
        plain, ckpt = run_in_subprocess(n, False, args), run_in_subprocess(n, True, args)
        cells = []
        for key in groups:
            scale = 1.0 if key == "seconds" else 1.0 / MIB
            a, b = plain[key] * scale, ckpt[key] * scale
            cells.append(f" | {a:>8.1f}{b:>8.1f}{b / a:>8.2f}")
        print(f"{n:>3}{4 * n:>6}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
