"""An ODE stage as the vector field a general-purpose ODE library integrates: ``f(tau, x)`` on the physical depth.

Example:
    >>> from lightning_cnet.ode_block import ODEBlock
    >>> stage = ODEBlock(4, n_basis=2, n_steps=2, T=2.0)
    >>> field = StageField(stage)
    >>> field(torch.tensor(1.5), torch.randn(1, 4, 3, 3)).shape
    torch.Size([1, 4, 3, 3])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_cnet.ode_block import ODEBlock


class StageField(nn.Module):
    """``dx/dtau = s R(x; theta)`` of an ODE stage on the physical depth ``tau in [0, T]``.

    The piece is read from the time the field is called at, as a torchdiffeq or torchdyn user writes it (the
    cheapest lookup: an integer from the float time). Integrated from 0 to ``T`` with steps ``T / N``, it takes the
    stage's own steps ``x + (T / N) s R``, with nothing scaling ``R``. ``args`` is accepted for torchdyn.

    Args:
        stage: an ODE block with a piecewise-constant basis.
    """

    def __init__(self, stage: ODEBlock) -> None:
        super().__init__()
        if stage.basis.name != "piecewise_constant":
            raise ValueError("the peers' fields read piecewise-constant weights")
        self.stage = stage
        self.pieces_per_depth = stage.n_basis / stage.T

    def forward(self, t: torch.Tensor, x: torch.Tensor, args: Any = None) -> torch.Tensor:
        stage = self.stage
        index = min(int(float(t.detach()) * self.pieces_per_depth), stage.n_basis - 1)
        nodes = ((index, 1.0),)
        return stage.unit(x, nodes, None if stage.gate is None else stage.gate(nodes))
