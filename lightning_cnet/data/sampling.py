"""Training order and randomness that depend only on ``(seed, epoch)``, and a DataLoader that resumes mid-epoch.

Lightning calls ``set_epoch`` on a training sampler before every epoch, also right after it restores a checkpoint,
and saves the ``state_dict()`` of a training DataLoader that has one in every checkpoint. The pieces here use both:

- :class:`EpochSampler` draws the order of epoch ``e`` from ``(seed, e)`` alone, so a resumed run sees the same
  order as an uninterrupted one; :class:`EpochKeySampler` also tags every index with its epoch, for datasets whose
  items change from epoch to epoch (augmentation seeded per sample, distortions drawn per epoch).
- :class:`ResumableDataLoader` records how many batches of which epoch it has handed out; a checkpoint taken in
  the middle of an epoch resumes with the next batch, and one taken on its last batch with the next epoch whole.
  Its worker processes are started anew every epoch, seeded from ``(seed, epoch)``.

Under DDP (``use_distributed_sampler=True``, the default) Lightning puts a ``DistributedSamplerWrapper`` around
the sampler: it forwards ``set_epoch``, permutes the epoch's order once more with the Trainer's global seed
(``seed_everything``, 0 if unset) and the epoch, and gives each rank a disjoint shard (padded with repeated indices
when the set does not divide evenly). The loader then counts the batches of its own rank's shard.

Example:
    >>> sampler = EpochSampler(6, seed=0)
    >>> sampler.set_epoch(3)
    >>> list(sampler) == EpochSampler(6, seed=0).permutation(3)
    True
    >>> loader = ResumableDataLoader(list(range(6)), seed=0, sampler=sampler, batch_size=2)
    >>> sampler.set_epoch(3)
    >>> _ = next(iter(loader))
    >>> loader.state_dict()["batches"]
    1
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_cnet._validation import check_integer

__all__ = ["EpochKeySampler", "EpochSampler", "ResumableDataLoader", "Stream", "derived_seed", "torch_seeded"]


class Stream(IntEnum):
    """The independent random streams derived from a DataModule's ``seed``."""

    TRAIN_DISTORTION = 0
    VAL_DISTORTION = 1
    TEST_DISTORTION = 2
    SHUFFLE = 3
    AUGMENTATION = 4
    WORKERS = 5


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one random stream, derived from the user's ``seed`` and the stream's ``keys``.

    Different key tuples give statistically independent streams (``numpy.random.SeedSequence``).

    Example:
        >>> first, again, other = (derived_seed(0, Stream.SHUFFLE, epoch) for epoch in (1, 1, 2))
        >>> first == again != other
        True
    """
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """Seed torch's default CPU generator for the ``with`` block, then restore the state it had before.

    Accelerator generators are left alone, so the block can run in the main process of a GPU job.

    Example:
        >>> with torch_seeded(7):
        ...     a = torch.rand(2)
        >>> with torch_seeded(7):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``seed`` and the epoch.

    Lightning calls :meth:`set_epoch` before every epoch, so that a resumed run replays the orders of an
    uninterrupted one. Without it (a plain loop), every new pass moves on to the next epoch, as a shuffling
    ``DataLoader`` draws a new order per pass.

    Args:
        n: number of samples.
        seed: non-negative seed; the order of epoch ``e`` is drawn from ``(seed, e)``.

    Example:
        >>> sampler = EpochSampler(5, seed=1)
        >>> first, second = list(sampler), list(sampler)
        >>> sorted(first) == sorted(second) == [0, 1, 2, 3, 4], first == sampler.permutation(0)
        (True, True)
    """

    def __init__(self, n: int, seed: int) -> None:
        check_integer("n", n, minimum=0)
        check_integer("seed", seed, minimum=0)
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the one of ``epoch``."""
        self.epoch = epoch

    def permutation(self, epoch: int) -> list[int]:
        """The order of ``epoch``."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, Stream.SHUFFLE, epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        return self.n

    def _next_epoch(self) -> int:
        epoch = self.epoch
        self.epoch += 1
        return epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation(self._next_epoch()))


class EpochKeySampler(EpochSampler):
    """:class:`EpochSampler` yielding ``(epoch, index)`` keys, for datasets whose items depend on the epoch.

    Example:
        >>> sampler = EpochKeySampler(3, seed=0)
        >>> sampler.set_epoch(2)
        >>> sorted(sampler)
        [(2, 0), (2, 1), (2, 2)]
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self._next_epoch()
        return iter([(epoch, index) for index in self.permutation(epoch)])


class _EpochCounting(Protocol):
    """A sampler that says which epoch it draws (:class:`EpochSampler`)."""

    epoch: int


class ResumableDataLoader(DataLoader[Any]):
    """A training ``DataLoader`` whose position in the epoch goes into Lightning checkpoints.

    :meth:`state_dict` records the epoch of the current pass and how many batches it has handed out.
    Lightning saves it in every checkpoint and, when it resumes a checkpoint taken in the middle of an epoch,
    hands it to :meth:`load_state_dict`: the next pass of that epoch then re-reads the batches already trained
    and drops them, so the batches that follow (and any random augmentation in them, whatever its source) are
    exactly those of an uninterrupted run. This costs the loading time of the dropped batches, never more than
    one epoch's. A state whose epoch is not the next pass's (a checkpoint taken on an epoch's last batch, after
    which Lightning starts the next epoch) drops nothing.

    The pass of epoch ``e`` (read from ``sampler.epoch`` when its first batch is asked for, after Lightning's
    ``set_epoch``) reseeds ``generator`` from ``(seed, e)``; torch seeds each worker process from it (and
    Python's ``random`` and NumPy in it). Workers are therefore started anew every epoch (no persistent
    workers); the same number of workers gives the same worker seeds. The loader never draws from the global
    random generator.

    Args:
        dataset: the training dataset.
        seed: non-negative seed of the worker seeds.
        **kwargs: any other ``DataLoader`` argument except ``persistent_workers``; a ``generator`` given is
            reseeded every epoch. The ``sampler`` must have an ``epoch`` attribute, like
            :class:`EpochSampler` and the ``DistributedSampler`` that Lightning puts around it under DDP.

    Raises:
        ValueError: ``seed`` is negative, ``persistent_workers`` is set, or the sampler has no ``epoch``.

    Example:
        >>> sampler = EpochSampler(10, seed=0)
        >>> loader = ResumableDataLoader(list(range(10)), seed=0, sampler=sampler, batch_size=4)
        >>> batches = iter(loader)
        >>> _ = next(batches)
        >>> state = loader.state_dict()
        >>> resumed = ResumableDataLoader(list(range(10)), seed=0, sampler=EpochSampler(10, seed=0), batch_size=4)
        >>> resumed.load_state_dict(state)
        >>> [b.tolist() for b in resumed] == [b.tolist() for b in batches]
        True
    """

    def __init__(self, dataset: Dataset[Any], *, seed: int, **kwargs: Any) -> None:
        check_integer("seed", seed, minimum=0)
        if kwargs.pop("persistent_workers", False):
            raise ValueError("`persistent_workers` must be off: ResumableDataLoader starts its workers every epoch")
        generator = kwargs.pop("generator", None) or torch.Generator()
        super().__init__(dataset, generator=generator, **kwargs)
        if not isinstance(getattr(self.sampler, "epoch", None), int):
            raise ValueError(
                f"ResumableDataLoader needs a sampler with an `epoch` attribute (EpochSampler), got "
                f"{type(self.sampler).__name__}"
            )
        self.seed = seed
        self._epoch: int = cast(_EpochCounting, self.sampler).epoch
        self._handed_out = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # DataLoader's declares its iterator class
        # A generator: the epoch is read when the first batch is asked for, after Lightning's `set_epoch`.
        return self._epoch_pass()

    def _epoch_pass(self) -> Iterator[Any]:
        epoch = cast(_EpochCounting, self.sampler).epoch
        done = self._batches_to_drop(epoch)
        self.generator.manual_seed(derived_seed(self.seed, Stream.WORKERS, epoch))
        self._epoch, self._handed_out = epoch, done
        for position, batch in enumerate(super().__iter__()):
            if position < done:
                continue
            self._handed_out = position + 1
            yield batch

    def _batches_to_drop(self, epoch: int) -> int:
        """The batches of ``epoch`` trained before the loaded checkpoint (0 for another epoch); forgets the state."""
        resume, self._resume = self._resume, None
        if resume is None or resume["epoch"] != epoch or resume["batches"] == 0:
            return 0
        layout = {"batch_size": self.batch_size, "batches_per_epoch": len(self)}
        changed = [f"{key} {resume[key]} then, {now} now" for key, now in layout.items() if resume[key] != now]
        if changed:
            raise ValueError(
                f"cannot resume the training loader in the middle of epoch {epoch}: {', '.join(changed)}, so the "
                f"batches already trained cannot be told apart. Resume with the same data, batch size and devices, "
                f"or from an end-of-epoch checkpoint"
            )
        return resume["batches"]

    def state_dict(self) -> dict[str, int | None]:
        """The epoch of the current (or last) pass, its batches handed out, and the batch layout."""
        return {
            "epoch": self._epoch,
            "batches": self._handed_out,
            "batch_size": self.batch_size,
            "batches_per_epoch": len(self),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after the batches that ``state`` records, if the next pass is of ``state``'s epoch.

        Raises:
            ValueError: ``state`` is malformed; or (when the next pass starts) ``state`` is of that pass's epoch
                and was saved with another batch size or another number of batches per epoch (other data, or
                another number of devices), so the batches already trained cannot be told apart.
        """
        keys = ("epoch", "batches", "batch_size", "batches_per_epoch")
        if not isinstance(state, dict) or any(not isinstance(state.get(key), int) for key in keys):
            raise ValueError(f"a ResumableDataLoader state holds the integers {', '.join(keys)}; got {state!r}")
        if state["batches"] < 0:
            raise ValueError(f"a ResumableDataLoader state counts batches from 0, got {state['batches']}")
        self._resume = {key: state[key] for key in keys}
