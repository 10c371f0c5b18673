"""IDXDataModule on small IDX files written here in the real byte format, and one short epoch on the real files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import jsonargparse
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from refinement_support import make_task, trainer_options

from lightning_cnet.data import DatasetNotFoundError, IDXDataModule
from lightning_cnet.data.idx import read_idx

REAL = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST, SIDE = 40, 12, 8


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8) as an IDX file: bytes 0, 0, 0x08 (unsigned byte), the number of dimensions, one big-endian
    32-bit size per dimension, then the data; gzipped if the name ends in ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def dataset_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Images whose first pixel is their index (so any image can be traced back) and labels 0-9."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images = rng.integers(0, 256, (n, SIDE, SIDE), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        arrays[f"{split}-images-idx3-ubyte"] = images
        arrays[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    return arrays


def write_dataset(folder: Path, *, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    arrays = dataset_arrays(seed)
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


def module(folder: Path, **options) -> IDXDataModule:
    settings = dict(dataset="idx", data_dir=str(folder), batch_size=8, val_size=8)
    settings.update(options)
    return IDXDataModule(**settings)


def raw_index(standardised: torch.Tensor, dm: IDXDataModule) -> int:
    """The index an image was written with (its first pixel), read back through the DataModule's statistics."""
    return round(float(standardised[0, 0, 0]) * dm.std * 255 + dm.mean * 255)


# ---------------------------------------------------------------------- the file format
def test_read_idx_reads_hand_written_bytes(tmp_path):
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    assert read_idx(labels).tolist() == [7, 0, 9]
    images = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(images, "wb") as handle:  # two 2x3 images: sizes 2, 2, 3, big-endian
        handle.write(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, *range(12)]))
    assert read_idx(images).tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


@pytest.mark.parametrize(("content", "message"), [
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]), "magic number is 00000d01"),  # float data
    (bytes([8, 0, 0, 1, 0, 0, 0, 1, 5]), "magic number"),                          # little-endian
    (bytes([0, 0, 8, 1, 0, 0]), "ends inside its IDX header"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2]), "holds 2 bytes after its header"),
    (b"", "empty"),
])
def test_read_idx_refuses_other_files(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


# ---------------------------------------------------------------------- where the files are
@pytest.mark.parametrize(("dataset", "layout", "gz"), [
    ("idx", "", False), ("idx", "", True), ("fashion-mnist", "FashionMNIST/raw", True),
    ("mnist", "MNIST/raw", False), ("kmnist", "KMNIST/raw", True), ("fashion-mnist", "", False),
])
def test_files_are_found_in_every_layout(tmp_path, dataset, layout, gz):
    arrays = write_dataset(tmp_path / layout, gz=gz)
    dm = IDXDataModule(dataset=dataset, data_dir=str(tmp_path), batch_size=8, val_size=8)
    dm.prepare_data()
    dm.setup("test")
    images, labels = dm.test_dataset.tensors
    raw = images * dm.std + dm.mean
    assert torch.allclose(raw * 255, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().unsqueeze(1), atol=1e-3)
    assert labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


@pytest.mark.parametrize(("dataset", "how"), [
    ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ("mnist", "`download: true`"),
    ("idx", "point `data_dir`"),
])
def test_a_missing_file_is_named_in_one_line(tmp_path, dataset, how):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    dm = IDXDataModule(dataset=dataset, data_dir=str(tmp_path))
    if dataset == "fashion-mnist" and REAL.is_dir():
        dm.info = type(dm.info)(dm.info.title, dm.info.torchvision, (), dm.info.package, True)  # hide the real files
    with pytest.raises(DatasetNotFoundError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "\n" not in message and "t10k-labels-idx1-ubyte[.gz]" in message and how in message
    assert "train-images" not in message and str(tmp_path) in message


def test_image_size_of_any_folder_is_read_from_its_header(tmp_path):
    write_dataset(tmp_path)
    assert module(tmp_path).image_size == SIDE
    assert IDXDataModule(dataset="kmnist", data_dir=str(tmp_path / "absent")).image_size == 28


@pytest.mark.parametrize(("options", "name"), [
    ({"dataset": "emnist"}, "dataset"), ({"val_size": -1}, "val_size"), ({"crop_padding": 1.5}, "crop_padding"),
    ({"num_classes": 5}, "num_classes"), ({"dataset": "idx", "download": True}, "download"),
    ({"batch_size": 0}, "batch_size"), ({"seed": -2}, "seed"),
])
def test_bad_arguments_name_themselves(options, name):
    with pytest.raises(ValueError, match=name):
        IDXDataModule(**options)


def test_labels_beyond_num_classes_are_refused(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(ValueError, match="label 9, beyond num_classes=5"):
        module(tmp_path, num_classes=5).setup("fit")


# ---------------------------------------------------------------------- splits and statistics
def test_split_is_disjoint_seeded_and_standardised_with_the_training_part(tmp_path):
    arrays = write_dataset(tmp_path)
    dm = module(tmp_path, seed=3)
    dm.setup("fit")
    train_images, train_labels = dm.train_dataset.tensors
    val_images, val_labels = dm.val_dataset.tensors
    train = [raw_index(image, dm) for image in train_images]
    val = [raw_index(image, dm) for image in val_images]
    assert len(train) == N_TRAIN - 8 and len(val) == 8 and sorted(train + val) == list(range(N_TRAIN))
    assert train_labels.tolist() == [i % 10 for i in train] and val_labels.tolist() == [i % 10 for i in val]
    pixels = arrays["train-images-idx3-ubyte"][sorted(train)].astype(np.float64) / 255
    assert dm.mean == pytest.approx(pixels.mean(), rel=1e-5)
    assert dm.std == pytest.approx(pixels.std(ddof=1), rel=1e-4)

    again = module(tmp_path, seed=3)
    again.setup("fit")
    assert torch.equal(again.val_dataset.tensors[0], val_images)
    other = module(tmp_path, seed=4)
    other.setup("fit")
    assert sorted(raw_index(image, other) for image in other.val_dataset.tensors[0]) != sorted(val)


def test_test_stage_alone_uses_the_training_statistics(tmp_path):
    write_dataset(tmp_path)
    fit, test = module(tmp_path), module(tmp_path)
    fit.setup("fit")
    test.setup("test")
    assert (test.mean, test.std) == (fit.mean, fit.std) and test.train_dataset is None


# ---------------------------------------------------------------------- order and augmentation
def epoch_batches(dm: IDXDataModule, epoch: int, resume: dict | None = None) -> list[tuple[torch.Tensor, ...]]:
    loader = dm.train_dataloader()
    if resume is not None:
        loader.load_state_dict(resume)
    loader.sampler.set_epoch(epoch)
    return [tuple(batch) for batch in loader]


@pytest.mark.parametrize("augment", [False, True])
def test_batches_follow_seed_and_epoch_and_resume_mid_epoch(tmp_path, augment):
    write_dataset(tmp_path)

    def built(seed: int = 1) -> IDXDataModule:
        dm = module(tmp_path, seed=seed, augment=augment, dataset="idx")
        dm.setup("fit")
        return dm

    torch.manual_seed(0)
    reference = epoch_batches(built(), 2)
    torch.manual_seed(1)  # nothing draws from the global generator
    again = epoch_batches(built(), 2)
    assert len(reference) == 4 and all(torch.equal(a, b) for x, y in zip(reference, again) for a, b in zip(x, y))
    assert not torch.equal(epoch_batches(built(), 3)[0][1], reference[0][1])  # another epoch, another order
    state = {"epoch": 2, "batches": 1, "batch_size": 8, "batches_per_epoch": 4}
    resumed = epoch_batches(built(), 2, resume=state)
    assert all(torch.equal(a, b) for x, y in zip(resumed, reference[1:]) for a, b in zip(x, y)) and len(resumed) == 3


@pytest.mark.parametrize(("dataset", "flips"), [("fashion-mnist", True), ("mnist", False), ("kmnist", False)])
def test_augmentation_flips_clothes_only(tmp_path, dataset, flips):
    """With no padding the crop keeps the image: each view is the image or, for Fashion-MNIST only, its mirror."""
    write_dataset(tmp_path)
    dm = IDXDataModule(dataset=dataset, data_dir=str(tmp_path), batch_size=8, val_size=8, augment=True,
                       crop_padding=0)
    dm.setup("fit")
    plain = dm.train_dataset.dataset.tensors[0]
    mirrored = 0
    for epoch in range(3):
        for position, index in enumerate(dm.train_dataset.indices):
            view = dm.train_dataset[(epoch, position)][0] * dm.std + dm.mean
            same, mirror = torch.allclose(view, plain[index], atol=1e-5), torch.allclose(view, plain[index].flip(-1),
                                                                                        atol=1e-5)
            assert same or mirror
            mirrored += mirror and not same
    assert (mirrored > 0) == flips


def test_crop_pads_with_background_before_standardising(tmp_path):
    """A padded crop moves the image by up to ``crop_padding`` pixels and fills the border with black (0 before
    standardisation), not with the mean."""
    write_dataset(tmp_path)
    dm = module(tmp_path, dataset="mnist", augment=True, crop_padding=2)
    dm.setup("fit")
    shifted = 0
    for position, index in enumerate(dm.train_dataset.indices):
        view = dm.train_dataset[(0, position)][0][0] * dm.std + dm.mean
        image = dm.train_dataset.dataset.tensors[0][index][0]
        padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.allclose(view, padded[dy:dy + SIDE, dx:dx + SIDE], atol=1e-5)]
        assert matches, "every view is a window of the zero-padded image"
        shifted += matches[0] != (2, 2)
    assert shifted > len(dm.train_dataset) // 2


# ---------------------------------------------------------------------- through Lightning
def test_fit_resumed_mid_epoch_ends_like_an_uninterrupted_one(tmp_path):
    write_dataset(tmp_path / "data")

    def fit(ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
        pl.seed_everything(0)
        dm = module(tmp_path / "data", augment=True, dataset="fashion-mnist")
        task = make_task(in_chans=1, num_classes=10)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=6,
                                filename="{step}", save_on_train_epoch_end=False)
        trainer = pl.Trainer(**trainer_options(max_epochs=3, callbacks=[saver], enable_checkpointing=True,
                                               limit_val_batches=1))
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        assert trainer.global_step == 12  # 32 training images in batches of 8, 3 epochs
        return {key: value.clone() for key, value in task.state_dict().items()}

    uninterrupted = fit()
    resumed = fit(tmp_path / "ckpt" / "step=6.ckpt")  # in the middle of epoch 1
    assert all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize(("config", "final_steps"), [("fashion_mnist.yaml", 4), ("fashion_mnist_full.yaml", 4)])
def test_shipped_configs_train_through_the_cli(tmp_path, monkeypatch, config, final_steps):
    """Each config's four epochs on tiny IDX files: the refined one reaches its 4 steps at epochs 2 and 3."""
    from lightning_cnet.cli import main

    write_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / config),
          "--data.init_args.dataset", "idx", "--data.init_args.data_dir", str(tmp_path / "data"),
          "--data.init_args.val_size", "8", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
          "--trainer.enable_progress_bar", "false"])
    name = config.removesuffix(".yaml")
    state = torch.load(tmp_path / "lightning_logs" / name / "version_0" / "checkpoints" / "last.ckpt",
                       weights_only=False)
    assert state["epoch"] == 3
    assert state["state_dict"]["model.stages.0.resolution.n_steps"].item() == final_steps


def test_datamodule_builds_from_its_signature():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(IDXDataModule, "data")
    config = parser.parse_args(["--data.dataset", "kmnist", "--data.augment", "true"])
    dm = parser.instantiate(config).data
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.hparams.augment) == (10, 1, 28, True)


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_one_short_epoch_on_the_real_fashion_mnist():
    """Zalando's files: 60,000 training images (55,000 + 5,000 held out) and 10,000 test images; the pixel mean and
    standard deviation of the training images are 0.2860 and 0.3530 (Zalando's README and many papers); 60 SGD steps
    lift a small model far above chance (10%)."""
    dm = IDXDataModule(dataset="fashion-mnist", batch_size=128)
    dm.setup(None)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (55000, 5000, 10000)
    assert dm.mean == pytest.approx(0.2860, abs=5e-4) and dm.std == pytest.approx(0.3530, abs=5e-4)
    assert torch.bincount(dm.test_dataset.tensors[1]).tolist() == [1000] * 10
    pl.seed_everything(0)
    task = make_task(lr=0.1)
    trainer = pl.Trainer(**trainer_options(max_epochs=1, limit_train_batches=60, limit_val_batches=10))
    trainer.fit(task, datamodule=dm)
    assert trainer.callback_metrics["val_acc"] > 0.4  # 53% when written
