"""CIFAR-10 and CIFAR-100 through torchvision, with a seeded held-out validation split.

The DataModule logic is in namespace-free mixins; ``lightning_cnet.data`` and ``lightning_cnet.lightning``
make them concrete for ``pytorch_lightning`` and ``lightning.pytorch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_md5

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.data._common import (
    DatasetNotFoundError,
    SplitDataMixin,
    TransformedSubset,
    seeded_split,
)

__all__ = ["CIFAR10DataMixin", "CIFAR100DataMixin"]


def _presence_only(files: list[list[str]]) -> list[list[str | None]]:
    """torchvision's ``[name, md5]`` file list with the checksums removed."""
    return [[name, None] for name, _ in files]


class _CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader, checking that the files exist instead of their md5 sums.

    torchvision skips the checksum of a file whose md5 is ``None``; the DataModule runs the
    full check itself when asked to (``verify_md5=True``).
    """

    train_list = _presence_only(datasets.CIFAR10.train_list)
    test_list = _presence_only(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100Files(datasets.CIFAR100):
    """torchvision's CIFAR-100 reader, checking that the files exist instead of their md5 sums."""

    train_list = _presence_only(datasets.CIFAR100.train_list)
    test_list = _presence_only(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}


class _CIFARDataMixin(SplitDataMixin):
    """Shared implementation of the CIFAR DataModules; subclasses set the class attributes."""

    dataset_name: ClassVar[str]
    #: torchvision's reader with md5 checks (used for its file list and checksums).
    _reference: ClassVar[type[datasets.CIFAR10]]
    #: the same reader with presence checks only.
    _reader: ClassVar[type[datasets.CIFAR10]]
    _num_classes: ClassVar[int]
    #: per-channel mean and standard deviation of the training images, in ``[0, 1]`` units.
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(
        self,
        *,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 2,
        val_size: int = 5000,
        seed: int = 0,
        verify_md5: bool = False,
    ) -> None:
        super().__init__()
        check_integer("batch_size", batch_size)
        check_integer("seed", seed, minimum=0)
        check_integer("num_workers", num_workers, minimum=0)
        check_integer("val_size", val_size, minimum=0)
        self.save_hyperparameters()
        normalize = transforms.Normalize(self.mean, self.std)
        self.train_transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        self.eval_transform = transforms.Compose([transforms.ToTensor(), normalize])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._num_classes

    @property
    def in_chans(self) -> int:
        """Number of image channels (3)."""
        return 3

    @property
    def image_size(self) -> int:
        """Side of the square images (32)."""
        return 32

    @property
    def dataset_dir(self) -> Path:
        """The folder holding the extracted files, ``<data_dir>/<torchvision base folder>``."""
        return Path(self.hparams.data_dir).expanduser().resolve() / str(self._reference.base_folder)

    def _files(self) -> list[tuple[str, str]]:
        """``(file name, md5)`` of every file of the extracted dataset."""
        reference = self._reference
        listed = [(name, md5) for name, md5 in reference.train_list + reference.test_list]
        return [*listed, (reference.meta["filename"], reference.meta["md5"])]

    def _check_files(self) -> None:
        """Raise :class:`DatasetNotFoundError` if a file is missing, ``RuntimeError`` on a bad md5 sum."""
        folder = self.dataset_dir
        missing = [name for name, _ in self._files() if not (folder / name).is_file()]
        if missing:
            found = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
            raise DatasetNotFoundError(
                f"{self.dataset_name} not found: looked in '{folder}', which {found}. "
                f"To fetch it, set `download: true` in the data section of the YAML config "
                f"(`--data.download true` on the command line, `download=True` in Python), "
                f"or download {self._reference.url} and extract it into '{folder.parent}'."
            )
        if self.hparams.verify_md5:
            corrupt = [name for name, md5 in self._files() if not check_md5(str(folder / name), md5)]
            if corrupt:
                raise RuntimeError(
                    f"{self.dataset_name} in '{folder}' is corrupted: {', '.join(corrupt)} failed the md5 check. "
                    f"Delete the folder and fetch the dataset again."
                )

    def prepare_data(self) -> None:
        """Download the dataset if ``download`` is set; otherwise check that its files are present.

        Raises:
            DatasetNotFoundError: ``download`` is false and a file is missing.
        """
        if self.hparams.download:
            self._reader(str(self.dataset_dir.parent), train=True, download=True)
        self._check_files()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs: train and val for fit/validate, test for test/predict.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` for all.

        Raises:
            DatasetNotFoundError: a file of the dataset is missing.
        """
        self._check_files()
        root = str(self.dataset_dir.parent)
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            full = self._reader(root, train=True)
            train_indices, val_indices = seeded_split(len(full), self.hparams.val_size, self.hparams.seed)
            self.train_dataset = TransformedSubset(full, train_indices, self.train_transform, seed=self.hparams.seed)
            self.val_dataset = TransformedSubset(full, val_indices, self.eval_transform)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._reader(root, train=False, transform=self.eval_transform)

    def test_dataloader(self) -> DataLoader[Any]:
        """Batches of the official test set."""
        return self._loader(self.test_dataset)


@lightning_class("CIFAR10DataModule", base="LightningDataModule")
class CIFAR10DataMixin(_CIFARDataMixin):
    """CIFAR-10 (32x32 colour images, 10 classes) through torchvision.

    The official training set is split, by a permutation seeded with ``seed``, into
    ``50000 - val_size`` training images (random crop with 4-pixel zero padding and horizontal
    flip) and ``val_size`` validation images (no augmentation), so that no choice is made on
    the test set; the official test set is the test split. Images are normalised with the
    per-channel mean and standard deviation of the training set (class attributes ``mean``
    and ``std``). Files are checked for presence; ``verify_md5=True`` also checks their
    md5 sums. A missing dataset raises :class:`DatasetNotFoundError`, naming the folder.

    Everything random derives from ``seed``: the split, the training order of epoch ``e`` (from
    ``(seed, e)``) and the augmentation of training image ``i`` in epoch ``e`` (torch's generator
    is seeded from ``(seed, e, i)`` for its crop and flip). The batches are therefore the same
    with any number of workers and after resuming from an end-of-epoch or a mid-epoch checkpoint.
    Under DDP, Lightning permutes each epoch's order once more with the Trainer's global seed and
    the epoch, and gives each rank a disjoint shard.
    A ``train_transform`` of your own that draws from Python's ``random`` or NumPy is covered
    only through the worker seeds: reproducible with the same ``num_workers > 0`` (each epoch's
    workers are seeded from ``(seed, e)``), not with ``num_workers=0`` (the process's own state).

    Args:
        data_dir: directory containing (or to receive) ``cifar-10-batches-py``.
        download: download and extract the dataset in ``prepare_data`` if it is missing.
        batch_size: samples per batch for every split.
        num_workers: ``DataLoader`` worker processes.
        val_size: number of training images held out for validation (0 for none).
        seed: non-negative seed of the train/validation split, the training order and the
            augmentation.
        verify_md5: check the md5 sums of the files against the published ones.

    Example:
        >>> from lightning_cnet.data import CIFAR10DataModule
        >>> dm = CIFAR10DataModule(data_dir="data", download=True)
        >>> dm.num_classes, dm.in_chans, dm.image_size
        (10, 3, 32)
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> images, labels = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> tuple(images.shape)  # doctest: +SKIP
        (128, 3, 32, 32)
    """

    dataset_name = "CIFAR-10"
    _reference = datasets.CIFAR10
    _reader = _CIFAR10Files
    _num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


@lightning_class("CIFAR100DataModule", base="LightningDataModule")
class CIFAR100DataMixin(_CIFARDataMixin):
    """CIFAR-100 (32x32 colour images, 100 fine classes) through torchvision.

    Same splits, augmentation, seeding and checks as :class:`CIFAR10DataModule`; labels are
    the 100 fine classes, and normalisation uses CIFAR-100's own per-channel mean and standard
    deviation.

    Args:
        data_dir: directory containing (or to receive) ``cifar-100-python``.
        download: download and extract the dataset in ``prepare_data`` if it is missing.
        batch_size: samples per batch for every split.
        num_workers: ``DataLoader`` worker processes.
        val_size: number of training images held out for validation (0 for none).
        seed: non-negative seed of the train/validation split, the training order and the
            augmentation.
        verify_md5: check the md5 sums of the files against the published ones.

    Example:
        >>> from lightning_cnet.data import CIFAR100DataModule
        >>> dm = CIFAR100DataModule(data_dir="data", val_size=2000)
        >>> dm.num_classes, dm.in_chans, dm.image_size
        (100, 3, 32)
        >>> dm.prepare_data()  # doctest: +SKIP
    """

    dataset_name = "CIFAR-100"
    _reference = datasets.CIFAR100
    _reader = _CIFAR100Files
    _num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
