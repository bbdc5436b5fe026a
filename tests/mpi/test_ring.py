"""The ring all-reduce on real MPI processes: it equals MPI's Allreduce, and DataParallel
trains the same parameters with it; float16 compression stays close and is float16 on the wire.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_ring.py`` for N = 1, 2, 3.
"""
import contextlib
import hashlib

import numpy as np
import pytest
from mpi4py import MPI

from mnn import SGD, CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.distributed.comm import Communicator, SingleProcessCommunicator, get_communicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.ring import RingAllreduce, ring_chunk_bounds
from mnn.distributed.sampler import GlobalBatchSampler
from mnn.distributed.training.trainer import train
from mnn.io import load_arrays

# Lengths that 2 and 3 divide (6, 600), that they do not (5, 7, 1001), and below 3 ranks (1, 2).
LENGTHS = [0, 1, 2, 5, 6, 7, 600, 1001]
# Unit roundoff of float16: a rounding to it errs by at most this much, relatively.
FP16_ROUNDOFF = 2.0**-11


@pytest.fixture(params=["world", "self"])
def comm(request):
    """COMM_WORLD, and COMM_SELF: a world of one, in which the ring sends nothing."""
    return get_communicator(MPI.COMM_WORLD if request.param == "world" else MPI.COMM_SELF)


class CountingCommunicator(Communicator):
    """``comm`` that remembers the dtype and size of every array it sends point to point."""

    def __init__(self, comm):
        self._comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.sent = []  # (dtype, bytes) per sendrecv

    def sendrecv(self, send, dest, receive, source):
        self.sent.append((send.dtype, send.nbytes))
        return self._comm.sendrecv(send, dest, receive, source)


def mpi_sum(comm, array):
    reference = array.copy()
    comm.comm.Allreduce(MPI.IN_PLACE, reference, op=MPI.SUM)
    return reference


def assert_same_on_all_ranks(comm, array):
    digests = comm.allgather(hashlib.sha256(array.tobytes()).hexdigest())
    assert len(set(digests)) == 1, "ranks ended with different values"


def test_chunks_differ_by_at_most_one_and_cover_the_buffer():
    for n in range(0, 12):
        for p in range(1, 5):
            sizes = np.diff(ring_chunk_bounds(n, p))
            assert len(sizes) == p and sizes.sum() == n and sizes.max() - sizes.min() <= 1
            assert list(sizes) == sorted(sizes, reverse=True)  # the longer chunks first


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ring_equals_mpi_allreduce(comm, n, dtype):
    # Positive values, so that a relative tolerance means something (no cancellation).
    x = np.random.default_rng(10 * comm.rank + n).uniform(0.5, 1.5, n).astype(dtype)
    expected = mpi_sum(comm, x)
    got = x.copy()
    assert RingAllreduce(comm, n, dtype).allreduce(got) is got
    if comm.size <= 2:
        # One addition per element, a + b = b + a: the same bits as MPI's.
        assert got.tobytes() == expected.tobytes()
    else:
        # Another order of the additions: both within a few roundings of the exact sum.
        np.testing.assert_allclose(got, expected, rtol=1e-12 if dtype == np.float64 else 1e-6)
    assert_same_on_all_ranks(comm, got)


@pytest.mark.parametrize("n", LENGTHS)
def test_ring_is_exact_on_integers_in_any_order(comm, n):
    x = np.random.default_rng(comm.rank).integers(-1000, 1000, n).astype(np.float64)
    got = RingAllreduce(comm, n, np.float64).allreduce(x.copy())
    assert got.tobytes() == mpi_sum(comm, x).tobytes()


def test_a_ring_is_reused_and_one_without_a_size_fits_each_buffer(comm):
    sized = RingAllreduce(comm, 7, np.float32)
    any_size = RingAllreduce(comm)
    for round_ in range(3):
        for n, dtype in [(7, np.float32), (1001, np.float64), (2, np.float32)]:
            x = np.random.default_rng(comm.rank + round_).uniform(0.5, 1.5, n).astype(dtype)
            expected = mpi_sum(comm, x)
            if n == 7:
                np.testing.assert_allclose(sized.allreduce(x.copy()), expected, rtol=1e-6)
            np.testing.assert_allclose(any_size.allreduce(x.copy()), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype, compression, item_bytes", [(np.float32, "none", 4), (np.float64, "none", 8),
                                                           (np.float32, "fp16", 2), (np.float64, "fp16", 2)])
def test_bytes_on_the_wire(comm, dtype, compression, item_bytes):
    """Each rank sends 2(p-1) chunks, 2 (p-1)/p n items (Eq. 4), in the wire's dtype."""
    n = 600  # divisible by 1, 2 and 3
    counting = CountingCommunicator(comm)
    ring = RingAllreduce(counting, n, dtype, compression=compression)
    ring.allreduce(np.ones(n, dtype=dtype))
    p = comm.size
    assert sum(nbytes for _, nbytes in counting.sent) == ring.wire_bytes == 2 * (p - 1) * n // p * item_bytes
    assert len(counting.sent) == 2 * (p - 1)
    assert {dtype for dtype, _ in counting.sent} <= {np.dtype(np.float16 if compression == "fp16" else dtype)}


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16_compression_is_close_and_the_same_everywhere(comm, n, dtype):
    x = np.random.default_rng(comm.rank + 7).standard_normal(n).astype(dtype)
    exact = mpi_sum(comm, x.astype(np.float64))
    magnitude = mpi_sum(comm, np.abs(x).astype(np.float64))
    got = RingAllreduce(comm, n, dtype, compression="fp16").allreduce(x.copy())
    # p - 1 roundings of partial sums on the way, one of the finished sum: each errs by
    # at most FP16_ROUNDOFF of a value no larger than the sum of |x| (plus float16's
    # smallest subnormal, 6e-8, for values that small).
    bound = comm.size * FP16_ROUNDOFF * magnitude + 6e-8 * comm.size
    assert np.all(np.abs(got - exact) <= bound)
    if comm.size > 1 and n:
        assert not np.array_equal(got, exact.astype(dtype)), "nothing was rounded to float16"
    assert_same_on_all_ranks(comm, got)


@pytest.mark.mpi(min_size=2)
def test_fp16_overflow_becomes_infinite_on_every_rank(comm):
    if comm.size == 1:
        pytest.skip("on one rank nothing is sent, so nothing is rounded")
    x = np.full(5, 40000.0, dtype=np.float32)  # every value fits float16, their sum does not
    x[0] = 1.0
    with np.errstate(over="ignore"):  # NumPy warns of the overflow in the cast; the trainer ignores it
        got = RingAllreduce(comm, 5, np.float32, compression="fp16").allreduce(x)
    assert got[0] == comm.size and np.isinf(got[1:]).all()


def test_bad_arguments_are_clear_errors(comm):
    with pytest.raises(TypeError, match="float32 or float64"):
        RingAllreduce(comm, 4, np.int64)
    with pytest.raises(ValueError, match="n: expected an integer >= 0"):
        RingAllreduce(comm, -1, np.float32)
    with pytest.raises(ValueError, match="compression: expected one of none, fp16, got 'fp8'"):
        RingAllreduce(comm, 4, np.float32, compression="fp8")
    with pytest.raises(ValueError, match="both n and dtype"):
        RingAllreduce(comm, 4)
    ring = RingAllreduce(comm, 4, np.float32)
    for wrong in (np.zeros(5, np.float32), np.zeros(4, np.float64), np.zeros((2, 2), np.float32), [0.0] * 4):
        with pytest.raises(ValueError, match=r"expected a numpy array of shape \(4,\) and dtype float32"):
            ring.allreduce(wrong)
    with pytest.raises(ValueError, match="contiguous"):
        ring.allreduce(np.zeros(8, np.float32)[::2])


# ------------------------------------------------------------------ DataParallel and train()
def make_net(seed, dtype):
    return SequentialLayers([
        LinearLayer(6, 12, rng=seed, dtype=dtype), ReluLayer(dtype=dtype),
        LinearLayer(12, 8, rng=seed + 1, dtype=dtype), ReluLayer(dtype=dtype),
        LinearLayer(8, 4, rng=seed + 2, dtype=dtype), CrossEntropyLossLayer(dtype=dtype),
    ])


def train_steps(comm, dtype, steps=12, batch_size=10, **options):
    """Train the small MLP with momentum on fixed random data; its parameters, and the
    largest reduced gradient entry seen in any step."""
    rng = np.random.default_rng(123)
    x, y = rng.standard_normal((60, 6)).astype(dtype), rng.integers(0, 4, 60)
    net = make_net(seed=comm.rank, dtype=dtype)  # DataParallel broadcasts rank 0's
    # A small bucket_bytes: three buckets, so "mpi" overlaps two of them with backward.
    dp = DataParallel(net, SGD(net, lr=0.1, momentum=0.9), comm, bucket_bytes=300, **options)
    sampler = GlobalBatchSampler(len(x), batch_size, rank=comm.rank, world_size=comm.size, seed=1)
    largest_gradient = 0.0
    done = 0
    for epoch in range(steps):
        for batch in sampler.batches(epoch):
            dp(x[batch.indices], y[batch.indices])
            dp.backward(global_batch_size=batch.global_batch_size)
            dp.synchronize()
            largest_gradient = max(largest_gradient, max(np.abs(b.buffer).max() for b in dp.buckets))
            dp.step()
            done += 1
            if done == steps:
                return {name: param.copy() for name, param, _ in net.named_params()}, largest_gradient
    raise AssertionError("not enough batches")


def test_data_parallel_with_the_ring_trains_the_same_parameters_as_with_mpi(comm):
    with_mpi, _ = train_steps(comm, np.float64, allreduce="mpi")
    with_ring, _ = train_steps(comm, np.float64, allreduce="ring")
    for name, expected in with_mpi.items():
        np.testing.assert_allclose(with_ring[name], expected, rtol=1e-9, atol=1e-12, err_msg=name)
        assert_same_on_all_ranks(comm, with_ring[name])


def test_micro_batches_accumulated_without_sync_are_reduced_alike(comm):
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((30, 6)), rng.integers(0, 4, 30)
    grads = {}
    for allreduce in ("mpi", "ring"):
        net = make_net(seed=0, dtype=np.float64)
        dp = DataParallel(net, comm=comm, bucket_bytes=300, allreduce=allreduce)
        for start, stop in [(0, 12), (12, 20), (20, 30)]:  # micro-batches of 12, 8 and 10 samples
            shard = np.array_split(np.arange(start, stop), comm.size)[comm.rank]
            with dp.no_sync() if stop < 30 else contextlib.nullcontext():
                dp(x[shard], y[shard])
                dp.backward(global_batch_size=stop - start)
        dp.synchronize()
        grads[allreduce] = np.concatenate([bucket.buffer for bucket in dp.buckets])
    np.testing.assert_allclose(grads["ring"], grads["mpi"], rtol=1e-12, atol=1e-15)


def test_fp16_compression_trains_close_to_uncompressed(comm):
    steps, lr, momentum = 12, 0.1, 0.9
    exact, largest_gradient = train_steps(comm, np.float32, steps, allreduce="ring")
    compressed, _ = train_steps(comm, np.float32, steps, allreduce="ring", grad_compression="fp16")
    # Each reduced gradient entry errs by at most p roundings of FP16_ROUNDOFF of the largest
    # entry; momentum adds each step's error into every later update, at most 1/(1 - momentum)
    # times, so after k steps a parameter is off by at most k * lr / (1 - momentum) times that
    # (twice, for the feedback of the changed parameters into later gradients over so few steps).
    bound = 2 * steps * lr / (1 - momentum) * comm.size * FP16_ROUNDOFF * largest_gradient
    for name, expected in exact.items():
        assert np.abs(compressed[name] - expected).max() <= bound, name
        assert_same_on_all_ranks(comm, compressed[name])
    differs = any(not np.array_equal(compressed[name], exact[name]) for name in exact)
    assert differs == (comm.size > 1), "compression must change the sums exactly when something is sent"


def test_fp16_needs_the_ring(comm):
    net = make_net(0, np.float32)
    with pytest.raises(ValueError, match="fp16 needs allreduce='ring'"):
        DataParallel(net, comm=comm, grad_compression="fp16")
    with pytest.raises(ValueError, match="allreduce: expected one of mpi, ring, got 'ringg'"):
        DataParallel(net, comm=comm, allreduce="ringg")


@pytest.mark.mpi
def test_train_on_digits_with_the_ring_equals_mpi(tmp_path):
    comm = get_communicator(MPI.COMM_WORLD)
    shared = comm.broadcast_object(str(tmp_path))
    base = dict(layers=[64, 32, 10], batch_size=100, epochs=1, lr=0.05, optimizer="momentum",
                dtype="float64", bucket_bytes=4096)
    models = {}
    for allreduce in ("mpi", "ring"):
        summary = train(TrainConfig(**base, allreduce=allreduce, output=f"{shared}/{allreduce}"), comm)
        assert summary["steps"] == 15
        comm.barrier()
        models[allreduce] = load_arrays(f"{shared}/{allreduce}/model.npz")
    for key, expected in models["mpi"].items():
        np.testing.assert_allclose(models["ring"][key], expected, rtol=1e-9, atol=1e-12, err_msg=key)


# ------------------------------------------------------------------ the communicator's sendrecv
@pytest.mark.parametrize("kind", ["world", "self", "single"])
def test_sendrecv_passes_to_the_right_and_hears_from_the_left(kind):
    comm = SingleProcessCommunicator() if kind == "single" else \
        get_communicator(MPI.COMM_WORLD if kind == "world" else MPI.COMM_SELF)
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    received = np.zeros(3, dtype=np.float16)
    assert comm.sendrecv(np.full(3, comm.rank, dtype=np.float16), right, received, left) is received
    assert received.tolist() == [left] * 3
    big = np.zeros(8)
    comm.sendrecv(np.arange(4.0), right, big[2:6], left)  # a view into a larger buffer
    assert big.tolist() == [0, 0, 0, 1, 2, 3, 0, 0]
    with pytest.raises(ValueError, match=r"dest must be a rank in \[0, "):
        comm.sendrecv(received, comm.size, received, left)
    read_only = np.zeros(3, dtype=np.float16)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        comm.sendrecv(received, right, read_only, left)
