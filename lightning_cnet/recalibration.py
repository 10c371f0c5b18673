"""Re-estimate the BatchNorm running statistics of a model at its current manifestation.

Running statistics belong to the manifestation a model was trained at: integrated with another step count or
scheme, its ODE stages see other intermediate states, and stale statistics explain most of what looks like a
collapse of accuracy. :func:`recalibrate_bn` re-estimates them from unlabeled data, like
``torch.optim.swa_utils.update_bn`` does for ordinary BatchNorm, but correctly for statistics stored per piece:
each piece's statistics are the average, over batches and over the Runge-Kutta stages that read that piece, of
the batch statistics that reached it, weighted by the node weights (all weights are 1 for a piecewise-constant
basis). Ordinary BatchNorms (stem, stitches, head) get the average over batches. Pieces no stage reads at this
manifestation keep their statistics.

Example:
    >>> import torch
    >>> from lightning_cnet import get_model
    >>> model = get_model("cnet_digits", scheme="rk4", n_steps=4).eval()
    >>> model.set_manifestation(n_steps=2)
    >>> images = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    >>> recalibrate_bn(model, images)
    >>> model.training
    False
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_cnet._transaction import restored_on_error
from lightning_cnet.batches import model_input, to_device
from lightning_cnet.layers import TimeBatchNorm2d
from lightning_cnet.ode_block import ODEBlock


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    inputs: Callable[[Any], Any] | None = None,
) -> None:
    """Re-estimate every BatchNorm running statistic of ``model`` from ``batches`` at its current manifestation.

    Plain PyTorch: works on a :class:`~lightning_cnet.models.ContinuousNet` or any module holding ODE stages.
    The train/eval mode and the momentum of every module are restored afterwards; if anything fails (an empty
    iterable, a bad batch), the model is left exactly as it was.

    Args:
        model: the model; its manifestation (scheme, step counts) is the one the statistics are estimated for.
        batches: batches as a DataLoader yields them; ``model(x)`` runs on the model input ``x`` of each, by default
            the batch itself if it is a tensor, the first item of a tuple or list, or the ``"image"`` entry of a
            dict or dataclass (see :func:`~lightning_cnet.batches.model_input`).
        num_batches: use at most this many batches (``None``: all).
        device: move each input there (default: the device of the model's first parameter).
        inputs: ``batch -> model input``, instead of the default rules.

    Raises:
        ValueError: no batch was seen, a batch in which the default rules find no input, or ``num_batches < 1``; an
            ODE stage whose statistics cannot be estimated: its basis is not a partition of unity (its node weights
            cannot share out a batch's statistics), or it is integrated with adaptive steps (which run in evaluation
            only); nothing is changed.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r} must be None or an integer >= 1")
    _check_stages(model)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    time_norms = [m for m in model.modules() if isinstance(m, TimeBatchNorm2d)]
    inside = {id(piece) for norm in time_norms for piece in norm.pieces}
    plain_norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in inside
                   and m.track_running_stats]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in plain_norms]
    with restored_on_error(model), ExitStack() as stack:
        for time_norm in time_norms:
            stack.enter_context(time_norm.estimating_statistics())
        for plain in plain_norms:
            plain.reset_running_stats()
            plain.momentum = None  # a cumulative average over the batches
        model.train()
        seen = 0
        try:
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                model(to_device(inputs(batch) if inputs is not None else model_input(batch), device))
                seen += 1
            if seen == 0:
                raise ValueError("recalibrate_bn got no batches to estimate the statistics from")
        finally:
            for module, training in modes:
                module.training = training
            for plain, momentum in momenta:
                plain.momentum = momentum


def _check_stages(model: nn.Module) -> None:
    """Refuse, before anything changes, the ODE stages whose statistics cannot be re-estimated."""
    for name, stage in model.named_modules():
        if not isinstance(stage, ODEBlock):
            continue
        for layer in stage.time_layers():
            layer.check_basis(stage.basis)
        if not stage.integrator.trains:
            raise ValueError(
                f"recalibrate_bn runs the model in training mode, where stage {name or '(root)'} refuses "
                f"{stage.integrator!r}: estimate the statistics at a fixed-step manifestation (e.g. "
                "set_manifestation(scheme='rk4', n_steps=8)) and evaluate with adaptive steps afterwards"
            )
