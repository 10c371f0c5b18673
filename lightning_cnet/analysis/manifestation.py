"""Manifestation sweep: is a trained ContinuousNet a meaningful integrator?

The model is evaluated with every scheme and step count (all stages alike). A meaningful integrator keeps its
accuracy and its logits close to those of a fine reference (its ODE limit) as the step count changes; a plain Euler
ResNet does not. Every sweep carries the **stages-off baseline** (every ODE stage replaced by the identity): a
model about as accurate without its stages is trivially "invariant", and its sweep says nothing. BatchNorm
statistics belong to the training manifestation; with recalibration batches each manifestation is evaluated twice,
as trained and with re-estimated statistics (:func:`~lightning_cnet.recalibrate_bn`).

**The reference.** The logits of every row are compared with a fine solution of the model's ODE: the reference
scheme (RK4) at ``N = 2M, 4M, 8M, ...`` steps (``M`` the largest swept count), the first ``N`` whose logits differ
from those at ``N / 2`` by at most ``reference_rtol`` (relative Frobenius norm over all batches; default ``1e-4``),
and at most ``16M``. For a scheme converging at order ``p >= 1`` (in its asymptotic regime) that difference bounds
the reference's own error, so every distance in the table is within ``reference_rtol`` of the distance to the exact
solution of the ODE. The check starts from
the row at ``(reference scheme, M)`` when the sweep has it, and is made for each BatchNorm setting (with statistics
re-estimated at each candidate). The step count used is the ``reference_steps`` column.

**Adaptive steps.** ``integrators=[AdaptiveRK("dopri5", rtol=1e-3), ...]`` adds a row per integrator, evaluated with
the steps it chooses to its tolerances (as trained only: BatchNorm statistics cannot be re-estimated while steps are
rejected); those rows carry ``n_steps`` ``None``, their ``rtol`` and ``atol`` (columns every row then has) and, like
every row, the residual evaluations of their last forward pass (``function_evaluations``): accuracy against cost.

**Cost.** Rows are evaluated in place (no copies of the model; re-estimated statistics are put back afterwards),
without gradients, and the progress bar counts residual evaluations times images, the reference included.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> from lightning_cnet.analysis import as_batches
    >>> model = get_model("cnet_digits", n_steps=2).eval()
    >>> batches = as_batches([(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))])
    >>> rows = manifestation_sweep(model, batches, schemes=["euler", "rk4"], n_steps=[1, 2], reference_steps=8,
    ...                            progress=False)
    >>> [(row["scheme"], row["n_steps"], row["trained"]) for row in rows]
    [('stages_off', 0, False), ('euler', 1, False), ('euler', 2, True), ('rk4', 1, False), ('rk4', 2, False)]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_cnet.adaptive import AdaptiveRK
from lightning_cnet.analysis._progress import add_work, pass_work, work_bar
from lightning_cnet.analysis.evaluation import Batch, evaluate_with_outputs
from lightning_cnet.batches import batch_size
from lightning_cnet.integrators import get_scheme, list_schemes, validate_n_steps
from lightning_cnet.models import ContinuousNet
from lightning_cnet.recalibration import recalibrate_bn

AS_TRAINED, RECALIBRATED = "as trained", "recalibrated"
#: The reference is at most this many times the largest swept step count.
MAX_REFERENCE_FACTOR = 16


def step_grid(largest: int) -> list[int]:
    """``1, 2, 3, 4, 6, 8, 12, 16, ...`` up to ``largest``: powers of two and three times powers of two, so that
    step counts that are not multiples of the pieces (3, 6, 12, ...) are not hidden.

    Example:
        >>> step_grid(16)
        [1, 2, 3, 4, 6, 8, 12, 16]
    """
    grid: set[int] = set()
    power = 1
    while power <= largest:
        grid.update(n for n in (power, 3 * power // 2) if n <= largest)
        power *= 2
    return sorted(grid)


def trained_manifestation(model: ContinuousNet) -> tuple[str, int] | None:
    """``(scheme, n_steps)`` shared by every stage, or ``None`` if the stages differ."""
    pairs = {(r.scheme, r.n_steps) for r in model.resolution}
    return pairs.pop() if len(pairs) == 1 else None


def default_schemes() -> list[str]:
    """The schemes a sweep takes by default: every registered one but the embedded pairs (``bosh3``, ``dopri5``: their
    place is adaptive steps; name them to sweep them with fixed steps)."""
    return [name for name in list_schemes() if not get_scheme(name).has_error_estimate]


def check_sweep_arguments(schemes: Sequence[str], n_steps: Sequence[int],
                          integrators: Sequence[Any] = ()) -> None:
    """Raise ``ValueError`` for an unknown scheme, a step count < 1 or an integrator that is not an
    :class:`~lightning_cnet.adaptive.AdaptiveRK` (before any work)."""
    for scheme in schemes:
        get_scheme(scheme)
    for steps in n_steps:
        validate_n_steps(steps)
    for integrator in integrators:
        if not isinstance(integrator, AdaptiveRK):
            raise ValueError(f"integrators: {integrator!r} is not valid: expected AdaptiveRK instances (fixed steps "
                             "are swept by schemes and n_steps)")


def relative_distance(values: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """``||values - reference||_F / ||reference||_F`` over all batches (in float64); ``nan`` without outputs (a task
    that defines no ``forward``)."""
    if not values or not reference:
        return math.nan
    difference = sum((v - r).double().square().sum().item() for v, r in zip(values, reference))
    return math.sqrt(difference / sum(r.double().square().sum().item() for r in reference))


@contextmanager
def statistics_restored(model: torch.nn.Module) -> Iterator[None]:
    """Put every BatchNorm buffer (running statistics, batch counts) back as it was when the block ends."""
    saved = [(buffer, buffer.clone()) for module in model.modules() if isinstance(module, _BatchNorm)
             for buffer in module.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class _Evaluator:
    """Evaluates ``model`` at manifestations, as trained or with re-estimated statistics, keeping the logits."""

    def __init__(self, model: ContinuousNet, batches: Sequence[Batch], recalibration: Sequence[Any] | None,
                 recalibration_batches: int | None, bar: Any) -> None:
        self.model, self.batches, self.bar = model, batches, bar
        self.recalibration = None if recalibration is None else list(recalibration)[:recalibration_batches]
        self.images = sum(batch_size(batch) for batch in batches)
        self.recalibration_images = sum(batch_size(batch) for batch in self.recalibration or [])

    def work(self, mode: str) -> int:
        """The work of one evaluation at the model's current manifestation."""
        images = self.images + (self.recalibration_images if mode == RECALIBRATED else 0)
        return pass_work(self.model, images)

    def __call__(self, mode: str, scheme: str, n_steps: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Metrics (:func:`~lightning_cnet.analysis.evaluate`) and logits of one manifestation."""
        with self.model.manifestation(scheme=scheme, n_steps=n_steps), statistics_restored(self.model):
            work = self.work(mode)
            if mode == RECALIBRATED:
                assert self.recalibration is not None  # the mode is only planned with recalibration batches
                recalibrate_bn(self.model, self.recalibration)
            result = self.evaluate()
        self.bar.update(work)
        return result

    def adaptive(self, integrator: AdaptiveRK) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Metrics and logits with the steps ``integrator`` chooses, as trained."""
        with self.model.manifestation(integrator=integrator):
            result = self.evaluate()
            work = self.work(AS_TRAINED)  # known once the steps are chosen
        add_work(self.bar, work)
        self.bar.update(work)
        return result

    def evaluate(self) -> tuple[dict[str, float], list[torch.Tensor]]:
        return evaluate_with_outputs(self.model, self.batches)


def _fine_reference(
    evaluator: _Evaluator, mode: str, scheme: str, coarse: list[torch.Tensor] | None, largest: int, rtol: float
) -> tuple[int, list[torch.Tensor]]:
    """The reference of this module's docstring: ``scheme`` at the first of ``2 * largest, 4 * largest, ...`` steps
    whose logits change by at most ``rtol`` from half as many steps, at most ``MAX_REFERENCE_FACTOR * largest``.

    Args:
        evaluator: evaluates the model in ``mode``.
        mode: the BatchNorm setting.
        scheme: the reference scheme.
        coarse: the logits at ``(scheme, largest)`` if already known.
        largest: the largest swept step count.
        rtol: the largest relative change accepted.

    Returns:
        ``(n_steps, logits)`` of the reference.
    """
    if coarse is None:
        coarse = _unplanned(evaluator, mode, scheme, largest)[1]
    steps = largest
    while steps < MAX_REFERENCE_FACTOR * largest:
        steps *= 2
        fine = _unplanned(evaluator, mode, scheme, steps)[1]
        if not fine or relative_distance(coarse, fine) <= rtol:  # no outputs: nothing to converge
            break
        coarse = fine
    return steps, fine


def _unplanned(
    evaluator: _Evaluator, mode: str, scheme: str, steps: int
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Evaluate a manifestation that was not in the bar's plan: its work is added first."""
    with evaluator.model.manifestation(scheme=scheme, n_steps=steps):
        add_work(evaluator.bar, evaluator.work(mode))
    return evaluator(mode, scheme, steps)


def manifestation_sweep(
    model: ContinuousNet,
    batches: Sequence[Batch],
    *,
    schemes: Sequence[str] | None = None,
    n_steps: Sequence[int] | None = None,
    reference_scheme: str = "rk4",
    reference_steps: int | None = None,
    reference_rtol: float = 1e-4,
    recalibration: Sequence[Any] | None = None,
    recalibration_batches: int | None = None,
    integrators: Sequence[AdaptiveRK] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` at every (scheme, step count), and with every adaptive integrator; the model is left as it
    was.

    Args:
        model: a trained ContinuousNet.
        batches: materialised evaluation batches (:func:`~lightning_cnet.analysis.as_batches`).
        schemes: scheme names (default: :func:`default_schemes`).
        n_steps: step counts per stage (default: :func:`step_grid` up to twice the largest trained count).
        reference_scheme: scheme of the fine reference the logits are compared with.
        reference_steps: its step count (default: chosen by the convergence check of this module's docstring).
        reference_rtol: the tolerance of that check.
        recalibration: unlabeled batches (tensors or ``(inputs, targets)``); if given, every manifestation is also
            evaluated with BatchNorm statistics re-estimated at it.
        recalibration_batches: use at most this many of them.
        integrators: :class:`~lightning_cnet.adaptive.AdaptiveRK` instances, one row each (see the module's notes).
        progress: show a progress bar (of residual evaluations times images).

    Returns:
        One row per evaluation: ``scheme`` (``"stages_off"`` for the baseline, with ``n_steps`` 0), ``n_steps``,
        ``bn`` (``"as trained"`` or ``"recalibrated"``), ``trained`` (the training manifestation), the keys of
        :func:`~lightning_cnet.analysis.evaluate` and ``reference_steps`` (the reference's step count); with
        ``integrators``, ``rtol`` and ``atol`` too (``None`` for fixed steps).
    """
    schemes = list(schemes) if schemes is not None else default_schemes()
    integrators = list(integrators)
    check_sweep_arguments([], [], integrators)
    largest_trained = max(r.n_steps for r in model.resolution)
    n_steps = list(n_steps) if n_steps is not None else step_grid(2 * largest_trained)
    check_sweep_arguments([*schemes, reference_scheme], [*n_steps, *([reference_steps] if reference_steps else [])])
    if not (isinstance(reference_rtol, (int, float)) and reference_rtol > 0):
        raise ValueError(f"reference_rtol={reference_rtol!r} is not valid: expected a positive number")
    if recalibration is not None and not list(recalibration):
        raise ValueError("recalibration: no batches to re-estimate the BatchNorm statistics from")
    trained = trained_manifestation(model)
    modes = [AS_TRAINED] + ([RECALIBRATED] if recalibration is not None else [])
    grid = [(mode, scheme, steps) for mode in modes for scheme in schemes for steps in n_steps]
    model.eval()
    bar = work_bar(0, "manifestations", enabled=progress)
    evaluator = _Evaluator(model, batches, recalibration, recalibration_batches, bar)
    for mode, scheme, steps in grid:
        with model.manifestation(scheme=scheme, n_steps=steps):
            add_work(bar, evaluator.work(mode))
    with model.stages_off():
        add_work(bar, evaluator.work(AS_TRAINED))
        off = evaluator.evaluate()
        bar.update(evaluator.work(AS_TRAINED))
    results = {key: evaluator(*key) for key in grid}
    adaptive = [evaluator.adaptive(integrator) for integrator in integrators]

    references: dict[str, tuple[int, list[torch.Tensor]]] = {}
    largest = max(n_steps)
    for mode in modes:
        if reference_steps:
            references[mode] = reference_steps, _unplanned(evaluator, mode, reference_scheme, reference_steps)[1]
        else:
            coarse = results.get((mode, reference_scheme, largest))
            references[mode] = _fine_reference(evaluator, mode, reference_scheme, coarse and coarse[1], largest,
                                              reference_rtol)
    bar.close()

    def row(scheme: str, steps: int | None, mode: str, result: tuple[dict[str, float], list[torch.Tensor]],
            integrator: AdaptiveRK | None = None) -> dict[str, Any]:
        metrics, logits = result
        reference_n, reference = references[mode]
        tolerances = {} if not integrators else {"rtol": integrator and integrator.rtol,
                                                 "atol": integrator and integrator.atol}
        return {"scheme": scheme, "n_steps": steps, "bn": mode, "trained": (scheme, steps) == trained, **tolerances,
                **metrics, "logit_distance": relative_distance(logits, reference), "reference_steps": reference_n}

    return ([row("stages_off", 0, AS_TRAINED, off)]
            + [row(scheme, steps, mode, results[mode, scheme, steps]) for mode, scheme, steps in grid]
            + [row(integrator.name, None, AS_TRAINED, result, integrator)
               for integrator, result in zip(integrators, adaptive)])
