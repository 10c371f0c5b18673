"""Depth profile: what ``theta(t)`` looks like across depth, and how smooth it is.

Smoothness of the weights in depth is what decided invariance to the manifestation and compressibility in every
model measured: refined models have neighbouring pieces a few percent apart and stay accurate at fewer steps and
after projection onto fewer pieces; models trained with many pieces from the start have unrelated pieces (a
relative jump near ``sqrt(2)``, as for independent random vectors) and collapse below ``N = K``.

For every ODE stage and every time-dependent parameter the profile gives the norm of each piece and the relative
jump to the next one, ``||theta_{k+1} - theta_k|| / ||theta_k||``, the skip-init gate ``s(t)``, and one number per
stage, the **mean relative jump** of all the stage's parameters together (0 for pieces copied by a refinement,
~1.4 for unrelated ones).

Example:
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", n_steps=2)
    >>> model.refine() and None
    >>> pieces, stages = depth_profile(model)
    >>> jumps = [row["relative_jump"] for row in pieces if (row["stage"], row["tensor"]) == (0, "unit.conv1.weight")]
    >>> jumps[0] == jumps[2] == 0.0, jumps[1] > 1.0  # pieces copied by the refinement; two independent draws
    (True, True)
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from lightning_cnet.layers import TimeDependent, TimeGate
from lightning_cnet.models import ContinuousNet
from lightning_cnet.ode_block import ODEBlock


def _relative_jumps(pieces: list[torch.Tensor]) -> list[float]:
    """``||b - a|| / ||a||`` for neighbours ``a, b``; 0 for two zero pieces, ``inf`` from a zero piece to another."""
    jumps = []
    for a, b in zip(pieces, pieces[1:]):
        difference, size = (b - a).norm().item(), a.norm().item()
        jumps.append(difference / size if size > 0 else (0.0 if difference == 0 else math.inf))
    return jumps


def _time_parameters(stage: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every time-dependent parameter of a stage (not the running statistics) as its pieces, by name."""
    named = {}
    for name, layer in stage.named_modules():
        if isinstance(layer, TimeDependent) and not isinstance(layer, TimeGate):
            for field, pieces in layer.pieces_by_name().items():
                if isinstance(pieces[0], nn.Parameter):
                    named[f"{name}.{field}"] = [piece.detach().double() for piece in pieces]
    return named


@torch.no_grad()
def depth_profile(model: ContinuousNet, *, label: str = "") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-piece norms and jumps of every time-dependent parameter, and the gates and smoothness per stage.

    Args:
        model: a ContinuousNet (or any module with ``stages`` of ODE blocks).
        label: a name for the model in the rows (e.g. the checkpoint), for side-by-side profiles.

    Returns:
        ``(pieces, stages)``: rows ``label, stage, tensor, piece, t_start, t_end, norm, relative_jump`` (to the next
        piece; ``nan`` for the last), ``[t_start, t_end]`` the part of depth the piece describes
        (:meth:`~lightning_cnet.bases.Basis.coefficient_spans`: its interval, its node, or all of ``[0, 1]`` for a
        Legendre mode) and rows ``label, stage, n_basis, basis, mean_relative_jump, gates`` (the gate
        values ``s_k`` joined by spaces, empty without skip-init).
    """
    piece_rows: list[dict[str, Any]] = []
    stage_rows: list[dict[str, Any]] = []
    for index, stage in enumerate(cast(list[ODEBlock], list(model.stages))):
        resolution = stage.resolution
        spans = [(float(start), float(end)) for start, end in stage.basis.coefficient_spans(resolution.n_basis)]
        named = _time_parameters(stage)
        for name, pieces in named.items():
            jumps = _relative_jumps(pieces) + [math.nan]
            for k, (piece, jump) in enumerate(zip(pieces, jumps)):
                start, end = spans[k]
                piece_rows.append({"label": label, "stage": index, "tensor": name, "piece": k, "t_start": start,
                                   "t_end": end, "norm": piece.norm().item(), "relative_jump": jump})
        stacked = [torch.cat([pieces[k].flatten() for pieces in named.values()]) for k in range(resolution.n_basis)]
        jumps = _relative_jumps(stacked)
        gates = [] if stage.gate is None else [g.item() for g in stage.gate.gate]
        stage_rows.append({"label": label, "stage": index, "n_basis": resolution.n_basis, "basis": resolution.basis,
                           "mean_relative_jump": sum(jumps) / len(jumps) if jumps else 0.0,
                           "gates": " ".join(f"{g:.6g}" for g in gates)})
    return piece_rows, stage_rows
