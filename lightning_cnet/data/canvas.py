"""Digits on a canvas with their masks: an offline semantic segmentation task built from scikit-learn's digits.

The DataModule logic is a namespace-free mixin; ``lightning_cnet.data`` and ``lightning_cnet.lightning`` make it
concrete for ``pytorch_lightning`` and ``lightning.pytorch``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lightning_cnet._namespace import lightning_class
from lightning_cnet._validation import check_integer
from lightning_cnet.data._common import SplitDataMixin
from lightning_cnet.data.digits import _split_indices
from lightning_cnet.data.sampling import EpochSampler

__all__ = ["DigitCanvasDataMixin", "SegmentationDataset", "digit_canvases"]

#: Side of the square cell of the canvas that holds at most one digit.
CELL_SIZE = 16
#: Index of each split in the seed of its canvases.
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def digit_canvases(
    digits: np.ndarray, labels: np.ndarray, count: int, *, canvas_size: int, digits_per_image: int, threshold: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """``count`` canvases holding ``digits_per_image`` digits each, and their masks.

    The canvas is divided into cells of ``CELL_SIZE`` pixels; each digit (drawn uniformly from ``digits``) goes into
    its own cell (drawn without replacement) at a random offset inside it, so digits never overlap. A pixel of the
    mask is ``1 + label`` where the digit's intensity (in ``[0, 1]``) exceeds ``threshold``, else 0 (background).

    Args:
        digits: square images ``[N, D, D]`` scaled to ``[0, 1]``, ``D <= CELL_SIZE``.
        labels: their classes ``[N]`` in ``0..9``.
        count: canvases to draw.
        canvas_size: side of the square canvas (a multiple of ``CELL_SIZE``).
        digits_per_image: digits per canvas (at most the number of cells).
        threshold: intensity above which a pixel belongs to its digit.
        seed: seed of the draw.

    Returns:
        ``(images [count, 1, S, S] in [0, 1], masks [count, S, S] long)``.

    Example:
        >>> digits = np.ones((3, 8, 8)); labels = np.array([4, 5, 6])
        >>> images, masks = digit_canvases(digits, labels, 2, canvas_size=32, digits_per_image=2, threshold=0.5, seed=0)
        >>> tuple(images.shape), tuple(masks.shape), int((masks > 0).sum()), sorted(masks.unique().tolist())[0]
        ((2, 1, 32, 32), (2, 32, 32), 256, 0)
    """
    cells_per_side = canvas_size // CELL_SIZE
    digit_size = digits.shape[-1]
    rng = np.random.default_rng(seed)
    images = np.zeros((count, canvas_size, canvas_size), dtype=np.float32)
    masks = np.zeros((count, canvas_size, canvas_size), dtype=np.int64)
    for index in range(count):
        cells = rng.choice(cells_per_side**2, size=digits_per_image, replace=False)
        for cell, digit in zip(cells, rng.integers(0, len(digits), size=digits_per_image)):
            row, column = divmod(int(cell), cells_per_side)
            top, left = (CELL_SIZE * v + int(rng.integers(0, CELL_SIZE - digit_size + 1)) for v in (row, column))
            window = (index, slice(top, top + digit_size), slice(left, left + digit_size))
            images[window] = digits[digit]
            masks[window] = np.where(digits[digit] > threshold, 1 + int(labels[digit]), 0)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(masks)


class SegmentationDataset(Dataset[Any]):
    """Images and masks held in memory, served as ``{"image": [C, H, W], "mask": [H, W]}`` samples."""

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "mask": self.masks[index]}


@lightning_class("DigitCanvasDataModule", base="LightningDataModule")
class DigitCanvasDataMixin(SplitDataMixin):
    """Semantic segmentation of handwritten digits placed on a canvas: 11 classes (background and the digits 0-9).

    Each canvas holds ``digits_per_image`` of scikit-learn's 8x8 digits, scaled to ``digit_size`` (bilinear), each in
    its own 16x16 cell at a random offset;
    the mask gives every pixel of a digit (intensity above ``threshold``) the class ``1 + digit`` and every other pixel
    the class 0. Nothing is downloaded. The canvases of a split are drawn once, from ``seed`` and the split, out of
    that split's digits (the digits' fixed stratified 1200 / 300 / 297 split), so no digit image is shared between
    training, validation and test. Images are standardised with the training mean and standard deviation. Batches
    are dicts ``{"image": [B, 1, S, S], "mask": [B, S, S]}``. The training order of epoch ``e`` depends only on
    ``(seed, e)``, and the training loader's position is saved in checkpoints.

    Args:
        canvas_size: side of the square canvas, a multiple of 16.
        digits_per_image: digits per canvas, at most ``(canvas_size / 16) ** 2``.
        digit_size: side of each digit on the canvas, 8 (native) to 16.
        train_size: training canvases.
        val_size: validation canvases.
        test_size: test canvases.
        threshold: intensity (in ``[0, 1]``) above which a pixel belongs to its digit.
        batch_size: samples per batch for every split.
        seed: non-negative seed of the canvases and of the training order.
        num_workers: ``DataLoader`` worker processes.

    Example:
        >>> from lightning_cnet.data import DigitCanvasDataModule
        >>> data = DigitCanvasDataModule(train_size=8, val_size=4, test_size=4, batch_size=4)
        >>> data.num_classes, data.in_chans, data.image_size
        (11, 1, 32)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> tuple(batch["image"].shape), tuple(batch["mask"].shape)
        ((4, 1, 32, 32), (4, 32, 32))
    """

    def __init__(
        self,
        *,
        canvas_size: int = 32,
        digits_per_image: int = 3,
        digit_size: int = 12,
        train_size: int = 1000,
        val_size: int = 200,
        test_size: int = 200,
        threshold: float = 0.25,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("canvas_size", canvas_size), ("digits_per_image", digits_per_image),
                            ("train_size", train_size), ("val_size", val_size), ("test_size", test_size),
                            ("batch_size", batch_size)):
            check_integer(name, value)
        if canvas_size % CELL_SIZE:
            raise ValueError(f"`canvas_size` must be a multiple of {CELL_SIZE}, got {canvas_size}")
        if digits_per_image > (canvas_size // CELL_SIZE) ** 2:
            raise ValueError(f"`digits_per_image`={digits_per_image} does not fit a {canvas_size}x{canvas_size} "
                             f"canvas: at most {(canvas_size // CELL_SIZE) ** 2}")
        if not 8 <= digit_size <= CELL_SIZE:
            raise ValueError(f"`digit_size` must be between 8 and {CELL_SIZE}, got {digit_size}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}")
        check_integer("seed", seed, minimum=0)
        check_integer("num_workers", num_workers, minimum=0)
        self.save_hyperparameters()
        self.mean: float | None = None
        self.std: float | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes: background and the ten digits (11)."""
        return 11

    @property
    def in_chans(self) -> int:
        """Number of image channels (1)."""
        return 1

    @property
    def image_size(self) -> int:
        """Side of the square images in every batch."""
        return int(self.hparams.canvas_size)

    def setup(self, stage: str | None = None) -> None:
        """Draw the canvases of all three splits and standardise them (once; later calls do nothing).

        Args:
            stage: the Lightning stage; every stage gets the same data.
        """
        if self.train_dataset is not None:
            return
        hp = self.hparams
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
        if hp.digit_size != images.shape[-1]:
            images = F.interpolate(images, size=(hp.digit_size, hp.digit_size), mode="bilinear", align_corners=False)
        arrays, labels = images.squeeze(1).numpy(), digits.target
        sizes = {"train": hp.train_size, "val": hp.val_size, "test": hp.test_size}
        splits = {
            name: digit_canvases(arrays[indices], labels[indices], sizes[name], canvas_size=hp.canvas_size,
                                 digits_per_image=hp.digits_per_image, threshold=hp.threshold,
                                 seed=hp.seed * len(_SPLIT_STREAMS) + _SPLIT_STREAMS[name])
            for name, indices in _split_indices(labels).items()
        }
        train_images = splits["train"][0]
        self.mean, self.std = train_images.mean().item(), train_images.std().item()
        self.train_dataset, self.val_dataset, self.test_dataset = (
            SegmentationDataset((splits[name][0] - self.mean) / self.std, splits[name][1])
            for name in ("train", "val", "test")
        )

    def train_sampler(self, n: int) -> Sampler[Any]:
        """The training order: an :class:`~lightning_cnet.data.sampling.EpochSampler` seeded with ``seed``."""
        return EpochSampler(n, self.hparams.seed)
