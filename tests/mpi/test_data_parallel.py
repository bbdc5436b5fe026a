"""DataParallel on real MPI processes: N-rank training equals one-process training.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_data_parallel.py`` for
N = 1, 2, 3. Each rank computes the one-process reference itself (a plain
SequentialLayers on the whole global batch, same seed) and compares in float64.
"""

import hashlib

import numpy as np
import pytest
from mpi4py import MPI

from mnn import SGD, Adam, CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.distributed.comm import get_communicator
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.sampler import GlobalBatchSampler, shard_sizes

N_IN, N_HIDDEN, N_OUT = 6, 10, 4
RTOL = 1e-9


def make_net(seed, hidden=N_HIDDEN, dtype=np.float64):
    return SequentialLayers([
        LinearLayer(N_IN, hidden, rng=seed, dtype=dtype), ReluLayer(dtype=dtype),
        LinearLayer(hidden, N_OUT, rng=seed + 1, dtype=dtype), CrossEntropyLossLayer(dtype=dtype),
    ])


def make_data(num_samples, seed=123):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_samples, N_IN)), rng.integers(0, N_OUT, num_samples)


def make_optimizer(kind, net):
    if kind == "momentum":
        return SGD(net, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if kind == "adam":
        return Adam(net, lr=0.01)
    return None  # plain net.step(lr)


def step(dp_or_optimizer, net):
    """One update the way each side does it: DataParallel.step, optimizer.step, or net.step."""
    if isinstance(dp_or_optimizer, DataParallel):
        dp_or_optimizer.step(lr=None if dp_or_optimizer.optimizer else 0.1)
    elif dp_or_optimizer is not None:
        dp_or_optimizer.step()
        dp_or_optimizer.zero_grads()
    else:
        net.step(0.1)
        net.zero_grads()


def params_of(net):
    return {name: param for name, param, _ in net.named_params()}


def assert_close_to(net, reference):
    expected = params_of(reference)
    for name, param in params_of(net).items():
        np.testing.assert_allclose(param, expected[name], rtol=RTOL, atol=1e-12, err_msg=name)


def assert_identical_on_all_ranks(comm, net):
    digest = hashlib.sha256()
    for name, param, _ in net.named_params():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(param).tobytes())
    digests = comm.allgather(digest.hexdigest())
    assert len(set(digests)) == 1, f"parameters differ across ranks: {digests}"


@pytest.fixture(params=["world", "self"])
def comm(request):
    """COMM_WORLD, and COMM_SELF: a world of one in which each rank trains alone."""
    return get_communicator(MPI.COMM_WORLD if request.param == "world" else MPI.COMM_SELF)


@pytest.mark.parametrize("num_samples, batch_size", [(50, 7), (70, 64)])
@pytest.mark.parametrize("optimizer_kind", ["momentum", "adam", None])
def test_training_equals_one_process_training(comm, num_samples, batch_size, optimizer_kind):
    # 50 = 7*7 + 1: the last global batch has one sample, so on 2 and 3 ranks some
    # shards are empty; 70 = 64 + 6 splits 64 as 22/21/21 on 3 ranks.
    x, y = make_data(num_samples)
    net = make_net(seed=10 + comm.rank)  # ranks start different: construction broadcasts
    dp = DataParallel(net, make_optimizer(optimizer_kind, net), comm=comm, bucket_bytes=256)
    reference = make_net(seed=10)
    reference_optimizer = make_optimizer(optimizer_kind, reference)
    sampler = GlobalBatchSampler(num_samples, batch_size, rank=comm.rank, world_size=comm.size, seed=4)
    for epoch in range(2):
        for batch in sampler.batches(epoch):
            loss = dp(x[batch.indices], y[batch.indices])
            assert np.isfinite(loss)
            dp.backward(global_batch_size=batch.global_batch_size)
            step(dp, net)
            full = sampler.global_batch(epoch, batch.step)
            reference(x[full], y[full])
            reference.backward()
            step(reference_optimizer, reference)
            assert_identical_on_all_ranks(comm, net)
            assert_close_to(net, reference)
    assert dp.timings["steps"] == 2 * sampler.steps_per_epoch


def test_shards_cover_each_sample_once_per_epoch(comm):
    sampler = GlobalBatchSampler(31, 8, rank=comm.rank, world_size=comm.size, seed=2)
    for epoch in range(2):
        seen = []
        for batch in sampler.batches(epoch):
            parts = comm.allgather(batch.indices.tolist())
            assert [len(part) for part in parts] == batch.shard_sizes
            assert sum(parts, []) == sampler.global_batch(epoch, batch.step).tolist()
            seen += sum(parts, [])
        assert sorted(seen) == list(range(31))


def test_global_batch_smaller_than_world_size(comm):
    """One sample on N ranks: the empty shards return loss 0 and add zero gradient."""
    x, y = make_data(1)
    net = make_net(seed=3)
    dp = DataParallel(net, comm=comm)
    sizes = shard_sizes(1, comm.size)
    start = sum(sizes[:comm.rank])
    loss = dp(x[start:start + sizes[comm.rank]], y[start:start + sizes[comm.rank]])
    if sizes[comm.rank] == 0:
        assert loss == 0.0
    dp.backward()  # global size summed over the ranks
    dp.synchronize()
    reference = make_net(seed=3)
    reference(x, y)
    reference.backward()
    expected = {name: grad for name, _, grad in reference.named_params()}
    for name, _, grad in net.named_params():
        np.testing.assert_allclose(grad, expected[name], rtol=RTOL, atol=1e-15, err_msg=name)
    dp.step(lr=0.1)
    assert_identical_on_all_ranks(comm, net)


def test_skipping_a_step_with_empty_shards_keeps_the_ranks_in_step(comm):
    """zero_grads() after an unreduced backward matches the reductions the other
    ranks started, so they cannot pair with the next step's (a rank with an empty
    shard starts none during backward). Small buckets: the first layer's bucket is
    reduced blocking, the others non-blocking from the backward hook."""
    x, y = make_data(9)
    net = make_net(seed=5)
    dp = DataParallel(net, comm=comm, bucket_bytes=64)
    assert len(dp.buckets) > 1
    # A one-sample global batch: on several ranks, all but rank 0 have empty shards.
    mine = slice(0, 1) if comm.rank == 0 else slice(0, 0)
    dp(x[mine], y[mine])
    dp.backward(global_batch_size=1)
    dp.zero_grads()  # the step is skipped (say, its loss was not finite)
    sizes = shard_sizes(8, comm.size)
    start = 1 + sum(sizes[:comm.rank])
    dp(x[start:start + sizes[comm.rank]], y[start:start + sizes[comm.rank]])
    dp.backward(global_batch_size=8)
    dp.synchronize()
    reference = make_net(seed=5)
    reference(x[1:], y[1:])
    reference.backward()
    expected = {name: grad for name, _, grad in reference.named_params()}
    for name, _, grad in net.named_params():
        np.testing.assert_allclose(grad, expected[name], rtol=RTOL, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("micro_batch_sizes", [[5, 5, 5], [5, 7, 2, 1]])
def test_no_sync_accumulation_equals_one_larger_batch(comm, micro_batch_sizes):
    total = sum(micro_batch_sizes)
    x, y = make_data(total, seed=9)
    net = make_net(seed=1)
    dp = DataParallel(net, SGD(net, lr=0.1, momentum=0.9), comm=comm, bucket_bytes=256)
    reference = make_net(seed=1)
    reference_optimizer = SGD(reference, lr=0.1, momentum=0.9)
    for _ in range(2):
        offset = 0
        for index, size in enumerate(micro_batch_sizes):
            shards = shard_sizes(size, comm.size)
            start = offset + sum(shards[:comm.rank])
            local = slice(start, start + shards[comm.rank])
            last = index == len(micro_batch_sizes) - 1
            with dp.no_sync() if not last else _nothing():
                dp(x[local], y[local])
                dp.backward(global_batch_size=size)
            offset += size
        dp.synchronize()
        reference(x, y)
        reference.backward()
        expected = {name: grad for name, _, grad in reference.named_params()}
        for name, _, grad in net.named_params():
            np.testing.assert_allclose(grad, expected[name], rtol=RTOL, atol=1e-15, err_msg=name)
        dp.step()
        step(reference_optimizer, reference)
        assert_identical_on_all_ranks(comm, net)
        assert_close_to(net, reference)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


def test_accumulation_reduced_in_step_when_every_backward_was_in_no_sync(comm):
    x, y = make_data(12, seed=5)
    net, reference = make_net(seed=2), make_net(seed=2)
    dp = DataParallel(net, comm=comm)
    for part in (slice(0, 6), slice(6, 12)):
        shards = shard_sizes(6, comm.size)
        start = part.start + sum(shards[:comm.rank])
        with dp.no_sync():
            dp(x[start:start + shards[comm.rank]], y[start:start + shards[comm.rank]])
            dp.backward(global_batch_size=6)
    dp.step(lr=0.1)
    reference(x, y)
    reference.backward()
    reference.step(0.1)
    assert_close_to(net, reference)


def test_overlap_off_gives_the_same_parameters(comm):
    x, y = make_data(20)
    nets = [make_net(seed=6), make_net(seed=6)]
    dps = [DataParallel(nets[0], comm=comm, bucket_bytes=256, overlap=True),
           DataParallel(nets[1], comm=comm, bucket_bytes=256, overlap=False)]
    shards = shard_sizes(20, comm.size)
    local = slice(sum(shards[:comm.rank]), sum(shards[:comm.rank + 1]))
    for _ in range(3):
        for dp in dps:
            dp(x[local], y[local])
            dp.backward(global_batch_size=20)
            dp.step(lr=0.1)
    for (name, first, _), (_, second, _) in zip(nets[0].named_params(), nets[1].named_params()):
        np.testing.assert_array_equal(first, second, err_msg=name)


def test_broadcast_makes_differently_seeded_ranks_identical(comm):
    net = make_net(seed=100 + comm.rank)
    optimizer = SGD(net, lr=0.1, momentum=0.9)
    if comm.rank == 0:  # as if rank 0 alone had loaded a checkpoint
        optimizer.load_state_dict({f"momentum.{name}": np.full(param.shape, 0.5)
                                   for name, param, _ in net.named_params()})
    DataParallel(net, optimizer, comm=comm)
    assert_identical_on_all_ranks(comm, net)
    assert_close_to(net, make_net(seed=100))
    state = optimizer.state_dict()
    assert sorted(state) == sorted(f"momentum.{name}" for name in params_of(net))
    assert all(np.array_equal(value, np.full(value.shape, 0.5)) for value in state.values())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("difference", ["shape", "dtype"])
def test_parameter_mismatch_is_a_clear_error_on_every_rank(difference):
    comm = get_communicator(MPI.COMM_WORLD)
    last = comm.size - 1
    if comm.rank == last:
        net = make_net(seed=0, hidden=N_HIDDEN + 1) if difference == "shape" \
            else make_net(seed=0, dtype=np.float32)
    else:
        net = make_net(seed=0)
    with pytest.raises(ValueError, match=rf"rank {last}: parameter '0\.LinearLayer\.w' has shape"):
        DataParallel(net, comm=comm)
    comm.barrier()  # every rank got here: nobody hangs in a broadcast


def test_buckets_in_reverse_layer_order_and_per_dtype():
    net = SequentialLayers([
        LinearLayer(N_IN, 8, rng=0, dtype=np.float32), ReluLayer(dtype=np.float32),
        LinearLayer(8, 8, rng=1, dtype=np.float64), ReluLayer(dtype=np.float64),
        LinearLayer(8, N_OUT, rng=2, dtype=np.float64), CrossEntropyLossLayer(dtype=np.float64),
    ])
    dp = DataParallel(net, comm=MPI.COMM_SELF, bucket_bytes=400)
    layout = [(bucket.dtype, bucket.ready_after, bucket.names) for bucket in dp.buckets]
    # Layer 4 (288 bytes) fills the first float64 bucket; layer 2 (576 bytes) is too
    # big to join it and gets its own; float32 layer 0 has its own series.
    assert layout == [
        (np.float64, 4, ["4.LinearLayer.w", "4.LinearLayer.b"]),
        (np.float64, 2, ["2.LinearLayer.w", "2.LinearLayer.b"]),
        (np.float32, 0, ["0.LinearLayer.w", "0.LinearLayer.b"]),
    ]
    buckets_of = {name: bucket for bucket in dp.buckets for name in bucket.names}
    for name, param, grad in net.named_params():
        assert np.shares_memory(grad, buckets_of[name].buffer), name
        assert grad.dtype == param.dtype
    one_bucket = DataParallel(make_net(seed=0), comm=MPI.COMM_SELF)
    assert len(one_bucket.buckets) == 1
    x, y = make_data(5)
    dp(x, y)
    dp.backward()
    dp.step(lr=0.1)
    assert dp.timings["reduced_bytes"] == sum(bucket.nbytes for bucket in dp.buckets)


def test_misuse_raises_clear_errors():
    x, y = make_data(4)
    net = make_net(seed=0)
    dp = DataParallel(net, SGD(net, lr=0.1), comm=MPI.COMM_SELF)
    with pytest.raises(RuntimeError, match="before a forward"):
        dp.backward()
    with pytest.raises(RuntimeError, match="no backward since the last step"):
        dp.step()
    dp(x, y)
    dp.backward()
    with pytest.raises(RuntimeError, match="call step"):
        dp.backward(local_batch_size=4, global_batch_size=4)
    with pytest.raises(ValueError, match="set optimizer.lr"):
        dp.step(lr=0.5)
    dp.step()
    dp(x, y)
    with pytest.raises(ValueError, match="local_batch_size <= global_batch_size"):
        dp.backward(global_batch_size=2)
    with pytest.raises(ValueError, match="bucket_bytes"):
        DataParallel(make_net(seed=0), comm=MPI.COMM_SELF, bucket_bytes=0)
    with pytest.raises(ValueError, match="another net"):
        DataParallel(make_net(seed=0), SGD(net, lr=0.1), comm=MPI.COMM_SELF)
    net.astype(np.float32)
    dp(x, y)
    with pytest.raises(RuntimeError, match="cast the net before"):
        dp.backward()


def test_timings_count_and_reset():
    x, y = make_data(4)
    dp = DataParallel(make_net(seed=0), comm=MPI.COMM_SELF)
    dp(x, y)
    dp.backward()
    dp.step(lr=0.1)
    assert dp.timings["steps"] == 1
    assert all(value >= 0 for value in dp.timings.values())
    assert set(dp.timings) == {"compute_s", "comm_s", "wait_s", "optimizer_s", "steps", "reduced_bytes"}
    dp.reset_timings()
    assert set(dp.timings.values()) == {0}
