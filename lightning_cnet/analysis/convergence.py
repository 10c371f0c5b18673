"""Convergence study: the error of a trained model's outputs against step size, and its fitted order.

For a few batches, the model is run (in float64, eval mode) with every scheme and step count and compared with a
fine reference (default: RK4 at 16 times the largest step count). Two kinds of outputs are compared:

* the logits (the whole network; errors of all stages add up);
* each ODE stage's output, that stage integrated alone from the reference's input to it, so that its own
  discretisation error is measured.

The error is relative, ``||y_N - y_ref||_F / ||y_ref||_F``. The order is the slope of ``-log(error)`` against
``log(N)``, fitted by least squares separately for *aligned* step counts (multiples of the number of intervals of
every stage's basis, ``n_basis`` pieces or ``n_basis - 1`` linear elements: each step lies inside one interval of
``theta(t)``) and the others, whose steps straddle the jumps (or kinks) of ``theta(t)`` and converge at order ~1.
Only step counts at least the number of intervals enter a fit (the asymptotic regime). On ReLU networks the measured order of high-order schemes is typically ~2, below the
tableau's order: ReLU makes ``R`` only Lipschitz in the state.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> from lightning_cnet.analysis import as_batches
    >>> model = get_model("cnet_digits", n_steps=2).eval()
    >>> batches = as_batches([(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))])
    >>> errors, orders = convergence_study(model, batches, schemes=["euler"], n_steps=[2, 4], progress=False)
    >>> sorted({row["output"] for row in errors})
    ['logits', 'stage0', 'stage1', 'stage2']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_cnet.analysis._progress import pass_work, work_bar
from lightning_cnet.analysis.evaluation import Batch
from lightning_cnet.analysis.manifestation import check_sweep_arguments, step_grid
from lightning_cnet.bases import get_basis
from lightning_cnet.batches import model_input, to_device
from lightning_cnet.integrators import get_scheme, list_schemes
from lightning_cnet.models import ContinuousNet


@torch.inference_mode()
def _outputs(model: ContinuousNet, batches: Sequence[Batch], stage_inputs: list[list[torch.Tensor]] | None):
    """Logits per batch and, per stage, its output (from ``stage_inputs`` if given) and its input, per batch.

    The first stage's input is the stem's output, the same at every manifestation: its output from the whole
    network is taken as it is rather than computed a second time from ``stage_inputs``.
    """
    logits, inputs, outputs = [], [[] for _ in model.stages], [[] for _ in model.stages]

    def record(index: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inputs[index].append(args[0])
            outputs[index].append(output)

        return hook

    handles = [stage.register_forward_hook(record(i)) for i, stage in enumerate(model.stages)]
    try:
        for batch in batches:
            logits.append(model(model_input(batch)))
    finally:
        for handle in handles:
            handle.remove()
    if stage_inputs is not None:
        outputs = outputs[:1] + [[stage(x) for x in stage_inputs[i]] for i, stage in enumerate(model.stages) if i > 0]
    return logits, inputs, outputs


def _relative_error(values: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    difference = sum((v - r).square().sum().item() for v, r in zip(values, reference))
    return math.sqrt(difference / sum(r.square().sum().item() for r in reference))


def _work(model: ContinuousNet, images: int, scheme: str, steps: int, *, stages_alone: bool) -> int:
    """The work of :func:`_outputs` at one manifestation: the whole network, and (``stages_alone``) every stage
    after the first once more."""
    with model.manifestation(scheme=scheme, n_steps=steps):
        whole = pass_work(model, images)
        return whole + (whole - pass_work(model.stages[0], images) if stages_alone else 0)


def fit_order(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of ``-log(error)`` against ``log(n_steps)``; ``nan`` with fewer than two usable points."""
    usable = [(math.log(n), math.log(e)) for n, e in points if e > 0 and math.isfinite(e)]
    if len(usable) < 2:
        return math.nan
    mean_x = sum(x for x, _ in usable) / len(usable)
    mean_y = sum(y for _, y in usable) / len(usable)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in usable)
    variance = sum((x - mean_x) ** 2 for x, _ in usable)
    return -covariance / variance if variance > 0 else math.nan


def convergence_study(
    model: ContinuousNet,
    batches: Sequence[Batch],
    *,
    schemes: Sequence[str] | None = None,
    n_steps: Sequence[int] | None = None,
    reference_scheme: str = "rk4",
    reference_steps: int | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Errors against step count and fitted orders; the model is left as it was (a float64 copy is studied).

    Args:
        model: a trained ContinuousNet.
        batches: a few materialised batches.
        schemes: scheme names (default: every registered scheme).
        n_steps: step counts (default: :func:`~lightning_cnet.analysis.step_grid` up to 4 times the largest
            ``n_basis`` or trained step count).
        reference_scheme: scheme of the fine reference.
        reference_steps: its step count (default: 16 times the largest of ``n_steps``).
        progress: show a progress bar (of residual evaluations times images).

    Returns:
        ``(errors, orders)``: rows ``scheme, n_steps, aligned, output, error`` and rows
        ``scheme, output, aligned, fitted_order, tableau_order, points``.
    """
    schemes = list(schemes) if schemes is not None else list_schemes()
    pieces = [len(get_basis(r.basis).breakpoints(r.n_basis)) - 1 for r in model.resolution]  # intervals of theta(t)
    n_steps = list(n_steps) if n_steps is not None else step_grid(4 * max(pieces + [r.n_steps for r in model.resolution]))
    reference_steps = reference_steps or 16 * max(n_steps)
    check_sweep_arguments([*schemes, reference_scheme], [*n_steps, reference_steps])
    work = copy.deepcopy(model).double().eval()
    device = next(work.parameters()).device
    batches = [to_device(batch, device, torch.float64) for batch in batches]
    images = sum(len(model_input(batch)) for batch in batches)
    grid = [(s, n) for s in schemes for n in n_steps]
    amounts = [_work(work, images, scheme, steps, stages_alone=True) for scheme, steps in grid]
    reference_amount = _work(work, images, reference_scheme, reference_steps, stages_alone=False)
    bar = work_bar(reference_amount + sum(amounts), "convergence", enabled=progress)
    with work.manifestation(scheme=reference_scheme, n_steps=reference_steps):
        reference_logits, stage_inputs, reference_outputs = _outputs(work, batches, None)
    bar.update(reference_amount)

    errors: list[dict[str, Any]] = []
    for (scheme, steps), amount in zip(grid, amounts):
        with work.manifestation(scheme=scheme, n_steps=steps):
            logits, _, outputs = _outputs(work, batches, stage_inputs)
        bar.update(amount)
        aligned = all(steps % k == 0 for k in pieces)
        errors.append({"scheme": scheme, "n_steps": steps, "aligned": aligned, "output": "logits",
                       "error": _relative_error(logits, reference_logits)})
        for index, (values, reference) in enumerate(zip(outputs, reference_outputs)):
            errors.append({"scheme": scheme, "n_steps": steps, "aligned": steps % pieces[index] == 0,
                           "output": f"stage{index}", "error": _relative_error(values, reference)})
    bar.close()

    orders: list[dict[str, Any]] = []
    for scheme in schemes:
        for output in ["logits"] + [f"stage{i}" for i in range(len(pieces))]:
            floor = max(pieces) if output == "logits" else pieces[int(output[5:])]
            for aligned in (True, False):
                points = [(row["n_steps"], row["error"]) for row in errors
                          if (row["scheme"], row["output"], row["aligned"]) == (scheme, output, aligned)
                          and row["n_steps"] >= floor]
                orders.append({"scheme": scheme, "output": output, "aligned": aligned,
                               "fitted_order": fit_order(points), "tableau_order": get_scheme(scheme).order,
                               "points": len(points)})
    return errors, orders
