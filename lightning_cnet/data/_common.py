"""Pieces shared by the DataModules: the missing-dataset error, seeded splits, the loader logic.

Nothing here imports Lightning: :class:`SplitDataMixin` is mixed with a ``LightningDataModule`` of either
namespace by the concrete classes (``lightning_cnet.data`` and ``lightning_cnet.lightning``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_cnet.data.sampling import EpochKeySampler, ResumableDataLoader, Stream, derived_seed, torch_seeded

__all__ = ["DatasetNotFoundError", "SplitDataMixin", "TransformedSubset"]


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


def seeded_split(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into a training part and ``n_val`` held-out indices.

    The split is a random permutation drawn from a ``torch.Generator`` seeded with ``seed``;
    both parts are returned in increasing order.
    """
    if not 0 <= n_val < n:
        raise ValueError(f"the validation split must hold between 0 and {n - 1} of the {n} samples, got {n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


class TransformedSubset(Dataset[Any]):
    """The samples ``indices`` of ``dataset``, with ``transform`` applied to each image.

    Lets the training and validation parts of one loaded dataset use different transforms
    without loading it twice. ``dataset`` must return ``(image, target)`` pairs.

    With a ``seed``, items are addressed by ``(epoch, index)`` keys (as :class:`EpochKeySampler` yields them;
    a plain index means epoch 0) and the torch random numbers that ``transform`` draws for sample ``index``
    of ``epoch`` come from a generator seeded with ``(seed, epoch, index)``: random augmentation is then the
    same with any number of workers, on any rank, and after any resume. Python's ``random`` and NumPy, if a
    transform uses them, are not covered. The global torch generator is left as it was.

    Example:
        >>> from torchvision import transforms
        >>> images = [(torch.zeros(1, 4, 4), 0), (torch.ones(1, 4, 4), 1)]
        >>> crop = transforms.RandomCrop(4, padding=1)
        >>> train = TransformedSubset(images, [1], crop, seed=0)
        >>> torch.equal(train[(3, 0)][0], train[(3, 0)][0])
        True
    """

    def __init__(
        self, dataset: Dataset[Any], indices: Sequence[int], transform: Callable[[Any], Any], *, seed: int | None = None
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, target = self.dataset[self.indices[index]]
        if self.seed is None:
            return self.transform(image), target
        with torch_seeded(derived_seed(self.seed, Stream.AUGMENTATION, epoch, index)):
            return self.transform(image), target


class SplitDataMixin:
    """Dataloaders over the ``train_dataset``, ``val_dataset`` and ``test_dataset`` that ``setup`` builds.

    Mixed with a ``LightningDataModule`` (which provides ``hparams``); subclasses save ``batch_size``,
    ``num_workers`` and ``seed`` as hyperparameters. The training loader is a :class:`ResumableDataLoader`
    over the sampler that :meth:`train_sampler` returns (its order depends only on ``seed`` and the epoch),
    with workers started anew and seeded every epoch. The other loaders keep the order of their dataset and
    use persistent workers when ``num_workers > 0``. All use pinned memory when CUDA is available.
    """

    if TYPE_CHECKING:  # what the mixin and its subclasses use of the LightningDataModule they are mixed with
        hparams: Any
        trainer: Any

        def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None: ...

    def __init__(self) -> None:
        super().__init__()
        self.train_dataset: Dataset[Any] | None = None
        self.val_dataset: Dataset[Any] | None = None
        self.test_dataset: Dataset[Any] | None = None

    def _checked(self, dataset: Dataset[Any] | None) -> Dataset[Any]:
        """``dataset``, or a ``RuntimeError`` if ``setup`` has not built it."""
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run for this stage before its dataloader")
        return dataset

    def _loader(self, dataset: Dataset[Any] | None) -> DataLoader[Any]:
        workers = self.hparams.num_workers
        return DataLoader(
            self._checked(dataset),
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_sampler(self, n: int) -> Sampler[Any]:
        """The training order of ``n`` samples: an :class:`EpochKeySampler` seeded with ``seed``."""
        return EpochKeySampler(n, self.hparams.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training batches; the order of epoch ``e`` depends only on ``(seed, e)``."""
        dataset = self._checked(self.train_dataset)
        return ResumableDataLoader(
            dataset,
            seed=self.hparams.seed,
            sampler=self.train_sampler(len(cast(Sized, dataset))),
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader[Any]:
        """Validation batches, in a fixed order and without augmentation."""
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader[Any]:
        """Test batches, in a fixed order."""
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader[Any]:
        """The test images and labels, in the order of ``test_dataloader``."""
        return self._loader(self.test_dataset)
