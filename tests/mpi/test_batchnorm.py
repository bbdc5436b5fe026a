"""BatchNormLayer on N ranks equals one process: the statistics are the global batch's.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_batchnorm.py`` for
N = 1, 2, 3. Each rank computes the one-process reference itself (the same net on
the whole global batch) and compares in float64, parameters and running statistics,
every step; uneven shards (64 as 22/21/21 on 3 ranks) and empty ones included. A
control shows that per-rank statistics would not pass.
"""
import hashlib

import numpy as np
import pytest
from mpi4py import MPI

import mnn.layer
from mnn import SGD, BatchNormLayer, CrossEntropyLossLayer, LinearLayer, ReluLayer, ReshapeLayer, SequentialLayers
from mnn.distributed.comm import get_communicator
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.sampler import GlobalBatchSampler
from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.trainer import train
from mnn.io import load_arrays

F64 = np.float64
N_IN, N_OUT = 12, 4


def linear_net(seed):
    return [LinearLayer(N_IN, 10, rng=seed, dtype=F64), BatchNormLayer(10, dtype=F64), ReluLayer(dtype=F64),
            LinearLayer(10, N_OUT, rng=seed + 1, dtype=F64)]


def spatial_net(seed):
    """BatchNorm over (B, C, H, W) = (B, 3, 2, 2), after a Linear layer."""
    return [LinearLayer(N_IN, 12, rng=seed, dtype=F64), ReshapeLayer(3, 2, 2, dtype=F64),
            BatchNormLayer(3, dtype=F64), ReluLayer(dtype=F64), ReshapeLayer(12, dtype=F64),
            LinearLayer(12, N_OUT, rng=seed + 1, dtype=F64)]


def cnn(seed):
    """A small CNN: (1, 3, 4) images, a 2x2 convolution with padding 1 to (3, 4, 5), BatchNorm."""
    return [ReshapeLayer(1, 3, 4, dtype=F64), mnn.layer.Conv2DLayer(1, 3, 2, padding=1, dtype=F64, rng=seed),
            BatchNormLayer(3, dtype=F64), ReluLayer(dtype=F64), ReshapeLayer(60, dtype=F64),
            LinearLayer(60, N_OUT, rng=seed + 1, dtype=F64)]


NETS = {"linear": linear_net, "spatial": spatial_net,
        "cnn": pytest.param(cnn, marks=pytest.mark.skipif(not hasattr(mnn.layer, "Conv2DLayer"),
                                                          reason="no Conv2DLayer in mnn.layer"))}


def make_net(kind, seed):
    return SequentialLayers([*kind(seed), CrossEntropyLossLayer(dtype=F64)])


def make_data(num_samples, seed=11):
    rng = np.random.default_rng(seed)
    # Features far from mean 0 and variance 1, so that the statistics matter.
    return rng.standard_normal((num_samples, N_IN)) * 3 + 2, rng.integers(0, N_OUT, num_samples)


def model_state(net):
    return net.state_dict()  # parameters and running statistics


def assert_identical_on_all_ranks(comm, net):
    digest = hashlib.sha256()
    for name, value in sorted(model_state(net).items()):
        digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
    digests = comm.allgather(digest.hexdigest())
    assert len(set(digests)) == 1, f"parameters or running statistics differ across ranks: {digests}"


def largest_difference(net, reference):
    expected = model_state(reference)
    return max(float(np.max(np.abs(value - expected[name]))) for name, value in model_state(net).items())


def train_side_by_side(comm, kind, num_samples, batch_size, epochs=1, per_rank_statistics=False):
    """Train on the ranks of comm and, on each rank, one process on the whole global
    batches; yield (net, reference) after every step."""
    x, y = make_data(num_samples)
    net = make_net(kind, seed=10 + comm.rank)  # ranks start different: construction broadcasts
    dp = DataParallel(net, SGD(net, lr=0.1, momentum=0.9), comm=comm, bucket_bytes=256)
    if per_rank_statistics:
        net.set_batch_reduction(None)
    reference = make_net(kind, seed=10)
    reference_optimizer = SGD(reference, lr=0.1, momentum=0.9)
    sampler = GlobalBatchSampler(num_samples, batch_size, rank=comm.rank, world_size=comm.size, seed=4)
    for epoch in range(epochs):
        for batch in sampler.batches(epoch):
            net.start_batch(batch.step, batch.offset)
            dp(x[batch.indices], y[batch.indices])
            dp.backward(global_batch_size=batch.global_batch_size)
            dp.step()
            full = sampler.global_batch(epoch, batch.step)
            reference(x[full], y[full])
            reference.backward()
            reference_optimizer.step()
            reference_optimizer.zero_grads()
            yield net, reference


@pytest.mark.mpi
@pytest.mark.parametrize("kind", list(NETS.values()), ids=list(NETS))
@pytest.mark.parametrize("num_samples, batch_size", [(134, 64), (51, 7)])
def test_batchnorm_trains_the_same_on_any_number_of_ranks(comm, kind, num_samples, batch_size):
    # 134 = 2*64 + 6: 64 splits 32/32 on 2 ranks and 22/21/21 on 3; 51 = 7*7 + 2: the last
    # global batch of two samples leaves one rank of three with an empty shard.
    steps = 0
    for net, reference in train_side_by_side(comm, kind, num_samples, batch_size, epochs=2):
        assert_identical_on_all_ranks(comm, net)
        assert largest_difference(net, reference) < 1e-9
        steps += 1
    assert steps == 2 * -(-num_samples // batch_size)
    running_vars = [value for name, value in net.state_dict().items() if name.endswith("running_var")]
    assert len(running_vars) == 1 and not np.allclose(running_vars[0], 1)  # the batches moved them


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", [linear_net, spatial_net], ids=["linear", "spatial"])
def test_per_rank_statistics_would_not_train_the_same(comm, kind):
    """The control: the same run with each rank's own batch statistics leaves one process
    behind at once, so the comparison above can fail."""
    for net, reference in train_side_by_side(comm, kind, 134, 64, per_rank_statistics=True):
        assert largest_difference(net, reference) > 1e-6
        break


@pytest.mark.mpi
def test_train_saves_the_global_running_statistics(comm, shared_dir):
    """mnn-train on the digits: model.npz and the checkpoint hold the running statistics,
    the same on N ranks as alone; 1438 samples in batches of 64 (22/21/21 on 3 ranks)."""
    model = {"layers": [{"type": "LinearLayer", "shape": [64, 32]}, {"type": "BatchNormLayer", "channels": 32},
                        {"type": "ReluLayer"}, {"type": "LinearLayer", "shape": [32, 10]},
                        {"type": "CrossEntropyLossLayer"}]}
    base = dict(batch_size=64, epochs=1, lr=0.05, optimizer="momentum", dtype="float64", log_every=5, model=model)
    together = train(TrainConfig(**base, output=str(shared_dir / "bn")), comm)
    alone_dir = shared_dir / f"bn-alone{comm.rank}"
    train(TrainConfig(**base, output=str(alone_dir)), get_communicator(MPI.COMM_SELF))
    comm.barrier()
    got, expected = load_arrays(shared_dir / "bn" / "model.npz"), load_arrays(alone_dir / "model.npz")
    assert "1.BatchNormLayer.running_mean" in got and "1.BatchNormLayer.running_var" in got
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    saved = load_checkpoint(shared_dir / "bn" / "checkpoint.npz").model_state
    np.testing.assert_array_equal(saved["1.BatchNormLayer.running_var"], got["1.BatchNormLayer.running_var"])
    assert together["test_accuracy"] > 0.3
