"""Depth refinement of a ``torch.compile``-d LightningModule: the recompiled graph trains the refined tensors."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from refinement_support import ConsistencyCallback, TinyDigits, make_task, n_steps, trainer_options

from lightning_cnet.callbacks import DepthRefinementCallback


@pytest.mark.slow
def test_compiled_module_trains_through_refinement():
    torch._dynamo.reset()
    task = make_task(scheme="midpoint")
    compiled = torch.compile(task, backend="aot_eager")
    consistency = ConsistencyCallback()
    callback = DepthRefinementCallback([1], evaluate=False)
    trainer = pl.Trainer(**trainer_options(callbacks=[callback, consistency], max_epochs=2,
                                           limit_train_batches=2, limit_val_batches=0))
    trainer.fit(compiled, datamodule=TinyDigits())
    assert n_steps(task) == [2, 2, 2]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "compiled before and after refinement"
    assert consistency.checks >= 2 * 3
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())
    eager = make_task(scheme="midpoint")
    eager.model.refine()
    eager.load_state_dict(task.state_dict())
    images = torch.randn(4, 1, 8, 8)
    task.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(task(images), eager(images))
