"""Global batches that do not depend on the number of ranks, and each rank's shard of them.

The sequence of global batches is a function of (dataset size, batch size,
seed, epoch) only, so a run on N ranks sees the same global batches as a run
on one, and a checkpoint taken on N ranks resumes on M.

Each epoch draws one permutation from ``np.random.default_rng((seed, epoch))``
(the same on every rank). Global batch ``i`` is the positions
``[i*B, (i+1)*B)`` of it; rank ``r`` takes a contiguous, near-equal part of
that batch with ``np.array_split`` semantics: the first ``len(batch) % N``
ranks get one sample more. Every rank runs the same number of steps.

Last partial batch (``drop_last=False``, the default): when the dataset size
is not a multiple of B, the last global batch is the remaining
``num_samples % B`` samples, used as they are, so each sample is seen exactly
once per epoch. It is split near-equally like any other; when it has fewer
samples than there are ranks, some ranks get an empty shard (their gradient
weight ``b_r / B`` is 0). With ``drop_last=True`` that batch is skipped.

Usage::

    sampler = GlobalBatchSampler(len(x), global_batch_size=64, rank=comm.rank,
                                 world_size=comm.size, seed=0)
    for batch in sampler.batches(epoch, start_step=0):
        loss = dp(x[batch.indices], y[batch.indices])
        dp.backward(global_batch_size=batch.global_batch_size)
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from mnn.checks import check_int

__all__ = ["GlobalBatchSampler", "DrawnBatchSampler", "ShardedBatch", "shard_sizes"]


def shard_sizes(batch_size: int, world_size: int) -> list[int]:
    """Sizes of the ``world_size`` contiguous shards of a batch (``np.array_split`` rule).

    >>> shard_sizes(7, 3)
    [3, 2, 2]
    """
    batch_size = check_int("batch_size", batch_size, 0)
    world_size = check_int("world_size", world_size, 1)
    base, extra = divmod(batch_size, world_size)
    return [base + 1 if rank < extra else base for rank in range(world_size)]


class ShardedBatch(NamedTuple):
    """One step's data for one rank.

    ``indices``: this rank's dataset indices (may be empty);
    ``global_batch_size``: samples in the step's global batch, over all ranks;
    ``shard_sizes``: every rank's number of samples, in rank order, so this
    rank's gradient weight is ``shard_sizes[rank] / global_batch_size``;
    ``offset``: the position in the global batch of this rank's first sample
    (what makes a sample's random numbers, e.g. its dropout mask, independent
    of the rank that holds it).
    """

    epoch: int
    step: int
    indices: np.ndarray
    global_batch_size: int
    shard_sizes: list[int]
    offset: int = 0


def _shard(epoch: int, step: int, global_indices: np.ndarray, rank: int, world_size: int) -> ShardedBatch:
    """Rank ``rank``'s contiguous, near-equal part of a global batch."""
    sizes = shard_sizes(len(global_indices), world_size)
    offset = sum(sizes[:rank])
    return ShardedBatch(epoch=epoch, step=step, indices=global_indices[offset:offset + sizes[rank]],
                        global_batch_size=len(global_indices), shard_sizes=sizes, offset=offset)


class _ShardingSampler:
    """What both samplers share: their settings, checked, and the sharding of each
    global batch over the ranks. A subclass says how many global batches an epoch
    has (``steps_per_epoch``) and which they are (``_global_batches``)."""

    steps_per_epoch: int

    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int, seed: int):
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.global_batch_size = check_int("global_batch_size", global_batch_size, 1)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        self.seed = check_int("seed", seed, 0)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[ShardedBatch]:
        """Yield this rank's part of each global batch of ``epoch``, from ``start_step`` on.

        ``start_step`` resumes within an epoch: the batches are those an
        uninterrupted epoch would have produced from that step, whatever the
        world size before and after.
        """
        start_step = check_int("start_step", start_step, 0)
        if start_step > self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        for step, global_indices in self._global_batches(epoch, start_step):
            yield _shard(epoch, step, global_indices, self.rank, self.world_size)

    def _global_batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.steps_per_epoch


class GlobalBatchSampler(_ShardingSampler):
    """Per-epoch shuffled global batches of ``global_batch_size``, sharded over ranks.

    For training only: evaluation needs no shuffling or batching across ranks,
    just each rank's contiguous part of the split (:func:`shard_sizes`).
    """

    def __init__(self, num_samples: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, drop_last: bool = False):
        super().__init__(num_samples, global_batch_size, rank, world_size, seed)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.num_samples < self.global_batch_size:
            raise ValueError(f"drop_last=True with {self.num_samples} samples and global_batch_size="
                             f"{self.global_batch_size} leaves no batch in an epoch")

    @property
    def steps_per_epoch(self) -> int:
        """Number of global batches per epoch (the same on every rank)."""
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's order of all dataset indices (identical on every rank)."""
        epoch = check_int("epoch", epoch, 0)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)

    def global_batch(self, epoch: int, step: int, order: np.ndarray | None = None) -> np.ndarray:
        """Dataset indices of global batch ``step`` of ``epoch``, over all ranks."""
        step = check_int("step", step, 0)
        if step >= self.steps_per_epoch:
            raise ValueError(f"step must be in [0, {self.steps_per_epoch}) for this epoch, got {step}")
        if order is None:
            order = self.epoch_order(epoch)
        start = step * self.global_batch_size
        return order[start:start + self.global_batch_size]

    def _global_batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, np.ndarray]]:
        order = self.epoch_order(epoch)  # once per epoch
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.global_batch(epoch, step, order)


class DrawnBatchSampler(_ShardingSampler):
    """Global batches drawn at random, with replacement, from (seed, global step) alone.

    For data too large to shuffle whole, such as the windows of a text (one per
    character): global batch :math:`k` (counted over the run) is
    ``default_rng((seed, k)).integers(0, num_samples, global_batch_size)``,
    identical on every rank and for any number of ranks, and is split into
    shards as :class:`GlobalBatchSampler` splits its batches. An "epoch" is
    ``steps_per_epoch`` such batches: the unit in which the trainer evaluates,
    logs epochs and writes checkpoints. Resuming at any step gives the batches
    an uninterrupted run would have drawn.
    """

    def __init__(self, num_samples: int, global_batch_size: int, steps_per_epoch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        super().__init__(num_samples, global_batch_size, rank, world_size, seed)
        self.steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, 1)

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices of global batch ``step`` of ``epoch``, over all ranks."""
        global_step = check_int("epoch", epoch, 0) * self.steps_per_epoch + check_int("step", step, 0)
        return np.random.default_rng((self.seed, global_step)).integers(0, self.num_samples, self.global_batch_size)

    def _global_batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, np.ndarray]]:
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.global_batch(epoch, step)
