"""Top-1 accuracy on the validation data, measured from inside a training hook without side effects.

The module is put in eval mode (BatchNorm uses, and does not update, its running statistics), the
batches are converted and the forward runs as in Lightning's own validation loop (the precision plugin's
``convert_input`` and ``val_step_context``, so ``64-true`` and ``bf16-true`` get batches of their dtype), under
``no_grad``, the random number generators are
restored afterwards (creating a dataloader iterator draws from the global generator), and the
previous train/eval mode of every submodule is restored. Under DDP every rank evaluates its shard of
the validation set and the counts are summed, so all ranks get the same number.

Example:
    >>> acc = validation_accuracy(trainer, pl_module, max_batches=10)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _first(loaders: Any) -> Any | None:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _val_loader(trainer: Any) -> Any | None:
    loaders = trainer.val_dataloaders
    if loaders is None:
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loaders = trainer.val_dataloaders
    return _first(loaders)


def training_images(trainer: Any, count: int) -> list[torch.Tensor]:
    """The inputs of the first ``count`` batches of the training set, in dataset order, ready for the module.

    They are read from the training dataloader's dataset through a loader of their own (same batch size, no
    shuffling), so the training loader's sampler and iterator are not touched and every DDP rank gets the same
    images; they are moved to the device and converted by the precision plugin as training batches are.
    """
    loader = _first(trainer.train_dataloader)
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = _first(trainer.train_dataloader)
    if loader is None:
        raise RuntimeError("there is no training dataloader to take batches from")
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        source: Any = loader
    else:
        source = torch.utils.data.DataLoader(dataset, batch_size=loader.batch_size or 1, shuffle=False,
                                             collate_fn=loader.collate_fn)
    images = []
    with torch.random.fork_rng(devices=[]):
        for batch in source:
            if len(images) >= count:
                break
            batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
            images.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return images


@contextmanager
def _evaluation_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    module.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def validation_accuracy(trainer: Any, pl_module: nn.Module, max_batches: int | None = None) -> float:
    """Top-1 accuracy of ``pl_module`` on the first validation dataloader.

    Args:
        trainer: the running Trainer (either Lightning namespace).
        pl_module: the LightningModule; ``pl_module(images)`` must return logits and batches must be
            ``(images, targets)``.
        max_batches: evaluate at most this many batches per rank (``None``: all).

    Returns:
        The accuracy in ``[0, 1]``, or ``nan`` if there is no validation data.
    """
    loader = _val_loader(trainer)
    if loader is None:
        return math.nan
    strategy = trainer.strategy
    correct = torch.zeros((), dtype=torch.float64, device=strategy.root_device)
    total = torch.zeros((), dtype=torch.float64, device=strategy.root_device)
    with _evaluation_mode(pl_module):
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images, targets = trainer.precision_plugin.convert_input(strategy.batch_to_device(batch))[:2]
            with trainer.precision_plugin.val_step_context():
                logits = pl_module(images)
            correct += (logits.argmax(dim=-1) == targets).sum()
            total += targets.numel()
    correct = strategy.reduce(correct, reduce_op="sum")
    total = strategy.reduce(total, reduce_op="sum")
    return math.nan if total.item() == 0 else (correct / total).item()
