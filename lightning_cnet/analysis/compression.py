"""Compression: accuracy, size and latency of a trained model projected onto fewer pieces and run with fewer steps.

Each (n_basis, n_steps) pair is applied to a copy of the model with :meth:`~lightning_cnet.ContinuousNet.compress`
(an L2 projection of the weights and BatchNorm statistics, no data needed). The stages-off baseline is reported
with it: compression that keeps a model above it keeps something of its stages.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> from lightning_cnet.analysis import as_batches
    >>> model = get_model("cnet_digits", n_steps=4).eval()
    >>> batches = as_batches([(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))])
    >>> rows = compression_sweep(model, batches, pairs=[(4, 4), (2, 2)], progress=False)
    >>> [(row["n_basis"], row["n_steps"], row["parameters"]) for row in rows]
    [(0, 0, 18530), (4, 4, 116206), (2, 2, 67368)]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

from lightning_cnet.analysis._progress import pass_work, work_bar
from lightning_cnet.analysis.evaluation import Batch, evaluate
from lightning_cnet.models import ContinuousNet
from lightning_cnet.ode_block import ODEBlock


def parse_pair(text: str) -> tuple[int, int]:
    """``"K:N"`` -> ``(K, N)``.

    Raises:
        ValueError: not two integers separated by a colon.
    """
    try:
        k, n = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"{text!r} is not a pair n_basis:n_steps such as 4:4") from None
    return k, n


def check_pairs(model: ContinuousNet, pairs: Sequence[tuple[int, int]]) -> None:
    """Raise ``ValueError`` for a pair :meth:`~lightning_cnet.ContinuousNet.compress` would refuse (before any work)."""
    for k, n in pairs:
        for stage in cast(list[ODEBlock], list(model.stages)):
            stage.check_compress(k, n)


def compressed(model: ContinuousNet, n_basis: int, n_steps: int) -> ContinuousNet:
    """A compressed copy of ``model``; the model itself is left as it was."""
    copied = copy.deepcopy(model)
    copied.compress(n_basis=n_basis, n_steps=n_steps)
    return copied.eval()


def compression_sweep(
    model: ContinuousNet, batches: Sequence[Batch], *, pairs: Sequence[tuple[int, int]], progress: bool = True
) -> list[dict[str, Any]]:
    """Evaluate compressed copies of ``model``, one per ``(n_basis, n_steps)`` pair, and the stages-off baseline.

    Args:
        model: a trained ContinuousNet (left unchanged).
        batches: materialised evaluation batches.
        pairs: ``(n_basis, n_steps)`` per row, applied to every stage; ``n_basis`` at most the model's.
        progress: show a progress bar (of residual evaluations times images).

    Returns:
        One row per pair, after a first row for the stages-off baseline (``n_basis = n_steps = 0``, the parameters
        of stem, stitches and head): ``n_basis``, ``n_steps``, ``parameters``, and the keys of
        :func:`~lightning_cnet.analysis.evaluate`.

    Raises:
        ValueError: a pair finer than the model or otherwise invalid; nothing is evaluated.
    """
    check_pairs(model, pairs)
    model.eval()
    images = sum(len(targets) for _, targets in batches)
    work = [images]
    for _, n in pairs:
        with model.manifestation(n_steps=n):  # a compressed copy runs n steps of the same scheme
            work.append(pass_work(model, images))
    bar = work_bar(sum(work), "compressions", enabled=progress)
    outside = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("stages."))
    with model.stages_off():
        rows = [{"n_basis": 0, "n_steps": 0, "parameters": outside, **evaluate(model, batches)}]
    bar.update(work[0])
    for (k, n), amount in zip(pairs, work[1:]):
        copied = compressed(model, k, n)
        rows.append({"n_basis": k, "n_steps": n, "parameters": sum(p.numel() for p in copied.parameters()),
                     **evaluate(copied, batches)})
        bar.update(amount)
    bar.close()
    return rows
