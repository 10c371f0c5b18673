"""Pictures of the studies (matplotlib, headless Agg backend). Every file is written atomically."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_cnet.analysis._files import write_atomically

LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the figures need matplotlib, a dependency of lightning-cnet that is not installed here: "
                          "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise the one-line ``ImportError`` of a missing matplotlib now, before a study's work rather than after it."""
    _pyplot()


def _save(figure: Any, path: str | Path) -> Path:
    figure.tight_layout()
    written = write_atomically(
        path, lambda temporary: figure.savefig(temporary, dpi=120, format="png", bbox_inches="tight"))
    _pyplot().close(figure)
    return written


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def plot_manifestation(rows_by_label: Mapping[str, Sequence[dict[str, Any]]], path: str | Path, *,
                       metric: str = "accuracy") -> Path:
    """``metric`` (accuracy in %, or a task's own) and logit distance against step count, one column per BatchNorm
    mode (as trained, recalibrated), a star at each checkpoint's training manifestation and a dotted line at its
    stages-off value. One checkpoint: a colour per scheme; several: a colour per checkpoint and a line style per
    scheme."""
    value, label_of_value = _metric_axis(metric)
    plt = _pyplot()
    rows = [row for group in rows_by_label.values() for row in group]
    modes = list(dict.fromkeys(row["bn"] for row in rows if row["scheme"] != "stages_off"))
    schemes = list(dict.fromkeys(row["scheme"] for row in rows if row["scheme"] != "stages_off"))
    by_scheme = len(rows_by_label) == 1
    styles = dict.fromkeys(schemes, "-") if by_scheme else dict(zip(schemes, itertools.cycle(LINE_STYLES)))
    colours = _colours(schemes if by_scheme else list(rows_by_label))
    figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 7), squeeze=False, sharex=True)
    for column, mode in enumerate(modes):
        accuracy_axes, distance_axes = axes[0][column], axes[1][column]
        for label, group in rows_by_label.items():
            for scheme in schemes:
                colour = colours[scheme if by_scheme else label]
                points = sorted((r["n_steps"], r) for r in group if (r["scheme"], r["bn"]) == (scheme, mode))
                if not points:
                    continue
                steps = [n for n, _ in points]
                accuracy_axes.plot(steps, [value(r) for _, r in points], color=colour, marker=".",
                                   linestyle=styles[scheme], label=scheme if by_scheme else f"{label} {scheme}")
                distance_axes.plot(steps, [r["logit_distance"] for _, r in points], color=colour,
                                   linestyle=styles[scheme], marker=".")
                for n, row in points:
                    if row["trained"]:
                        accuracy_axes.plot([n], [value(row)], marker="*", markersize=14, color=colour,
                                           linestyle="none")
            off = [r for r in group if r["scheme"] == "stages_off"]
            if off:
                accuracy_axes.axhline(value(off[0]), color="gray" if by_scheme else colours[label],
                                      linestyle=":", linewidth=1, label=f"{label} stages off")
        accuracy_axes.set_title(f"{next(iter(rows_by_label)) + ': ' if by_scheme else ''}BatchNorm statistics {mode}")
        accuracy_axes.set_ylabel(label_of_value)
        distance_axes.set_ylabel("relative logit distance to the reference")
        distance_axes.set_yscale("log")
        distance_axes.set_xlabel("integration steps per stage (star: training manifestation)")
        for ax in (accuracy_axes, distance_axes):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: the curves stay visible
    return _save(figure, path)


def plot_convergence(errors: Sequence[dict[str, Any]], orders: Sequence[dict[str, Any]], path: str | Path,
                     *, output: str = "logits") -> Path:
    """Log-log error against step count per scheme (filled: aligned step counts, open: the others), with dashed
    reference slopes of each tableau's order and the fitted orders in the legend."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 5))
    schemes = list(dict.fromkeys(row["scheme"] for row in errors))
    colours = _colours(schemes)
    fitted = {(row["scheme"], row["aligned"]): row["fitted_order"] for row in orders if row["output"] == output}
    for scheme in schemes:
        colour = colours[scheme]
        rows = sorted((r["n_steps"], r) for r in errors if (r["scheme"], r["output"]) == (scheme, output))
        axes.plot([n for n, _ in rows], [r["error"] for _, r in rows], color=colour, linewidth=0.8, alpha=0.5)
        aligned = [(n, r["error"]) for n, r in rows if r["aligned"]]
        others = [(n, r["error"]) for n, r in rows if not r["aligned"]]
        label = f"{scheme}: fitted {fitted.get((scheme, True), math.nan):.2f} aligned, " \
                f"{fitted.get((scheme, False), math.nan):.2f} other"
        if aligned:
            axes.plot(*zip(*aligned), color=colour, marker="o", linestyle="none", label=label)
            order = next(r["tableau_order"] for r in orders if r["scheme"] == scheme)
            n0, e0 = aligned[0]
            ends = [n0, max(n for n, _ in rows)]
            axes.plot(ends, [e0 * (n / n0) ** -order for n in ends], color=colour, linestyle="--", linewidth=0.8)
        if others:
            axes.plot(*zip(*others), color=colour, marker="o", markerfacecolor="none", linestyle="none",
                      label=None if aligned else label)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("integration steps per stage")
    axes.set_ylabel(f"relative error of the {output} vs the reference")
    axes.set_title("Convergence (dashed: slope of each tableau's order)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)
    return _save(figure, path)


def plot_depth_profile(
    pieces_by_label: Mapping[str, Sequence[dict[str, Any]]],
    stages_by_label: Mapping[str, Sequence[dict[str, Any]]],
    path: str | Path,
) -> Path:
    """theta(t) across depth, one column per stage, a colour per checkpoint: the gate ``s(t)``, the norm of the
    stage's kernels, and the relative jump between neighbouring pieces (with the stage's mean in the legend)."""
    plt = _pyplot()
    labels = list(pieces_by_label)
    colours = _colours(labels)
    n_stages = 1 + max(row["stage"] for rows in stages_by_label.values() for row in rows)
    figure, axes = plt.subplots(3, n_stages, figsize=(4.2 * n_stages, 8), squeeze=False, sharex=True)
    for label in labels:
        colour = colours[label]
        for stage_row in stages_by_label[label]:
            stage = stage_row["stage"]
            rows = [r for r in pieces_by_label[label] if r["stage"] == stage]
            kernels = [r for r in rows if r["tensor"].endswith("weight") and "norm" not in r["tensor"]]
            by_piece: dict[int, list[dict[str, Any]]] = {}
            for row in kernels:
                by_piece.setdefault(row["piece"], []).append(row)
            starts = [by_piece[k][0]["t_start"] for k in sorted(by_piece)]
            ends = [by_piece[k][0]["t_end"] for k in sorted(by_piece)]
            norms = [math.sqrt(sum(r["norm"] ** 2 for r in by_piece[k])) for k in sorted(by_piece)]
            gates = [float(g) for g in stage_row["gates"].split()] if stage_row["gates"] else []
            if gates:
                _steps(axes[0][stage], starts, ends, gates, colour, label)
            _steps(axes[1][stage], starts, ends, norms, colour, label)
            boundaries = [(a + b) / 2 for a, b in zip(ends[:-1], starts[1:])] if len(starts) > 1 else []
            jumps = _stage_jumps(kernels, len(starts))
            axes[2][stage].plot(boundaries, jumps, color=colour, marker="o", linestyle="none",
                                label=f"{label}: mean {stage_row['mean_relative_jump']:.3f}")
            axes[0][stage].set_title(f"stage {stage}")
    for stage in range(n_stages):
        axes[0][stage].set_ylabel("gate s(t)")
        axes[1][stage].set_ylabel("norm of the kernels")
        axes[2][stage].set_ylabel("relative jump of the kernels")
        axes[2][stage].set_xlabel("depth t")
        axes[2][stage].legend(fontsize=7)
        for panel in range(3):
            axes[panel][stage].grid(alpha=0.3)
    return _save(figure, path)


def _steps(axes: Any, starts: list[float], ends: list[float], values: list[float], colour: Any, label: str) -> None:
    if all(a == b for a, b in zip(starts, ends)):  # nodes of a linear basis
        axes.plot(starts, values, color=colour, marker=".", label=label)
        return
    for index, (a, b, v) in enumerate(zip(starts, ends, values)):
        axes.plot([a, b], [v, v], color=colour, label=label if index == 0 else None)


def _stage_jumps(kernel_rows: Sequence[dict[str, Any]], n_pieces: int) -> list[float]:
    """The kernels' relative jumps at each boundary, weighted by the kernels' norms (their combined jump)."""
    jumps = []
    for k in range(n_pieces - 1):
        rows = [r for r in kernel_rows if r["piece"] == k]
        numerator = sum((r["relative_jump"] * r["norm"]) ** 2 for r in rows)
        jumps.append(math.sqrt(numerator / sum(r["norm"] ** 2 for r in rows)))
    return jumps


def _metric_axis(metric: str) -> tuple[Any, str]:
    """How a row's ``metric`` is plotted, and the axis label: accuracy in percent, anything else as it is."""
    if metric == "accuracy":
        return (lambda row: 100 * row["accuracy"]), "accuracy (%)"
    return (lambda row: row[metric]), metric


def plot_compression(rows: Sequence[dict[str, Any]], path: str | Path, *, trained: tuple[int, int],
                     metric: str = "accuracy") -> Path:
    """``metric`` (accuracy in %, or a task's own) against parameters and against latency per (n_basis, n_steps)
    pair, the stages-off baseline dashed and the uncompressed model starred."""
    plt = _pyplot()
    value, label_of_value = _metric_axis(metric)
    off = next(row for row in rows if row["n_basis"] == 0)
    pairs = [row for row in rows if row["n_basis"] > 0]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "parameters", "parameters"), (axes[1], "ms_per_batch", "ms per batch")):
        for row in pairs:
            star = (row["n_basis"], row["n_steps"]) == trained
            ax.plot(row[key], value(row), marker="*" if star else "o", markersize=12 if star else 6,
                    color="C0", linestyle="none")
            ax.annotate(f"K={row['n_basis']}, N={row['n_steps']}", (row[key], value(row)),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(value(off), color="gray", linestyle="--", label="stages off")
        ax.set_xlabel(label)
        ax.set_ylabel(label_of_value)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Compression (star: the trained model)")
    return _save(figure, path)


def plot_training_curve(
    points: Sequence[tuple[float, float]], refinements: Sequence[float], path: str | Path, *, metric: str,
    title: str | None = None,
) -> Path:
    """A metric against epoch (whole-number ticks), with the refinement epochs marked.

    Args:
        points: ``(epoch, value)`` pairs.
        refinements: the epochs at which the model was refined.
        path: the PNG to write.
        metric: the metric's name (the y label).
        title: the figure's title (default: the metric's name).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(*zip(*sorted(points)), marker=".", label=metric)
    for index, epoch in enumerate(sorted(set(refinements))):
        axes.axvline(epoch, color="gray", linestyle="--", label="refinement" if index == 0 else None)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(title or f"{metric} by epoch")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)
