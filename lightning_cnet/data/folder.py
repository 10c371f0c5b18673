"""Any image classification dataset laid out as torchvision ``ImageFolder`` directories.

The DataModule logic is in a namespace-free mixin; ``lightning_cnet.data`` and ``lightning_cnet.lightning``
make it concrete for ``pytorch_lightning`` and ``lightning.pytorch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.data._common import (
    DatasetNotFoundError,
    SplitDataMixin,
    TransformedSubset,
    seeded_split,
)

__all__ = ["ImageFolderDataMixin"]

_LAYOUT = "root/train/<class>/<image>, optionally root/val/<class>/<image> and root/test/<class>/<image>"


class _FixedClassFolder(datasets.ImageFolder):
    """An ``ImageFolder`` that labels its class folders with a given ``class_to_idx``.

    Used for the validation and test folders, so that their labels agree with the training
    folder even when a class folder is missing there. A class folder unknown to the mapping
    is an error.
    """

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs: Any) -> None:
        self._given_class_to_idx = class_to_idx
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = {entry.name for entry in Path(directory).iterdir() if entry.is_dir()}
        unknown = sorted(present - set(self._given_class_to_idx))
        if unknown:
            raise ValueError(f"'{directory}' has class folders that the training folder lacks: {', '.join(unknown)}")
        classes = sorted(self._given_class_to_idx, key=self._given_class_to_idx.__getitem__)
        return classes, dict(self._given_class_to_idx)


@lightning_class("ImageFolderDataModule", base="LightningDataModule")
class ImageFolderDataMixin(SplitDataMixin):
    """Images in class folders, read with torchvision's ``ImageFolder``.

    Expects ``root/train/<class>/<image>``; ``root/val`` and ``root/test`` (same layout) are
    optional. Without a ``val`` folder, a fraction ``val_fraction`` of the training images,
    drawn with a permutation seeded by ``seed``, is held out for validation. The classes are
    the sub-folders of ``root/train``, read when the DataModule is built, so ``num_classes``
    is known before ``setup``; validation and test folders use the same labels.

    Images are converted to ``in_chans`` channels (1: greyscale, 3: RGB), resized so that the
    shorter side is ``image_size`` and centre-cropped to a square, and normalised to
    ``[-1, 1]`` (mean 0.5, standard deviation 0.5 per channel). Training images are also
    augmented with a random crop (zero padding of ``image_size // 8``) and horizontal flip.

    Everything random derives from ``seed``: the held-out split, the training order of epoch
    ``e`` (from ``(seed, e)``) and the augmentation of training image ``i`` in epoch ``e``
    (torch's generator is seeded from ``(seed, e, i)``). The batches are therefore the same
    with any number of workers and after resuming from an end-of-epoch or a mid-epoch
    checkpoint. Under DDP, Lightning permutes each epoch's order once more with the Trainer's
    global seed and the epoch, and gives each rank a disjoint shard.
    A ``train_transform`` of your own that draws from Python's ``random`` or NumPy is covered
    only through the worker seeds: reproducible with the same ``num_workers > 0`` (each epoch's
    workers are seeded from ``(seed, e)``), not with ``num_workers=0`` (the process's own state).

    Args:
        root: directory holding the ``train`` folder (and optional ``val`` and ``test``).
        image_size: side of the square images fed to the model.
        batch_size: samples per batch for every split.
        num_workers: ``DataLoader`` worker processes.
        val_fraction: fraction of the training images held out when there is no ``val``
            folder (0 for none).
        seed: non-negative seed of the train/validation split, the training order and the
            augmentation.
        in_chans: number of image channels, 1 or 3.

    Attributes:
        classes: the class names, sorted; label ``i`` is ``classes[i]``.
        class_to_idx: the label of each class name.

    Raises:
        DatasetNotFoundError: ``root/train`` does not exist or holds no class folder.

    Example:
        >>> from lightning_cnet.data import ImageFolderDataModule
        >>> dm = ImageFolderDataModule(root="path/to/dataset", image_size=64)  # doctest: +SKIP
        >>> dm.num_classes  # doctest: +SKIP
        5
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> images, labels = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> tuple(images.shape)  # doctest: +SKIP
        (64, 3, 64, 64)
    """

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        seed: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        check_integer("image_size", image_size)
        check_integer("batch_size", batch_size)
        check_integer("seed", seed, minimum=0)
        check_integer("num_workers", num_workers, minimum=0)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"`val_fraction` must lie in [0, 1), got {val_fraction}")
        if in_chans not in (1, 3):
            raise ValueError(f"`in_chans` must be 1 or 3, got {in_chans}")
        self.save_hyperparameters()
        self.root = Path(root).expanduser().resolve()
        train_dir = self._folder("train")
        try:
            self.classes, self.class_to_idx = datasets.folder.find_classes(str(train_dir))
        except FileNotFoundError:
            raise DatasetNotFoundError(f"no class folders in '{train_dir}': expected the layout {_LAYOUT}.") from None
        channels = [transforms.Grayscale(num_output_channels=1)] if in_chans == 1 else []
        resize = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        finish = [transforms.ToTensor(), transforms.Normalize([0.5] * in_chans, [0.5] * in_chans)]
        augment = [transforms.RandomCrop(image_size, padding=image_size // 8), transforms.RandomHorizontalFlip()]
        self.train_transform = transforms.Compose(resize + augment + channels + finish)
        self.eval_transform = transforms.Compose(resize + channels + finish)

    def _folder(self, split: str, *, required: bool = True) -> Path:
        """``root/<split>``; raise :class:`DatasetNotFoundError` if it is ``required`` but absent."""
        folder = self.root / split
        if required and not folder.is_dir():
            raise DatasetNotFoundError(
                f"image folder '{folder}' not found: expected the layout {_LAYOUT}. "
                f"Create it, or point `root` (`--data.root` on the command line) at the dataset."
            )
        return folder

    @property
    def num_classes(self) -> int:
        """Number of classes: the class folders in ``root/train``."""
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        """Number of image channels."""
        return int(self.hparams.in_chans)

    @property
    def image_size(self) -> int:
        """Side of the square images in every batch."""
        return int(self.hparams.image_size)

    def setup(self, stage: str | None = None) -> None:
        """Index the folders the stage needs: train and val for fit/validate, test for test/predict.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` for all.

        Raises:
            DatasetNotFoundError: ``root/test`` is needed but does not exist.
        """
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self._setup_train_val()
        wants_test = stage in ("test", "predict") or (stage is None and (self.root / "test").is_dir())
        if wants_test and self.test_dataset is None:
            test_dir = str(self._folder("test"))
            self.test_dataset = _FixedClassFolder(test_dir, self.class_to_idx, transform=self.eval_transform)

    def _setup_train_val(self) -> None:
        train_dir, val_dir = self._folder("train"), self._folder("val", required=False)
        full = datasets.ImageFolder(str(train_dir))
        seed = self.hparams.seed
        if val_dir.is_dir():
            self.train_dataset = TransformedSubset(full, range(len(full)), self.train_transform, seed=seed)
            self.val_dataset = _FixedClassFolder(str(val_dir), self.class_to_idx, transform=self.eval_transform)
            return
        n_val = round(self.hparams.val_fraction * len(full))
        train_indices, val_indices = seeded_split(len(full), n_val, seed)
        self.train_dataset = TransformedSubset(full, train_indices, self.train_transform, seed=seed)
        self.val_dataset = TransformedSubset(full, val_indices, self.eval_transform)

    def test_dataloader(self) -> DataLoader[Any]:
        """Batches of ``root/test``."""
        return self._loader(self.test_dataset)
