"""MNIST, Fashion-MNIST, KMNIST and any other dataset stored as the four IDX files of the MNIST family.

The IDX format (LeCun's MNIST page) is a big-endian header, the magic number ``0x00000803`` for an image file
(unsigned bytes, 3 dimensions) or ``0x00000801`` for a label file (1 dimension), one 32-bit size per dimension,
then the bytes. The four files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``).

The DataModule logic is in a namespace-free mixin; ``lightning_cnet.data`` and ``lightning_cnet.lightning``
make it concrete for ``pytorch_lightning`` and ``lightning.pytorch``.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler, TensorDataset
from torchvision import datasets, transforms

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.data._common import (
    DatasetNotFoundError,
    SplitDataMixin,
    TransformedSubset,
    seeded_split,
)
from lightning_cnet.data.sampling import EpochKeySampler, EpochSampler

__all__ = ["IDX_DATASETS", "IDXDataMixin", "IDXDataset", "read_idx"]

#: Magic number of an IDX file of unsigned bytes with ``d`` dimensions: ``0x0800 + d``.
_UBYTE = 0x08
#: The four files of a dataset, by split and kind, without the optional ``.gz``.
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IDXDataset:
    """What the DataModule knows of one dataset of the MNIST family.

    Args:
        title: the name in messages.
        torchvision: torchvision's dataset class (its folder ``<data_dir>/<class name>/raw`` is searched, and it
            downloads there), or ``None`` for no download.
        system_dirs: folders where a system package installs the files.
        package: the Debian package holding the files, or ``None``.
        horizontal_flip: whether the training augmentation flips images (clothes can be mirrored, digits and
            characters cannot).
    """

    title: str
    torchvision: type | None
    system_dirs: tuple[str, ...] = ()
    package: str | None = None
    horizontal_flip: bool = False


#: The datasets ``IDXDataModule(dataset=...)`` knows; ``"idx"`` is any folder holding the four files.
IDX_DATASETS = {
    "mnist": IDXDataset("MNIST", datasets.MNIST),
    "fashion-mnist": IDXDataset("Fashion-MNIST", datasets.FashionMNIST, ("/usr/share/datasets/fashion-mnist",),
                                "dataset-fashion-mnist", horizontal_flip=True),
    "kmnist": IDXDataset("KMNIST", datasets.KMNIST),
    "idx": IDXDataset("IDX dataset", None),
}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file of unsigned bytes (gzipped if its name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        A ``uint8`` array of the shape the header gives.

    Raises:
        ValueError: the file is not an IDX file of unsigned bytes, or holds fewer or more bytes than its header says.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
        >>> _ = open(path, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
        >>> read_idx(path).tolist()
        [7, 0, 9]
    """
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes: its magic number is "
                         f"{data[:4].hex() or 'empty'}, expected 00000801 to 00000804")
    dims = data[3]
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{path} ends inside its IDX header ({len(data)} bytes, the header has {header})")
    shape = struct.unpack(f">{dims}I", data[4:header])
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(f"{path} holds {len(data) - header} bytes after its header, which announces shape {shape} "
                         f"({size} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@lightning_class("IDXDataModule", base="LightningDataModule")
class IDXDataMixin(SplitDataMixin):
    """Fashion-MNIST, MNIST, KMNIST or any dataset stored as the four IDX files, held in memory.

    The files are looked for, gzipped or plain, in ``data_dir``, in torchvision's ``<data_dir>/<Name>/raw`` (e.g.
    ``data/FashionMNIST/raw``, where ``download=True`` puts them) and in the folder a system package installs them
    in (Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).
    A missing file raises :class:`DatasetNotFoundError` in one line that names it, the folders searched and how to
    get it.

    ``val_size`` images of the training files, drawn with a permutation seeded by ``seed``, are held out for
    validation; the test files are the test split. Pixels are scaled to ``[0, 1]`` and standardised with the mean and
    standard deviation of the training part (without the held-out images), available after ``setup`` as ``mean``
    and ``std``. With ``augment``, training images get a random crop after zero padding of ``crop_padding`` pixels
    and, for Fashion-MNIST only (``horizontal_flip``), a random horizontal flip; validation and test images never.

    Everything random derives from ``seed``: the split, the training order of epoch ``e`` (from ``(seed, e)``) and
    the augmentation of training image ``i`` in epoch ``e`` (torch's generator is seeded from ``(seed, e, i)``). The
    batches are therefore the same with any number of workers and after resuming from an end-of-epoch or a
    mid-epoch checkpoint. Under DDP, Lightning permutes each epoch's order once more with the Trainer's global seed
    and the epoch, and gives each rank a disjoint shard.

    Args:
        dataset: ``"fashion-mnist"``, ``"mnist"``, ``"kmnist"``, or ``"idx"`` for any folder (``data_dir``) holding
            the four files.
        data_dir: the folder searched first (and where ``download`` puts the files).
        download: download the files with torchvision in ``prepare_data`` if they are missing (not for ``"idx"``).
        batch_size: samples per batch for every split.
        num_workers: ``DataLoader`` worker processes (0, loading in the main process, is the fastest for data held
            in memory without augmentation).
        val_size: training images held out for validation (0 for none).
        seed: non-negative seed of the split, the training order and the augmentation.
        augment: augment the training images (random crop, and horizontal flip for Fashion-MNIST).
        crop_padding: zero padding, in pixels, before the random crop.
        num_classes: number of classes of an ``"idx"`` dataset (the named datasets have 10).

    Raises:
        ValueError: an unknown ``dataset``, or a bad size, seed or padding.

    Example:
        >>> from lightning_cnet.data import IDXDataModule
        >>> dm = IDXDataModule(dataset="fashion-mnist", batch_size=128)
        >>> dm.num_classes, dm.in_chans, dm.image_size
        (10, 1, 28)
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> len(dm.train_dataset), len(dm.val_dataset)  # doctest: +SKIP
        (55000, 5000)
    """

    def __init__(
        self,
        *,
        dataset: str = "fashion-mnist",
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = False,
        crop_padding: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if dataset not in IDX_DATASETS:
            raise ValueError(f"dataset={dataset!r} is not known: expected one of {', '.join(map(repr, IDX_DATASETS))}")
        check_integer("batch_size", batch_size)
        check_integer("num_classes", num_classes)
        check_integer("seed", seed, minimum=0)
        for name, value in (("num_workers", num_workers), ("val_size", val_size), ("crop_padding", crop_padding)):
            check_integer(name, value, minimum=0)
        if dataset != "idx" and num_classes != 10:
            raise ValueError(f"num_classes={num_classes} is fixed to 10 for dataset={dataset!r}; it is for 'idx' only")
        if download and IDX_DATASETS[dataset].torchvision is None:
            named = ", ".join(k for k in IDX_DATASETS if k != "idx")
            raise ValueError(f"download=True needs a named dataset ({named}), got dataset={dataset!r}")
        self.save_hyperparameters()
        self.info = IDX_DATASETS[dataset]
        self.mean: float | None = None
        self.std: float | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return int(self.hparams.num_classes)

    @property
    def in_chans(self) -> int:
        """Number of image channels (1)."""
        return 1

    @property
    def image_size(self) -> int:
        """Side of the square images: 28 for the named datasets, read from the training images' header for ``"idx"``.

        Raises:
            DatasetNotFoundError: an ``"idx"`` dataset whose training images are missing.
            ValueError: an ``"idx"`` dataset whose images are not square.
        """
        if self.hparams.dataset != "idx":
            return 28
        path = self._locate()[("train", "images")]
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as handle:
            header = handle.read(16)
        height, width = struct.unpack(">2I", header[8:16])
        if height != width:
            raise ValueError(f"{path} holds {height}x{width} images; IDXDataModule needs square ones")
        return int(height)

    # ------------------------------------------------------------------ files
    def search_dirs(self) -> list[Path]:
        """The folders searched for the files, in order."""
        root = Path(self.hparams.data_dir).expanduser().resolve()
        folders = [root]
        if self.info.torchvision is not None:
            folders.append(root / self.info.torchvision.__name__ / "raw")
        folders += [Path(folder) for folder in self.info.system_dirs]
        return folders

    def _locate(self) -> dict[tuple[str, str], Path]:
        """The path of each of the four files (the first folder holding it, plain before gzipped).

        Raises:
            DatasetNotFoundError: a file is in none of the folders.
        """
        found, missing = {}, []
        for key, name in FILES.items():
            candidates = [folder / file for folder in self.search_dirs() for file in (name, name + ".gz")]
            path = next((candidate for candidate in candidates if candidate.is_file()), None)
            if path is None:
                missing.append(name + "[.gz]")
            else:
                found[key] = path
        if missing:
            how = []
            if self.info.package:
                how.append(f"install it with `apt-get install {self.info.package}`")
            if self.info.torchvision is not None:
                how.append("set `download: true` in the data section of the config (`--data.download true`, "
                           "`download=True` in Python) where the network allows")
            else:
                how.append("point `data_dir` (`--data.data_dir`) at the folder holding the four files")
            raise DatasetNotFoundError(
                f"{self.info.title} not found: {', '.join(missing)} missing from "
                f"{', '.join(repr(str(folder)) for folder in self.search_dirs())}; {' or '.join(how)}."
            )
        return found

    def prepare_data(self) -> None:
        """Download the files if ``download`` is set and they are missing; then check that all four are there.

        Raises:
            DatasetNotFoundError: a file is missing.
        """
        if self.hparams.download:
            try:
                self._locate()
            except DatasetNotFoundError:
                root = Path(self.hparams.data_dir).expanduser().resolve()
                fetch = self.info.torchvision
                assert fetch is not None  # __init__ refuses download=True for a dataset without one
                fetch(str(root), train=True, download=True)
        self._locate()

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        """Images ``[N, 1, H, W]`` in ``[0, 1]`` and labels of ``split`` (``"train"`` or ``"test"``).

        Raises:
            ValueError: the images and labels disagree in number, or a label is outside ``[0, num_classes)``.
        """
        paths = self._locate()
        images = read_idx(paths[split, "images"])
        labels = read_idx(paths[split, "labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{paths[split, 'images']} holds images of shape {images.shape} and "
                             f"{paths[split, 'labels']} labels of shape {labels.shape}: expected [N, H, W] and [N]")
        if labels.size and labels.max() >= self.num_classes:
            raise ValueError(f"{paths[split, 'labels']} holds label {labels.max()}, beyond num_classes="
                             f"{self.num_classes}")
        return (torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0),
                torch.from_numpy(labels.astype(np.int64)))

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs: train and val for fit/validate, test for test/predict.

        The mean and standard deviation come from the training part, so they are computed whatever the stage.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` for all.

        Raises:
            DatasetNotFoundError: a file is missing.
        """
        if self.mean is None or (stage in (None, "fit", "validate") and self.train_dataset is None):
            images, labels = self._load("train")
            train, val = seeded_split(len(labels), self.hparams.val_size, self.hparams.seed)
            train_images = images[train]
            self.mean, self.std = train_images.mean().item(), train_images.std().item()
            if stage in (None, "fit", "validate"):
                self._build_train_val(train_images, labels[train], images[val], labels[val])
        if stage in (None, "test", "predict") and self.test_dataset is None:
            images, labels = self._load("test")
            self.test_dataset = TensorDataset(self._standardise(images), labels)

    def _standardise(self, images: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{type(self).__name__}: the training mean and std are computed in setup(), first")
        return (images - self.mean) / self.std

    def _build_train_val(self, images: Tensor, labels: Tensor, val_images: Tensor, val_labels: Tensor) -> None:
        self.val_dataset = TensorDataset(self._standardise(val_images), val_labels)
        if not self.hparams.augment:
            self.train_dataset = TensorDataset(self._standardise(images), labels)
            return
        size = images.shape[-1]
        steps = [transforms.RandomCrop(size, padding=self.hparams.crop_padding)]
        if self.info.horizontal_flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps.append(transforms.Normalize((self.mean,), (self.std,)))
        self.train_dataset = TransformedSubset(TensorDataset(images, labels), range(len(labels)),
                                               transforms.Compose(steps), seed=self.hparams.seed)

    def train_sampler(self, n: int) -> Sampler[Any]:
        """The training order; indices are tagged with their epoch when augmentation draws per epoch."""
        if self.hparams.augment:
            return EpochKeySampler(n, self.hparams.seed)
        return EpochSampler(n, self.hparams.seed)
