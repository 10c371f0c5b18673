"""Atomic checkpoints: a failed write (an injected OSError, a full 2 MB tmpfs) leaves the previous checkpoint intact
and loadable, no partial file under the final name and no temporary; a killed writer's temporary is cleaned up."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from refinement_support import TinyDigits

from lightning_cnet import _atomic
from lightning_cnet.checkpoint_io import AtomicCheckpointIO
from lightning_cnet.cli import ContinuousNetCLI
from lightning_cnet.module import ContinuousNetClassifier


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _write_partially_then_fail(obj, handle, *args, **kwargs) -> None:
    handle.write(b"PK\x03\x04" + b"\x00" * 4096)  # the start of a zip file, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_injected_write_error_leaves_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "weights": torch.arange(5.0)}, path)
    previous = path.read_bytes()
    monkeypatch.setattr(_atomic.torch, "save", _write_partially_then_fail)
    with pytest.raises(OSError) as error:
        io.save_checkpoint({"epoch": 1, "weights": torch.zeros(5)}, path)
    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == previous and _names(tmp_path) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["epoch"] == 0


def test_a_failed_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0}, path)

    def failing_replace(source, target):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        io.save_checkpoint({"epoch": 1}, path)
    assert _names(tmp_path) == ["last.ckpt"] and torch.load(path, weights_only=True)["epoch"] == 0


def test_a_temporary_of_a_killed_writer_is_removed_and_a_live_one_kept(tmp_path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = _atomic._host()
    stale = tmp_path / f".last.ckpt.{host}.{dead.pid}.k1ll3d.tmp"
    live = tmp_path / f".last.ckpt.{host}.{os.getpid()}.wr1t1ng.tmp"
    other_host = tmp_path / f".last.ckpt.elsewhere.{dead.pid}.r3m0te.tmp"
    for path in (stale, live, other_host):
        path.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"epoch": 3}, tmp_path / "last.ckpt")
    assert _names(tmp_path) == sorted(["last.ckpt", live.name, other_host.name])


# ---------------------------------------------------------------------- a full file system
@pytest.fixture
def small_filesystem(tmp_path) -> Iterator[Path]:
    """A 2 MB tmpfs (needs root and a kernel that lets this process mount; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _leave_free(folder: Path, free: int) -> None:
    """Fill ``folder``'s file system with a ballast file until about ``free`` bytes are left."""
    stats = os.statvfs(folder)
    available = stats.f_bavail * stats.f_frsize
    with (folder / f"ballast-{uuid.uuid4().hex}").open("wb") as handle:
        handle.write(b"\x01" * max(available - free, 0))


class _EveryEpoch(ModelCheckpoint):
    def __init__(self, dirpath: Path) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def _fit_until_the_disk_is_full(folder: Path, plugins: list) -> pl.Trainer:
    """Epoch 0's last.ckpt fits; the ballast leaves no room for a second one beside it, so epoch 1's write fails."""
    torch.manual_seed(0)
    task = ContinuousNetClassifier("cnet_digits", n_steps=1, lr=0.05)
    probe = folder.parent / "probe.ckpt"
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[_EveryEpoch(folder / "checkpoints")], plugins=plugins)
    size = _checkpoint_size(probe)
    (folder / "checkpoints").mkdir()
    _leave_free(folder, int(1.5 * size))
    with pytest.raises((OSError, RuntimeError)):
        trainer.fit(task, datamodule=TinyDigits())
    return trainer


def _checkpoint_size(probe: Path) -> int:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[_EveryEpoch(probe.parent / "probe")])
    trainer.fit(ContinuousNetClassifier("cnet_digits", n_steps=1, lr=0.05), datamodule=TinyDigits())
    return (probe.parent / "probe" / "last.ckpt").stat().st_size


def test_a_full_disk_leaves_the_last_finished_epoch_loadable(small_filesystem) -> None:
    trainer = _fit_until_the_disk_is_full(small_filesystem, [AtomicCheckpointIO()])
    assert trainer.current_epoch == 1
    checkpoints = small_filesystem / "checkpoints"
    assert _names(checkpoints) == ["last.ckpt"]  # no partial file, no temporary
    stored = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert stored["epoch"] == 0 and stored["global_step"] == 2
    resumed = ContinuousNetClassifier.load_from_checkpoint(checkpoints / "last.ckpt", weights_only=True)
    assert resumed.model.resolution[0].n_steps == 1


@pytest.mark.parametrize("writer", ["atomic", "lightning"])
def test_a_larger_checkpoint_on_a_full_disk(small_filesystem, writer) -> None:
    """A 400 KB last.ckpt, then an 800 KB one with 200 KB free. Ours fails and keeps the previous file; Lightning's own
    writer (the control: it copies a temporary from $TMPDIR into the final name) leaves a truncated last.ckpt."""
    io = AtomicCheckpointIO() if writer == "atomic" else TorchCheckpointIO()
    path = small_filesystem / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "weights": torch.ones(100_000)}, path)
    _leave_free(small_filesystem, 200_000)
    with pytest.raises((OSError, RuntimeError)):
        io.save_checkpoint({"epoch": 1, "weights": torch.ones(200_000)}, path)
    if writer == "atomic":
        assert torch.load(path, weights_only=True)["epoch"] == 0
        assert [name for name in _names(small_filesystem) if not name.startswith("ballast")] == ["last.ckpt"]
    else:
        with pytest.raises((RuntimeError, EOFError)):  # a cut zip archive; an empty file
            torch.load(path, weights_only=True)


# ---------------------------------------------------------------------- wiring
def test_the_command_line_trainer_writes_atomically(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = ContinuousNetCLI(["--trainer.logger", "false"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    # plugins given without a CheckpointIO still write atomically
    cli = ContinuousNetCLI(["--trainer.logger", "false", "--trainer.plugins", "[]"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    # a CheckpointIO the user chose is kept
    cli = ContinuousNetCLI(["--trainer.logger", "false", "--trainer.plugins",
                            "pytorch_lightning.plugins.io.TorchCheckpointIO"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO
    assert list(tmp_path.iterdir()) == []


def test_the_lightning_namespace_has_its_own_atomic_checkpoint_io(tmp_path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    from lightning_cnet.lightning import AtomicCheckpointIO as LightningAtomicCheckpointIO

    trainer = L.Trainer(plugins=[LightningAtomicCheckpointIO()], logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, LightningAtomicCheckpointIO)
    trainer.strategy.checkpoint_io.save_checkpoint({"epoch": 1}, tmp_path / "a.ckpt")
    assert _names(tmp_path) == ["a.ckpt"]
