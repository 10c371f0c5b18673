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
Only step counts at least the number of intervals enter a fit (the asymptotic regime). On ReLU networks the measured
order of high-order schemes is typically ~2, below the tableau's order: ReLU makes ``R`` only Lipschitz in the state.

Adaptive steps (``integrators=[AdaptiveRK("dopri5", rtol=r) for r in ...]``) add rows with ``n_steps`` ``None``, their
tolerances and the residual evaluations of a forward pass (``function_evaluations``, columns every row then has);
their steps never straddle a breakpoint (``aligned``), and their order is fitted against the evaluations (for fixed
steps, proportional to the step count), one fit per scheme over its tolerances.

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

from lightning_cnet.adaptive import AdaptiveRK
from lightning_cnet.analysis._progress import add_work, pass_work, work_bar
from lightning_cnet.analysis.evaluation import Batch
from lightning_cnet.analysis.manifestation import check_sweep_arguments, default_schemes, step_grid
from lightning_cnet.bases import get_basis
from lightning_cnet.batches import model_input, to_device
from lightning_cnet.integrators import get_scheme
from lightning_cnet.models import ContinuousNet


@torch.inference_mode()
def _outputs(
    model: ContinuousNet, batches: Sequence[Batch], stage_inputs: list[list[torch.Tensor]] | None
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Logits per batch and, per stage, its output (from ``stage_inputs`` if given) and its input, per batch.

    The first stage's input is the stem's output, the same at every manifestation: its output from the whole
    network is taken as it is rather than computed a second time from ``stage_inputs``.
    """
    logits: list[torch.Tensor] = []
    inputs: list[list[torch.Tensor]] = [[] for _ in model.stages]
    outputs: list[list[torch.Tensor]] = [[] for _ in model.stages]

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


def _work(model: ContinuousNet, images: int, scheme: str | None, steps: int | None, *, stages_alone: bool) -> int:
    """The work of :func:`_outputs` at one manifestation (``None``: the current one): the whole network, and
    (``stages_alone``) every stage after the first once more."""
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
    integrators: Sequence[AdaptiveRK] = (),
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Errors against step count and fitted orders; the model is left as it was (a float64 copy is studied).

    Args:
        model: a trained ContinuousNet.
        batches: a few materialised batches.
        schemes: scheme names (default: :func:`~lightning_cnet.analysis.manifestation.default_schemes`).
        n_steps: step counts (default: :func:`~lightning_cnet.analysis.step_grid` up to 4 times the largest
            ``n_basis`` or trained step count).
        reference_scheme: scheme of the fine reference.
        reference_steps: its step count (default: 16 times the largest of ``n_steps``).
        integrators: :class:`~lightning_cnet.adaptive.AdaptiveRK` instances (see the module's notes).
        progress: show a progress bar (of residual evaluations times images).

    Returns:
        ``(errors, orders)``: rows ``scheme, n_steps, aligned, output, error`` and rows
        ``scheme, output, aligned, fitted_order, tableau_order, points``; with ``integrators``, the errors have
        ``rtol, atol, function_evaluations`` and the orders ``adaptive`` too.
    """
    schemes = list(schemes) if schemes is not None else default_schemes()
    integrators = list(integrators)
    check_sweep_arguments([], [], integrators)
    pieces = [len(get_basis(r.basis).breakpoints(r.n_basis)) - 1 for r in model.resolution]  # intervals of theta(t)
    n_steps = (list(n_steps) if n_steps is not None
               else step_grid(4 * max(pieces + [r.n_steps for r in model.resolution])))
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

    def rows(scheme: str, steps: int | None, logits: list[torch.Tensor], outputs: list[list[torch.Tensor]],
             integrator: AdaptiveRK | None = None) -> list[dict[str, Any]]:
        extra = {} if not integrators else {"rtol": integrator and integrator.rtol,
                                            "atol": integrator and integrator.atol,
                                            "function_evaluations": work.function_evaluations}
        found = [{"scheme": scheme, "n_steps": steps, "aligned": steps is None or all(steps % k == 0 for k in pieces),
                  "output": "logits", **extra, "error": _relative_error(logits, reference_logits)}]
        for index, (values, reference) in enumerate(zip(outputs, reference_outputs)):
            found.append({"scheme": scheme, "n_steps": steps, "aligned": steps is None or steps % pieces[index] == 0,
                          "output": f"stage{index}", **extra, "error": _relative_error(values, reference)})
        return found

    errors: list[dict[str, Any]] = []
    for (scheme, steps), amount in zip(grid, amounts):
        with work.manifestation(scheme=scheme, n_steps=steps):
            logits, _, outputs = _outputs(work, batches, stage_inputs)
            errors += rows(scheme, steps, logits, outputs)
        bar.update(amount)
    for integrator in integrators:
        with work.manifestation(integrator=integrator):
            logits, _, outputs = _outputs(work, batches, stage_inputs)
            errors += rows(integrator.name, None, logits, outputs, integrator)
            work_done = _work(work, images, None, None, stages_alone=True)
        add_work(bar, work_done)
        bar.update(work_done)
    bar.close()

    orders: list[dict[str, Any]] = []
    outputs_named = ["logits"] + [f"stage{i}" for i in range(len(pieces))]
    adaptive = {} if not integrators else {"adaptive": False}
    for scheme in schemes:
        for output in outputs_named:
            floor = max(pieces) if output == "logits" else pieces[int(output[5:])]
            for aligned in (True, False):
                points = [(row["n_steps"], row["error"]) for row in errors
                          if (row["scheme"], row["output"], row["aligned"]) == (scheme, output, aligned)
                          and row["n_steps"] is not None and row["n_steps"] >= floor]
                orders.append({"scheme": scheme, "output": output, "aligned": aligned, **adaptive,
                               "fitted_order": fit_order(points), "tableau_order": get_scheme(scheme).order,
                               "points": len(points)})
    for scheme in dict.fromkeys(integrator.name for integrator in integrators):
        for output in outputs_named:
            points = [(row["function_evaluations"], row["error"]) for row in errors
                      if (row["scheme"], row["output"]) == (scheme, output) and row["n_steps"] is None]
            orders.append({"scheme": scheme, "output": output, "aligned": True, "adaptive": True,
                           "fitted_order": fit_order(points), "tableau_order": get_scheme(scheme).order,
                           "points": len(points)})
    return errors, orders
