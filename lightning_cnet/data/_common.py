"""Pieces shared by the DataModules: the missing-dataset error, seeded splits, the loader base class."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk where a DataModule looked for it.

    The message names the directory that was searched and says how to fetch the data
    (for downloadable datasets: ``download: true`` in the YAML config, ``--data.download true``
    on the command line, or the archive's URL).

    Example:
        >>> from lightning_cnet.data import CIFAR10DataModule, DatasetNotFoundError
        >>> try:
        ...     CIFAR10DataModule(data_dir="/nonexistent").prepare_data()
        ... except DatasetNotFoundError as err:
        ...     print("not found" in str(err))
        True
    """


def check_positive(**values: int | float) -> None:
    """Raise ``ValueError`` for the first keyword whose value is not strictly positive."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"`{name}` must be positive, got {value!r}")


def seeded_split(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into a training part and ``n_val`` held-out indices.

    The split is a random permutation drawn from a ``torch.Generator`` seeded with ``seed``;
    both parts are returned in increasing order.
    """
    if not 0 <= n_val < n:
        raise ValueError(f"the validation split must hold between 0 and {n - 1} of the {n} samples, got {n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


class TransformedSubset(Dataset):
    """The samples ``indices`` of ``dataset``, with ``transform`` applied to each image.

    Lets the training and validation parts of one loaded dataset use different transforms
    without loading it twice. ``dataset`` must return ``(image, target)`` pairs.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target


class SplitDataModule(pl.LightningDataModule):
    """Dataloaders over the ``train_dataset``, ``val_dataset`` and ``test_dataset`` that ``setup`` builds.

    Subclasses save ``batch_size`` and ``num_workers`` as hyperparameters. Loaders use
    persistent workers when ``num_workers > 0`` and pinned memory when CUDA is available.
    """

    def __init__(self) -> None:
        super().__init__()
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _checked(self, dataset: Dataset | None) -> Dataset:
        """``dataset``, or a ``RuntimeError`` if ``setup`` has not built it."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run for this stage before its dataloader")
        return dataset

    def _loader(self, dataset: Dataset | None, **options: Any) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self._checked(dataset),
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            **options,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in a fixed order and without augmentation."""
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in a fixed order."""
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        """The test images and labels, in the order of ``test_dataloader``."""
        return self._loader(self.test_dataset)
