"""Every DataModule in both Lightning namespaces: ``lightning_cnet.data`` (``pytorch_lightning``) and
``lightning_cnet.lightning`` (``lightning.pytorch``), which imports nothing of ``pytorch_lightning``."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from test_data import write_cifar10, write_cifar100, write_png
from test_mnist_data import write_dataset

import lightning_cnet.data as pl_data

L = pytest.importorskip("lightning.pytorch")
import lightning_cnet.lightning as lightning_twins  # noqa: E402

NAMES = ("DigitsDataModule", "HardDigitsDataModule", "CIFAR10DataModule", "CIFAR100DataModule",
         "ImageFolderDataModule", "IDXDataModule")


SNAPSHOT = "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"


def test_importing_the_data_package_and_the_twins_leaves_pytorch_lightning_out():
    """In a fresh interpreter: the data package imports no Lightning namespace until a DataModule is asked for,
    and the ``lightning.pytorch`` twins import nothing of ``pytorch_lightning``."""
    script = "\n".join([
        "import sys",
        "import lightning_cnet.data",
        "from lightning_cnet.data import DigitsDataMixin, ResumableDataLoader",
        SNAPSHOT,
        "import lightning_cnet.lightning",
        "from lightning_cnet.lightning import DigitsDataModule, ImageFolderDataModule",
        SNAPSHOT,
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    data_only, with_twins = (set(line.split()) for line in result.stdout.splitlines())
    assert "lightning_cnet" in data_only and not {"pytorch_lightning", "lightning", "lightning_fabric"} & data_only
    assert "lightning" in with_twins and "pytorch_lightning" not in with_twins


@pytest.fixture
def data_roots(tmp_path: Path) -> dict[str, Path]:
    """CIFAR-10/100 and IDX files in their genuine on-disk format and a three-class image folder, all tiny."""
    write_cifar10(tmp_path / "cifar10")
    write_dataset(tmp_path / "idx")
    write_cifar100(tmp_path / "cifar100")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fish"):
        for i in range(4):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            write_png(tmp_path / "folder" / "train" / name / f"{i}.png", pixels)
    return {"cifar10": tmp_path / "cifar10", "cifar100": tmp_path / "cifar100", "folder": tmp_path / "folder",
            "idx": tmp_path / "idx"}


def options(name: str, roots: dict[str, Path]) -> dict:
    return {
        "DigitsDataModule": {"image_size": 8, "batch_size": 16},
        "HardDigitsDataModule": {"image_size": 8, "batch_size": 16},
        "CIFAR10DataModule": {"data_dir": str(roots["cifar10"]), "batch_size": 4, "num_workers": 0, "val_size": 5},
        "CIFAR100DataModule": {"data_dir": str(roots["cifar100"]), "batch_size": 4, "num_workers": 0, "val_size": 5},
        "ImageFolderDataModule": {"root": str(roots["folder"]), "image_size": 8, "batch_size": 4, "num_workers": 0,
                                  "val_fraction": 0.25},
        "IDXDataModule": {"dataset": "idx", "data_dir": str(roots["idx"]), "batch_size": 4, "val_size": 8},
    }[name]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_every_datamodule_fits_in_its_namespace(name, namespace, data_roots):
    if namespace == "pytorch_lightning":
        lightning, classes, base, foreign = pl, pl_data, pl.LightningDataModule, L.LightningDataModule
        from lightning_cnet.module import ContinuousNetClassifier
    else:
        lightning, classes, base, foreign = L, lightning_twins, L.LightningDataModule, pl.LightningDataModule
        ContinuousNetClassifier = lightning_twins.ContinuousNetClassifier
    dm = getattr(classes, name)(**options(name, data_roots))
    assert isinstance(dm, base) and not isinstance(dm, foreign)
    assert type(pickle.loads(pickle.dumps(dm))) is type(dm)  # ddp_spawn pickles the DataModule
    task = ContinuousNetClassifier(model="cnet_digits", num_classes=dm.num_classes, in_chans=dm.in_chans)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 4 and "val_acc" in trainer.callback_metrics


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("name", NAMES)
def test_lightning_cli_accepts_both_namespaces(name, data_roots):
    """Each namespace's LightningCLI takes the class path of its own DataModule as a LightningDataModule."""
    from lightning.pytorch.cli import LightningCLI as TwinCLI
    from pytorch_lightning.cli import LightningCLI

    from lightning_cnet.module import ContinuousNetClassifier

    for cli, task, base, module in (
        (LightningCLI, ContinuousNetClassifier, pl.LightningDataModule, "lightning_cnet.data"),
        (TwinCLI, lightning_twins.ContinuousNetClassifier, L.LightningDataModule, "lightning_cnet.lightning"),
    ):
        init_args = [f"--data.init_args.{key}={value}" for key, value in options(name, data_roots).items()]
        parsed = cli(task, base, subclass_mode_data=True, run=False,
                     args=["--data", f"{module}.{name}", *init_args, "--trainer.logger=false"])
        assert type(parsed.datamodule).__name__ == name and type(parsed.datamodule).__module__ == module
        assert isinstance(parsed.datamodule, base)


# ---------------------------------------------------------------------- one registration, both namespaces
class SquaresDataMixin:
    """Images of one bright square per class: the smallest DataModule a user could write."""

    num_classes, in_chans = 2, 1

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        import torch

        images = torch.zeros(8, 1, 8, 8)
        labels = torch.arange(8) % 2
        images[labels == 1, :, 4:, 4:] = 1.0
        return torch.utils.data.DataLoader(list(zip(images, labels)), batch_size=self.batch_size)


@pytest.fixture
def registered_squares():
    """``SquaresDataModule`` registered as a package DataModule is, and forgotten afterwards."""
    from lightning_cnet import _namespace

    _namespace.lightning_class("SquaresDataModule", base="LightningDataModule", home="lightning_cnet.data")(
        SquaresDataMixin)
    yield
    _namespace._REGISTRY.pop("SquaresDataModule")
    for key in [key for key in _namespace._CONCRETE if key[0] == "SquaresDataModule"]:
        _namespace._CONCRETE.pop(key)


def test_one_registration_gives_a_datamodule_in_both_namespaces(registered_squares):
    """What a new DataModule file does (register its mixin) is all it takes: the class exists in both namespaces
    under the package's paths, pickles, trains, and LightningCLI takes its class path."""
    from lightning.pytorch.cli import LightningCLI as TwinCLI
    from pytorch_lightning.cli import LightningCLI

    from lightning_cnet.module import ContinuousNetClassifier

    for cli, task, lightning, module in (
        (LightningCLI, ContinuousNetClassifier, pl, pl_data),
        (TwinCLI, lightning_twins.ContinuousNetClassifier, L, lightning_twins),
    ):
        dm_class = module.SquaresDataModule
        assert dm_class is module.SquaresDataModule and dm_class.__module__ == module.__name__
        assert issubclass(dm_class, (SquaresDataMixin, lightning.LightningDataModule))
        assert type(pickle.loads(pickle.dumps(dm_class()))) is dm_class
        parsed = cli(task, lightning.LightningDataModule, subclass_mode_data=True, run=False,
                     args=["--data", f"{module.__name__}.SquaresDataModule", "--trainer.logger=false",
                           "--model.num_classes=2"])
        assert type(parsed.datamodule) is dm_class
        trainer = lightning.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(task("cnet_digits", num_classes=2), datamodule=dm_class())
        assert trainer.global_step == 2
