"""Manifestation and compression studies of a trained ContinuousNet, as tables and pictures.

* :func:`manifestation_sweep`: accuracy for every scheme and step count (is the model a meaningful
  integrator? A plain Euler ResNet collapses when its step count changes; a good ContinuousNet does not).
* :func:`compression_sweep`: accuracy, parameter count and latency after projecting onto fewer basis
  coefficients and/or integrating with fewer steps.
* :func:`write_csv`, :func:`plot_manifestation`, :func:`plot_training_curve`: results to CSV and PNG
  (matplotlib, Agg backend; install the ``plot`` extra).

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", n_steps=2).eval()
    >>> batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))]
    >>> rows = manifestation_sweep(model, batches, schemes=["euler", "rk4"], n_steps=[1, 2], progress=False)
    >>> [(row["scheme"], row["n_steps"]) for row in rows]
    [('euler', 1), ('euler', 2), ('rk4', 1), ('rk4', 2)]
"""

from __future__ import annotations

import copy
import csv
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lightning_cnet.models import ContinuousNet

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate(model: ContinuousNet, batches: Batches, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 accuracy and median milliseconds per batch of ``model`` (in eval mode) over ``batches``.

    The first batch is also run once untimed, so that one-off costs do not count as latency.
    """
    model.eval().to(device)
    correct, total, milliseconds = 0, 0, []
    for index, (images, targets) in enumerate(batches):
        images, targets = images.to(device), targets.to(device)
        if index == 0:
            model(images)
        start = time.perf_counter()
        logits = model(images)
        milliseconds.append(1000.0 * (time.perf_counter() - start))
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        total += targets.numel()
    if total == 0:
        raise ValueError("the data yielded no batches to evaluate on")
    return {"accuracy": correct / total, "ms_per_batch": statistics.median(milliseconds)}


def manifestation_sweep(
    model: ContinuousNet,
    batches: Batches,
    *,
    schemes: Sequence[str] = ("euler", "midpoint", "rk4"),
    n_steps: Sequence[int] = (1, 2, 4, 8, 16),
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` with every scheme and step count (all stages alike); the model is restored after.

    Args:
        model: a trained ContinuousNet.
        batches: an iterable of ``(images, targets)``, e.g. a test DataLoader (iterated once per row).
        schemes: registered scheme names.
        n_steps: step counts per stage.
        device: where to evaluate.
        progress: show a progress bar.

    Returns:
        One row per (scheme, n_steps): ``scheme``, ``n_steps``, ``function_evaluations``, ``accuracy``, ``ms_per_batch``.
    """
    grid = [(scheme, steps) for scheme in schemes for steps in n_steps]
    rows = []
    for scheme, steps in tqdm(grid, desc="manifestations", disable=not progress):
        with model.manifestation(scheme=scheme, n_steps=steps):
            result = evaluate(model, batches, device)
            rows.append({"scheme": scheme, "n_steps": steps,
                         "function_evaluations": model.function_evaluations, **result})
    return rows


def compression_sweep(
    model: ContinuousNet,
    batches: Batches,
    *,
    n_basis: Sequence[int],
    n_steps: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate copies of ``model`` projected onto fewer basis coefficients and integrated with fewer steps.

    Args:
        model: a trained ContinuousNet (left unchanged).
        batches: an iterable of ``(images, targets)``.
        n_basis: coefficient counts per stage, each at most the model's.
        n_steps: step counts per stage; default: the same as ``n_basis`` for each row.
        device: where to evaluate.
        progress: show a progress bar.

    Returns:
        One row per setting: ``n_basis``, ``n_steps``, ``parameters``, ``accuracy``, ``ms_per_batch``.
    """
    grid = [(k, n) for k in n_basis for n in (n_steps or [k])]
    rows = []
    for k, n in tqdm(grid, desc="compressions", disable=not progress):
        compressed = copy.deepcopy(model)
        compressed.compress(n_basis=k, n_steps=n)
        result = evaluate(compressed, batches, device)
        rows.append({"n_basis": k, "n_steps": n,
                     "parameters": sum(p.numel() for p in compressed.parameters()), **result})
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write rows of equal keys to a CSV file (parent directories are created)."""
    if not rows:
        raise ValueError("no rows to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'lightning-cnet[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_manifestation(rows: Sequence[dict[str, Any]], path: str | Path, *, trained: str = "") -> Path:
    """Accuracy against step count, one line per scheme (the rows of :func:`manifestation_sweep`)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for scheme in dict.fromkeys(row["scheme"] for row in rows):
        points = sorted((row["n_steps"], 100 * row["accuracy"]) for row in rows if row["scheme"] == scheme)
        axes.plot(*zip(*points), marker="o", label=scheme)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("integration steps per stage")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Manifestation" + (f" of a model trained with {trained}" if trained else ""))
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_training_curve(metrics_csv: str | Path, path: str | Path, *, metric: str = "val_acc") -> Path:
    """Plot ``metric`` against epoch from a Lightning ``metrics.csv``, with refinement epochs marked.

    Refinements are read from the ``refinement/epoch`` column that the depth-refinement callback logs.
    """
    plt = _pyplot()
    with Path(metrics_csv).open() as handle:
        records = list(csv.DictReader(handle))
    points = sorted({(int(r["epoch"]), float(r[metric])) for r in records if r.get(metric) not in (None, "")})
    if not points:
        raise ValueError(f"{metrics_csv} has no values of {metric!r}")
    refinements = sorted({int(float(r["refinement/epoch"])) for r in records if r.get("refinement/epoch")})
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(*zip(*points), marker=".", label=metric)
    for index, epoch in enumerate(refinements):
        axes.axvline(epoch, color="gray", linestyle="--", label="refinement" if index == 0 else None)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    figure.clear()
    return path
