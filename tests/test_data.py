"""Tests of the DataModules against independent truths: raw files, published constants, sklearn."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import jsonargparse
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from sklearn.datasets import load_digits

from lightning_cnet.data import (
    AffineNoise,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    HardDigitsDataModule,
    ImageFolderDataModule,
)

# Published per-channel statistics of the CIFAR training sets.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=8, batch_size=100)
    dm.setup("fit")
    return dm


def test_digits_attributes_before_setup():
    dm = DigitsDataModule(image_size=24)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 24)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_digits_split_sizes_disjoint_stratified(digits):
    idx = digits.split_indices
    assert {name: len(i) for name, i in idx.items()} == {"train": 1200, "val": 300, "test": 297}
    assert (len(digits.train_dataset), len(digits.val_dataset), len(digits.test_dataset)) == (1200, 300, 297)
    every = np.concatenate(list(idx.values()))
    assert len(np.unique(every)) == 1797  # disjoint and covering all digits
    target = load_digits().target
    overall = np.bincount(target, minlength=10) / len(target)
    for name, i in idx.items():
        counts = np.bincount(target[i], minlength=10)
        # stratified: each class count within one image of its proportional share
        assert np.all(np.abs(counts - overall * len(i)) <= 1.0), name


def test_digits_images_are_the_raw_digits(digits):
    raw = load_digits()
    for name, dataset in (("train", digits.train_dataset), ("val", digits.val_dataset), ("test", digits.test_dataset)):
        images, labels = dataset.tensors
        i = digits.split_indices[name]
        restored = (images[:, 0] * digits.std + digits.mean) * 16
        np.testing.assert_allclose(restored.numpy(), raw.images[i], atol=1e-4)
        np.testing.assert_array_equal(labels.numpy(), raw.target[i])


def test_digits_split_identical_across_instances_and_seeds(digits):
    other = DigitsDataModule(image_size=8, seed=5)
    other.setup("test")
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(other.split_indices[name], digits.split_indices[name])
    assert torch.equal(other.test_dataset.tensors[0], digits.test_dataset.tensors[0])


def test_digits_standardised_with_train_statistics():
    dm = DigitsDataModule(image_size=16)
    dm.setup("fit")
    train = dm.train_dataset.tensors[0]
    assert train.shape == (1200, 1, 16, 16)
    assert abs(train.mean().item()) < 1e-5
    assert abs(train.std().item() - 1) < 1e-5
    # the raw 8x8 pixels, scaled by 1/16, average to the same value as the upsampled ones
    raw_mean = load_digits().images[dm.split_indices["train"]].mean() / 16
    assert abs(dm.mean - raw_mean) < 0.01


def test_digits_shuffling_is_seeded(digits):
    def first_labels(seed: int) -> torch.Tensor:
        dm = DigitsDataModule(image_size=8, batch_size=1200, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return torch.stack([next(iter(loader))[1] for _ in range(2)])

    a, b, c = first_labels(0), first_labels(0), first_labels(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # a new order every epoch
    assert torch.equal(a[0].sort().values, digits.train_dataset.tensors[1].sort().values)


def test_digits_predict_matches_test(digits):
    assert torch.equal(all_batches(digits.predict_dataloader())[0], all_batches(digits.test_dataloader())[0])


# --------------------------------------------------------------------------------------------
# Hard digits


@pytest.fixture(scope="module")
def hard() -> HardDigitsDataModule:
    dm = HardDigitsDataModule(batch_size=200, seed=3)
    dm.setup("fit")
    return dm


def test_hard_digits_fixed_splits(hard, digits):
    assert (hard.num_classes, hard.in_chans, hard.image_size) == (10, 1, 32)
    twin = HardDigitsDataModule(seed=3)
    twin.setup("test")
    other = HardDigitsDataModule(seed=4)
    other.setup("test")
    test, labels = hard.test_dataset.tensors
    assert test.shape == (297, 1, 32, 32)
    assert torch.equal(twin.test_dataset.tensors[0], test)
    assert torch.equal(twin.val_dataset.tensors[0], hard.val_dataset.tensors[0])
    assert not torch.allclose(other.test_dataset.tensors[0], test)
    # same digits and labels as the plain split
    assert torch.equal(labels, digits.test_dataset.tensors[1])
    assert torch.equal(other.test_dataset.tensors[1], labels)


def test_hard_digits_without_distortion_are_the_plain_digits():
    plain = DigitsDataModule(image_size=32)
    plain.setup("test")
    still = HardDigitsDataModule(rotation=0, shear=0, scale=0, translation=0, noise=0)
    still.setup("test")
    torch.testing.assert_close(still.test_dataset.tensors[0], plain.test_dataset.tensors[0], atol=1e-5, rtol=0)
    assert still.mean == pytest.approx(plain.mean) and still.std == pytest.approx(plain.std)


def test_hard_digits_distortion_is_strong(hard):
    plain = DigitsDataModule(image_size=32)
    plain.setup("test")
    change = (hard.test_dataset.tensors[0] - plain.test_dataset.tensors[0]).std().item()
    assert change > 0.5  # in units of the clean training standard deviation


def test_hard_digits_train_changes_every_epoch_reproducibly(hard):
    def epochs(dm: HardDigitsDataModule, n: int) -> list[torch.Tensor]:
        loader = dm.train_dataloader()
        return [all_batches(loader)[0] for _ in range(n)]

    first, second = epochs(hard, 2)
    twin = HardDigitsDataModule(batch_size=200, seed=3)
    twin.setup("fit")
    again = epochs(twin, 2)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert not torch.allclose(first, second)
    # the same digit differs between epochs, not only the order
    dataset = hard.train_dataset
    assert not torch.allclose(dataset[(0, 7)][0], dataset[(1, 7)][0])
    assert torch.equal(dataset[(1, 7)][1], dataset[(0, 7)][1])
    # resuming at epoch 1 (Lightning calls set_epoch) reproduces that epoch
    loader = twin.train_dataloader()
    loader.sampler.set_epoch(1)
    assert torch.equal(all_batches(loader)[0], second)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_hard_digits_epochs_follow_the_trainer():
    """Under a Trainer, epoch e sees the same batches as the e-th pass of a plain loop."""

    class FirstBatches(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.seen.append(batch[0].clone())
            return (self.weight * batch[0].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = HardDigitsDataModule(batch_size=32, seed=1)
    module = FirstBatches()
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    reference = HardDigitsDataModule(batch_size=32, seed=1)
    reference.setup("fit")
    loader = reference.train_dataloader()
    expected = [next(iter(loader))[0] for _ in range(2)]
    assert len(module.seen) == 2
    assert torch.equal(module.seen[0], expected[0]) and torch.equal(module.seen[1], expected[1])


def test_affine_noise_shifts_whole_pixels():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 3] = 1.0
    # translation 0.25 of an 8-pixel side is at most 2 pixels; the draw decides the shift
    shifted = AffineNoise(rotation=0, shear=0, scale=0, translation=0.25, noise=0)(
        image, torch.Generator().manual_seed(0)
    )
    assert shifted.sum().item() == pytest.approx(1.0, abs=1e-5)  # mass kept: bilinear, no cropping
    row, col = np.unravel_index(shifted[0, 0].argmax().item(), (8, 8))
    assert abs(row - 3) <= 2 and abs(col - 3) <= 2


# --------------------------------------------------------------------------------------------
# CIFAR files in the genuine on-disk format


class Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` objects, as in the published CIFAR files.

    Loaded with ``encoding="bytes"`` the keys come back as bytes (``b"data"``), and with
    ``encoding="latin1"`` (as torchvision does) as str: exactly as the real files behave.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_py2_pickle(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = [], []
    for b in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        write_py2_pickle(
            folder / f"data_batch_{b}",
            {b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]},
        )
        train_data.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    write_py2_pickle(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test_data,
         b"filenames": [f"test_{i}.png".encode() for i in range(n_test)]},
    )
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    write_py2_pickle(folder / "batches.meta", meta)
    return {
        "train_data": np.concatenate(train_data), "train_labels": np.array(train_labels),
        "test_data": test_data, "test_labels": np.array(test_labels),
    }


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        fine[0] = 99  # the largest label must come through
        write_py2_pickle(
            folder / split,
            {b"filenames": [f"{split}_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
             b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(), b"data": data},
        )
        out[f"{split}_data"], out[f"{split}_labels"] = data, fine
    write_py2_pickle(
        folder / "meta",
        {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]},
    )
    return out


def test_py2_pickle_has_bytes_keys_like_the_real_files(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert {b"data", b"labels", b"batch_label", b"filenames"} == set(entry)
    assert entry[b"data"].shape == (6, 3072) and entry[b"data"].dtype == np.uint8


def unnormalise(images: torch.Tensor, mean, std) -> np.ndarray:
    """Back to uint8 pixels ``[N, 3, 32, 32]``."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images * s + m).mul(255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize(
    "cls, writer, mean, std, n_classes",
    [
        (CIFAR10DataModule, write_cifar10, CIFAR10_MEAN, CIFAR10_STD, 10),
        (CIFAR100DataModule, write_cifar100, CIFAR100_MEAN, CIFAR100_STD, 100),
    ],
)
def test_cifar_loads_genuine_files(tmp_path, cls, writer, mean, std, n_classes):
    raw = writer(tmp_path)
    n_train, n_test = len(raw["train_labels"]), len(raw["test_labels"])
    dm = cls(data_dir=str(tmp_path), batch_size=4, num_workers=0, val_size=5, seed=0)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (n_classes, 3, 32)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")

    # test split: order, labels, normalisation, and the pixel layout of the raw rows (R, G, B planes)
    test_images, test_labels = all_batches(dm.test_dataloader())
    assert test_images.shape == (n_test, 3, 32, 32) and test_images.dtype == torch.float32
    np.testing.assert_array_equal(test_labels.numpy(), raw["test_labels"])
    k, c, h, w = 2, 1, 5, 17
    pixel = raw["test_data"][k, c * 1024 + h * 32 + w]
    assert test_images[k, c, h, w].item() == pytest.approx((pixel / 255 - mean[c]) / std[c], abs=1e-5)
    expected = (raw["test_data"].reshape(-1, 3, 32, 32) / 255 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(
        std, (1, 3, 1, 1)
    )
    np.testing.assert_allclose(test_images.numpy(), expected, atol=1e-5)

    # held-out validation: disjoint from train, covering the training files, unaugmented
    train_idx, val_idx = dm.train_dataset.indices, dm.val_dataset.indices
    assert len(val_idx) == 5 and len(train_idx) == n_train - 5
    assert set(train_idx).isdisjoint(val_idx) and set(train_idx) | set(val_idx) == set(range(n_train))
    val_images, val_labels = all_batches(dm.val_dataloader())
    np.testing.assert_array_equal(unnormalise(val_images, mean, std), raw["train_data"][val_idx].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(val_labels.numpy(), raw["train_labels"][val_idx])
    assert int(test_labels.max()) < n_classes and int(val_labels.min()) >= 0

    # training images: labels of the training part, each image a padded crop (maybe flipped)
    train_images, train_labels = all_batches(dm.train_dataloader())
    assert train_images.shape == (n_train - 5, 3, 32, 32)
    assert sorted(train_labels.tolist()) == sorted(raw["train_labels"][train_idx].tolist())
    image, _ = dm.train_dataset[0]
    source = raw["train_data"][train_idx[0]].reshape(3, 32, 32)
    padded = np.pad(source, ((0, 0), (4, 4), (4, 4)))
    crops = [
        crop
        for dy in range(9)
        for dx in range(9)
        for crop in (padded[:, dy : dy + 32, dx : dx + 32], padded[:, dy : dy + 32, dx : dx + 32][:, :, ::-1])
    ]
    assert any(np.array_equal(unnormalise(image[None], mean, std)[0], crop) for crop in crops)


def test_cifar_val_split_is_seeded(tmp_path):
    write_cifar10(tmp_path)
    splits = []
    for seed in (0, 0, 1):
        dm = CIFAR10DataModule(data_dir=str(tmp_path), num_workers=0, val_size=6, seed=seed)
        dm.setup("fit")
        splits.append(dm.val_dataset.indices)
    assert splits[0] == splits[1] and splits[0] != splits[2]


def test_cifar_download_flag_keeps_present_files(tmp_path):
    raw = write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True, num_workers=0, val_size=0)
    dm.prepare_data()  # the files are there: nothing is fetched
    dm.setup("fit")
    assert len(dm.train_dataset) == len(raw["train_labels"]) and len(dm.val_dataset) == 0


@pytest.mark.parametrize(
    "cls, folder", [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")]
)
def test_cifar_missing_dataset_gives_one_clear_error(tmp_path, cls, folder):
    dm = cls(data_dir=str(tmp_path / "nowhere"))
    for step in (dm.prepare_data, lambda: dm.setup("fit"), lambda: dm.setup("test")):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        message = str(info.value)
        assert str(tmp_path / "nowhere" / folder) in message
        assert "download: true" in message and "--data.download true" in message
        assert "https://www.cs.toronto.edu/~kriz/" in message
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_cifar_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")


def test_cifar_opt_in_md5_check_rejects_other_files(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(RuntimeError, match="md5"):
        CIFAR10DataModule(data_dir=str(tmp_path), verify_md5=True).setup("fit")


# --------------------------------------------------------------------------------------------
# ImageFolder


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder_root(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fish"):
        for i in range(4):
            write_png(tmp_path / "train" / name / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return tmp_path


def test_image_folder_split_and_shapes(folder_root):
    dm = ImageFolderDataModule(root=str(folder_root), image_size=16, batch_size=5, num_workers=0, val_fraction=0.25)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (3, 3, 16)
    assert dm.classes == ["cat", "dog", "fish"]
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (9, 3)
    assert set(dm.train_dataset.indices).isdisjoint(dm.val_dataset.indices)
    images, labels = all_batches(dm.train_dataloader())
    assert images.shape == (9, 3, 16, 16) and set(labels.tolist()) <= {0, 1, 2}
    twin = ImageFolderDataModule(root=str(folder_root), val_fraction=0.25)
    twin.setup("fit")
    assert twin.val_dataset.indices == dm.val_dataset.indices


def test_image_folder_pixels_and_test_labels(folder_root):
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    write_png(folder_root / "test" / "dog" / "a.png", pixels)
    dm = ImageFolderDataModule(root=str(folder_root), image_size=8, num_workers=0)
    dm.setup("test")
    images, labels = all_batches(dm.test_dataloader())
    assert labels.tolist() == [1]  # "dog" keeps its training label although "cat" is absent here
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - 0.5) / 0.5
    torch.testing.assert_close(images[0], expected, atol=1e-6, rtol=0)


def test_image_folder_val_folder_and_grey(folder_root):
    write_png(folder_root / "val" / "fish" / "v.png", np.full((8, 8, 3), 255, dtype=np.uint8))
    dm = ImageFolderDataModule(root=str(folder_root), image_size=8, num_workers=0, in_chans=1)
    dm.setup("fit")
    assert len(dm.train_dataset) == 12  # the whole train folder: validation has its own
    images, labels = all_batches(dm.val_dataloader())
    assert images.shape == (1, 1, 8, 8) and labels.tolist() == [2]
    torch.testing.assert_close(images, torch.ones_like(images))


def test_image_folder_errors(folder_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "missing" / "train")):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))
    dm = ImageFolderDataModule(root=str(folder_root))
    with pytest.raises(DatasetNotFoundError, match=str(folder_root / "test")):
        dm.setup("test")
    write_png(folder_root / "val" / "bird" / "v.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="bird"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------
# Configuration from YAML / the command line


@pytest.mark.parametrize(
    "cls, args",
    [
        (DigitsDataModule, ["--data.image_size", "8"]),
        (HardDigitsDataModule, ["--data.noise", "0.1"]),
        (CIFAR10DataModule, ["--data.download", "true"]),
        (CIFAR100DataModule, ["--data.val_size", "100"]),
        (ImageFolderDataModule, ["--data.root", "somewhere", "--data.in_chans", "1"]),
    ],
)
def test_datamodules_build_from_their_signature(cls, args):
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    config = parser.parse_args(args)
    assert isinstance(config.data.batch_size, int)
    if cls is not ImageFolderDataModule:  # that one reads its folder when built
        dm = parser.instantiate(config).data
        assert isinstance(dm.num_classes, int) and isinstance(dm.image_size, int)


# --------------------------------------------------------------------------------------------
# Training order and augmentation: functions of (seed, epoch) only


def cifar_module(root: Path, num_workers: int) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(data_dir=str(root), batch_size=5, num_workers=num_workers, val_size=5, seed=2)
    dm.setup("fit")
    return dm


def folder_module(root: Path, num_workers: int) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root=str(root), image_size=8, batch_size=4, num_workers=num_workers, seed=2)
    dm.setup("fit")
    return dm


@pytest.fixture
def augmented(request, tmp_path, folder_root):
    """A builder of the CIFAR-10 or the image-folder DataModule (with a `val` folder), by number of workers."""
    if request.param == "cifar":
        write_cifar10(tmp_path / "cifar")
        return lambda workers: cifar_module(tmp_path / "cifar", workers)
    write_png(folder_root / "val" / "cat" / "v.png", np.zeros((8, 8, 3), dtype=np.uint8))
    return lambda workers: folder_module(folder_root, workers)


@pytest.mark.parametrize("augmented", ["cifar", "folder"], indirect=True)
def test_augmentation_follows_seed_epoch_and_sample(augmented):
    def epoch_batches(workers: int, epoch: int, resume: dict | None = None) -> list[tuple[torch.Tensor, ...]]:
        loader = augmented(workers).train_dataloader()
        if resume is not None:
            loader.load_state_dict(resume)
        loader.sampler.set_epoch(epoch)
        return [tuple(batch) for batch in loader]

    torch.manual_seed(0)
    reference = {epoch: epoch_batches(0, epoch) for epoch in (0, 1)}
    torch.manual_seed(1)  # neither the order nor the augmentation draws from the global generator
    for workers in (0, 2):
        again = epoch_batches(workers, 1)
        assert len(again) == len(reference[1]) >= 3
        assert all(torch.equal(a, b) for batch, expected in zip(again, reference[1]) for a, b in zip(batch, expected))
    # resumed after two batches of epoch 1, with workers: the rest of the epoch, augmentation included
    state = {"epoch": 1, "batches": 2, "batch_size": augmented(0).hparams.batch_size,
             "batches_per_epoch": len(reference[1])}
    resumed = epoch_batches(2, 1, resume=state)
    assert len(resumed) == len(reference[1]) - 2
    assert all(torch.equal(a, b) for batch, expected in zip(resumed, reference[1][2:]) for a, b in zip(batch, expected))

    dataset = augmented(0).train_dataset
    before = torch.get_rng_state()
    views = {epoch: torch.stack([dataset[(epoch, i)][0] for i in range(len(dataset))]) for epoch in (0, 1, 2)}
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(views[1], torch.stack([dataset[(1, i)][0] for i in range(len(dataset))]))
    # a crop and flip drawn afresh per epoch: most samples look different in each epoch
    changed = [(views[e] != views[e + 1]).flatten(1).any(1).float().mean().item() for e in (0, 1)]
    assert min(changed) > 0.7
