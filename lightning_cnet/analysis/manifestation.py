"""Manifestation sweep: is a trained ContinuousNet a meaningful integrator?

The model is evaluated with every scheme and step count (all stages alike). A meaningful integrator keeps its
accuracy and its logits close to those of a fine reference (its ODE limit) as the step count changes; a plain Euler
ResNet does not. Every sweep carries the **stages-off baseline** (every ODE stage replaced by the identity): a
model about as accurate without its stages is trivially "invariant", and its sweep says nothing. BatchNorm
statistics belong to the training manifestation; with recalibration batches each manifestation is evaluated twice,
as trained and with re-estimated statistics (:func:`~lightning_cnet.recalibrate_bn`).

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

import copy
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from lightning_cnet.analysis.evaluation import Batch, evaluate, logits_of
from lightning_cnet.integrators import get_scheme, list_schemes, validate_n_steps
from lightning_cnet.models import ContinuousNet
from lightning_cnet.recalibration import recalibrate_bn

AS_TRAINED, RECALIBRATED = "as trained", "recalibrated"


def step_grid(largest: int) -> list[int]:
    """``1, 2, 3, 4, 6, 8, 12, 16, ...`` up to ``largest``: powers of two and three times powers of two, so that
    step counts that are not multiples of the pieces (3, 6, 12, ...) are not hidden.

    Example:
        >>> step_grid(16)
        [1, 2, 3, 4, 6, 8, 12, 16]
    """
    grid, power = set(), 1
    while power <= largest:
        grid.update(n for n in (power, 3 * power // 2) if n <= largest)
        power *= 2
    return sorted(grid)


def trained_manifestation(model: ContinuousNet) -> tuple[str, int] | None:
    """``(scheme, n_steps)`` shared by every stage, or ``None`` if the stages differ."""
    pairs = {(r.scheme, r.n_steps) for r in model.resolution}
    return pairs.pop() if len(pairs) == 1 else None


def check_sweep_arguments(schemes: Sequence[str], n_steps: Sequence[int]) -> None:
    """Raise ``ValueError`` for an unknown scheme or a step count < 1 (before any work)."""
    for scheme in schemes:
        get_scheme(scheme)
    for steps in n_steps:
        validate_n_steps(steps)


def _recalibrated(model: ContinuousNet, scheme: str, n_steps: int, batches: Sequence[Any], count: int | None):
    work = copy.deepcopy(model)
    work.set_manifestation(scheme=scheme, n_steps=n_steps)
    recalibrate_bn(work, batches, num_batches=count)
    return work.eval()


def manifestation_sweep(
    model: ContinuousNet,
    batches: Sequence[Batch],
    *,
    schemes: Sequence[str] | None = None,
    n_steps: Sequence[int] | None = None,
    reference_scheme: str = "rk4",
    reference_steps: int | None = None,
    recalibration: Sequence[Any] | None = None,
    recalibration_batches: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` at every (scheme, step count); the model is left as it was.

    Args:
        model: a trained ContinuousNet.
        batches: materialised evaluation batches (:func:`~lightning_cnet.analysis.as_batches`).
        schemes: scheme names (default: every registered scheme).
        n_steps: step counts per stage (default: :func:`step_grid` up to twice the largest trained count).
        reference_scheme: scheme of the fine reference the logits are compared with.
        reference_steps: its step count (default: 16 times the largest swept count).
        recalibration: unlabeled batches (tensors or ``(inputs, targets)``); if given, every manifestation is also
            evaluated with BatchNorm statistics re-estimated at it.
        recalibration_batches: use at most this many of them.
        progress: show a progress bar.

    Returns:
        One row per evaluation: ``scheme`` (``"stages_off"`` for the baseline, with ``n_steps`` 0), ``n_steps``,
        ``bn`` (``"as trained"`` or ``"recalibrated"``), ``trained`` (the training manifestation), and the keys of
        :func:`~lightning_cnet.analysis.evaluate`.
    """
    schemes = list(schemes) if schemes is not None else list_schemes()
    largest_trained = max(r.n_steps for r in model.resolution)
    n_steps = list(n_steps) if n_steps is not None else step_grid(2 * largest_trained)
    reference_steps = reference_steps or 16 * max(n_steps)
    check_sweep_arguments([*schemes, reference_scheme], [*n_steps, reference_steps])
    trained = trained_manifestation(model)
    modes = [AS_TRAINED] + ([RECALIBRATED] if recalibration is not None else [])
    grid = [(mode, scheme, steps) for mode in modes for scheme in schemes for steps in n_steps]
    progress_bar = tqdm(total=len(grid) + len(modes) + 1, desc="manifestations", disable=not progress)

    references = {}
    for mode in modes:
        if mode == AS_TRAINED:
            with model.manifestation(scheme=reference_scheme, n_steps=reference_steps):
                references[mode] = logits_of(model, batches)
        else:
            references[mode] = logits_of(
                _recalibrated(model, reference_scheme, reference_steps, recalibration, recalibration_batches), batches
            )
        progress_bar.update()
    model.eval()
    with model.stages_off():
        rows = [{"scheme": "stages_off", "n_steps": 0, "bn": AS_TRAINED, "trained": False,
                 **evaluate(model, batches, reference=references[AS_TRAINED])}]
    progress_bar.update()
    for mode, scheme, steps in grid:
        if mode == AS_TRAINED:
            with model.manifestation(scheme=scheme, n_steps=steps):
                result = evaluate(model, batches, reference=references[mode])
        else:
            work = _recalibrated(model, scheme, steps, recalibration, recalibration_batches)
            result = evaluate(work, batches, reference=references[mode])
        rows.append({"scheme": scheme, "n_steps": steps, "bn": mode, "trained": (scheme, steps) == trained,
                     **result})
        progress_bar.update()
    progress_bar.close()
    return rows
