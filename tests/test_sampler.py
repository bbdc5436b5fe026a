"""Serial tests of the global-batch sampler: coverage, world-size independence, shard sizes."""

import numpy as np
import pytest

from mnn.distributed.sampler import DrawnBatchSampler, GlobalBatchSampler, shard_sizes


def all_rank_batches(num_samples, batch_size, world_size, epoch, **options):
    """Every rank's batches for one epoch: list over ranks of lists over steps."""
    return [list(GlobalBatchSampler(num_samples, batch_size, rank=rank, world_size=world_size,
                                    **options).batches(epoch))
            for rank in range(world_size)]


def concatenated_global_batches(num_samples, batch_size, world_size, epoch, **options):
    per_rank = all_rank_batches(num_samples, batch_size, world_size, epoch, **options)
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, f"ranks run different numbers of steps: {steps}"
    return [np.concatenate([per_rank[rank][step].indices for rank in range(world_size)])
            for step in range(steps.pop())]


@pytest.mark.parametrize("batch_size, world_size, expected", [
    (8, 2, [4, 4]), (7, 3, [3, 2, 2]), (64, 3, [22, 21, 21]), (2, 3, [1, 1, 0]), (0, 2, [0, 0]),
])
def test_shard_sizes_follow_array_split(batch_size, world_size, expected):
    assert shard_sizes(batch_size, world_size) == expected
    assert expected == [len(part) for part in np.array_split(np.arange(batch_size), world_size)]


@pytest.mark.parametrize("num_samples, batch_size", [(100, 10), (103, 10), (5, 7), (64, 64)])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_sample_once_per_epoch(num_samples, batch_size, world_size):
    for epoch in (0, 1):
        batches = concatenated_global_batches(num_samples, batch_size, world_size, epoch, seed=3)
        seen = np.concatenate(batches)
        assert np.array_equal(np.sort(seen), np.arange(num_samples))


@pytest.mark.parametrize("num_samples, batch_size", [(103, 10), (50, 7), (10, 64)])
def test_global_batches_do_not_depend_on_world_size(num_samples, batch_size):
    reference = concatenated_global_batches(num_samples, batch_size, 1, epoch=2, seed=5)
    for world_size in (2, 3, 4):
        batches = concatenated_global_batches(num_samples, batch_size, world_size, epoch=2, seed=5)
        assert len(batches) == len(reference)
        for got, want in zip(batches, reference):
            assert np.array_equal(got, want)


def test_uneven_split_and_reported_sizes():
    per_rank = all_rank_batches(30, 7, 3, epoch=0, seed=0)
    # 30 = 4 * 7 + 2: four full batches split 3/2/2, then a last batch of 2 split 1/1/0.
    for rank, batches in enumerate(per_rank):
        for batch in batches:
            assert len(batch.indices) == batch.shard_sizes[rank]
            assert sum(batch.shard_sizes) == batch.global_batch_size
    assert [batch.shard_sizes for batch in per_rank[0]] == [[3, 2, 2]] * 4 + [[1, 1, 0]]
    assert [batch.global_batch_size for batch in per_rank[2]] == [7, 7, 7, 7, 2]
    assert per_rank[2][-1].indices.shape == (0,)


def test_last_partial_batch_is_kept_by_default_and_dropped_on_request():
    kept = GlobalBatchSampler(25, 10)
    assert kept.steps_per_epoch == 3
    assert [batch.global_batch_size for batch in kept.batches(0)] == [10, 10, 5]
    dropped = GlobalBatchSampler(25, 10, drop_last=True)
    assert dropped.steps_per_epoch == 2
    assert [batch.global_batch_size for batch in dropped.batches(0)] == [10, 10]
    assert len(np.unique(np.concatenate([b.indices for b in dropped.batches(0)]))) == 20


def test_epochs_and_seeds_shuffle_differently_and_reproducibly():
    sampler = GlobalBatchSampler(50, 50, seed=1)
    assert np.array_equal(sampler.epoch_order(0), GlobalBatchSampler(50, 5, seed=1).epoch_order(0))
    assert not np.array_equal(sampler.epoch_order(0), sampler.epoch_order(1))
    assert not np.array_equal(sampler.epoch_order(0), GlobalBatchSampler(50, 50, seed=2).epoch_order(0))
    assert np.array_equal(sampler.epoch_order(0),
                          np.random.default_rng((1, 0)).permutation(50))


def test_resume_from_a_step_on_another_world_size():
    full = concatenated_global_batches(40, 6, 2, epoch=1, seed=9)
    for world_size in (1, 3):
        resumed = [np.concatenate([b.indices for b in batches]) for batches in zip(*[
            list(GlobalBatchSampler(40, 6, rank=rank, world_size=world_size, seed=9)
                 .batches(1, start_step=4))
            for rank in range(world_size)])]
        assert len(resumed) == len(full) - 4
        for got, want in zip(resumed, full[4:]):
            assert np.array_equal(got, want)
    sampler = GlobalBatchSampler(40, 6, seed=9)
    assert [batch.step for batch in sampler.batches(1, start_step=5)] == [5, 6]
    assert list(sampler.batches(1, start_step=sampler.steps_per_epoch)) == []


@pytest.mark.parametrize("arguments, error, message", [
    (dict(num_samples=0, global_batch_size=4), ValueError, "num_samples: expected an integer >= 1, got 0"),
    (dict(num_samples=10, global_batch_size=0), ValueError, "global_batch_size: expected an integer >= 1"),
    (dict(num_samples=10, global_batch_size=4, rank=2, world_size=2), ValueError, "rank must be in"),
    (dict(num_samples=10, global_batch_size=4.0), TypeError,
     r"global_batch_size: expected an integer, got 4.0 \(float\)"),
    (dict(num_samples=10, global_batch_size=4, seed=True), TypeError, "seed: expected an integer"),
    (dict(num_samples=3, global_batch_size=4, drop_last=True), ValueError, "leaves no batch"),
])
def test_bad_arguments_raise_clear_errors(arguments, error, message):
    with pytest.raises(error, match=message):
        GlobalBatchSampler(**arguments)


def test_numpy_integers_are_accepted():
    sampler = GlobalBatchSampler(np.int64(10), np.int32(4), seed=np.uint8(3))
    assert sampler.steps_per_epoch == 3 and type(sampler.num_samples) is int
    assert shard_sizes(np.int64(7), 3) == [3, 2, 2]


def test_bad_step_raises():
    sampler = GlobalBatchSampler(10, 4)
    with pytest.raises(ValueError, match=r"start_step must be in \[0, 3\]"):
        list(sampler.batches(0, start_step=4))
    with pytest.raises(ValueError, match="step must be in"):
        sampler.global_batch(0, 3)


# --- batches drawn at random (text windows) ------------------------------------------

def drawn(world_size, rank, **kwargs):
    return DrawnBatchSampler(1000, global_batch_size=7, steps_per_epoch=5, rank=rank, world_size=world_size,
                             seed=3, **kwargs)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_drawn_batches_do_not_depend_on_the_number_of_ranks(world_size):
    alone = [batch.indices for batch in drawn(1, 0).batches(epoch=2)]
    shards = [list(drawn(world_size, rank).batches(epoch=2)) for rank in range(world_size)]
    for step, expected in enumerate(alone):
        parts = [shards[rank][step] for rank in range(world_size)]
        np.testing.assert_array_equal(np.concatenate([part.indices for part in parts]), expected)
        assert [part.offset for part in parts] == list(np.cumsum([0] + parts[0].shard_sizes[:-1]))
        assert all(part.global_batch_size == 7 for part in parts)


def test_drawn_batches_resume_mid_epoch_and_differ_between_steps():
    full = [batch.indices for batch in drawn(1, 0).batches(epoch=1)]
    resumed = [batch.indices for batch in drawn(1, 0).batches(epoch=1, start_step=3)]
    assert len(full) == 5 and all(np.array_equal(a, b) for a, b in zip(full[3:], resumed))
    assert not np.array_equal(full[0], full[1])
    assert not np.array_equal(full[0], next(iter(drawn(1, 0).batches(epoch=2))).indices)
    assert all(0 <= index < 1000 for batch in full for index in batch)
