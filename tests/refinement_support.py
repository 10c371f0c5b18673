"""Shared pieces of the refinement tests: tiny deterministic data, a small task and independent checkers."""

from __future__ import annotations

import re
from typing import Any

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_cnet.module import ContinuousNetClassifier

TRAIN, VAL, BATCH = 192, 64, 32


def digits_tensors() -> tuple[TensorDataset, TensorDataset]:
    """The first 256 scikit-learn digits (8x8, standardised), split 192 train / 64 val."""
    digits = load_digits()
    images = torch.from_numpy(digits.images[: TRAIN + VAL]).float().unsqueeze(1) / 16.0
    images = (images - images.mean()) / images.std()
    labels = torch.from_numpy(digits.target[: TRAIN + VAL]).long()
    return TensorDataset(images[:TRAIN], labels[:TRAIN]), TensorDataset(images[TRAIN:], labels[TRAIN:])


class EpochSampler(Sampler[int]):
    """A permutation that depends only on the epoch (Lightning calls ``set_epoch``), so resuming replays it."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(1000 + self.epoch)).tolist())


class ResumableLoader(DataLoader):
    """A DataLoader whose position inside the epoch is saved in checkpoints (mid-epoch resume replays it).

    The saved position carries its epoch: after a checkpoint on an epoch's last batch, the next epoch (another epoch)
    starts from its first batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self):
        epoch = self.sampler.epoch
        resume, self._resume = self._resume, None
        skip = resume["consumed"] if resume is not None and resume["epoch"] == epoch else 0
        self._consumed = 0
        for index, batch in enumerate(super().__iter__()):
            self._consumed = index + 1
            if index >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)


class TinyDigits(pl.LightningDataModule):
    """Deterministic digits batches: epoch-seeded order, resumable mid-epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.train_set, self.val_set = digits_tensors()
        self.num_classes, self.in_chans = 10, 1

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.train_set, batch_size=BATCH, sampler=EpochSampler(TRAIN))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=BATCH)


def make_task(cls: type = ContinuousNetClassifier, **overrides: Any) -> Any:
    """A small classifier: cnet_digits, one Euler step, SGD with momentum, constant LR."""
    options = dict(model="cnet_digits", scheme="euler", n_steps=1, optimizer="sgd", lr=0.05, momentum=0.9,
                   weight_decay=5e-4, lr_schedule="constant")
    options.update(overrides)
    return cls(**options)


def trainer_options(**overrides: Any) -> dict[str, Any]:
    options = dict(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   deterministic=True)
    options.update(overrides)
    return options


def flat_optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class OptimizerConsistency:
    """Hooks (mix with a Callback class) asserting that the optimizers train exactly the model's tensors.

    At every epoch start and after every backward pass: each optimizer holds ``list(module.parameters())``
    by identity and in order (what ``configure_optimizers`` builds from ``self.parameters()``), every
    parameter has a gradient, every state tensor has its parameter's shape, and the optimizer's state
    dict loads into the optimizer a fresh ``configure_optimizers()`` builds (so checkpoints reload). At epoch end every
    parameter has changed since the epoch started.
    """

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0
        self._start: dict[str, torch.Tensor] = {}

    def _check_optimizer(self, trainer: Any, pl_module: nn.Module) -> None:
        params = list(pl_module.parameters())
        for optimizer in trainer.optimizers:
            held = flat_optimizer_params(optimizer)
            assert len(held) == len(params) and all(a is b for a, b in zip(held, params)), "optimizer != model"
            for param, state in optimizer.state.items():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        assert value.shape == param.shape
            fresh = pl_module.configure_optimizers()
            fresh = fresh["optimizer"] if isinstance(fresh, dict) else fresh
            fresh.load_state_dict(optimizer.state_dict())
        self.checks += 1

    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._check_optimizer(trainer, pl_module)
        self._start = {name: p.detach().clone() for name, p in pl_module.named_parameters()}

    def on_after_backward(self, trainer: Any, pl_module: nn.Module) -> None:
        missing = [name for name, p in pl_module.named_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing[:5]}"
        self._check_optimizer(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if not self._start:  # resumed mid-epoch: on_train_epoch_start did not run
            return
        unchanged = [name for name, p in pl_module.named_parameters() if torch.equal(p.detach(), self._start[name])]
        assert not unchanged, f"parameters that did not change this epoch: {unchanged[:5]}"


class ConsistencyCallback(OptimizerConsistency, pl.Callback):
    """:class:`OptimizerConsistency` for ``pytorch_lightning``."""


_PIECE = re.compile(r"^(?P<layer>.*)\.pieces\.(?P<k>\d+)\.(?P<field>\w+)$|^(?P<name>.*)\.(?P<index>\d+)$")


def stack_pieces(named: dict[str, Any]) -> dict[str, Any]:
    """Group the pieces of time-dependent tensors (``<name>.<k>``, BatchNorm ``<layer>.pieces.<k>.<field>``) by
    tensor name and stack them on dim 0; dicts of tensors (optimizer states) are stacked entry by entry, a piece
    without the entry (never read, so never stepped) counting as zeros."""
    groups: dict[str, dict[int, Any]] = {}
    for key, value in named.items():
        match = _PIECE.match(key)
        if match is None:
            groups.setdefault(key, {})[-1] = value
        elif match["layer"] is not None:
            groups.setdefault(f"{match['layer']}.{match['field']}", {})[int(match["k"])] = value
        else:
            groups.setdefault(match["name"], {})[int(match["index"])] = value
    stacked = {}
    for name, pieces in groups.items():
        if -1 in pieces:
            stacked[name] = pieces[-1]
            continue
        values = [pieces[k] for k in sorted(pieces)]
        if isinstance(values[0], dict):
            keys = {key: value for v in values for key, value in v.items()}
            stacked[name] = {key: torch.stack([v.get(key, torch.zeros_like(like)) for v in values])
                             for key, like in keys.items()}
        else:
            stacked[name] = torch.stack(values)
    return stacked


def n_steps(task: Any) -> list[int]:
    return [r.n_steps for r in task.model.resolution]
