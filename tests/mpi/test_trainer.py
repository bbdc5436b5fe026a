"""train() on real MPI processes: exact resume, rank-count independence, clean failures.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_trainer.py`` for
N = 1, 2, 3. Every rank calls train() with the same config; rank 0 writes the
output directory, which all ranks then read from a shared temporary folder.
"""
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mnn.datasets import load_dataset
from mnn.distributed.checkpoint import load_checkpoint
from mnn.distributed.comm import get_communicator
from mnn.distributed.config import TrainConfig
from mnn.distributed.trainer import JobConfigError, build_net, evaluate, train
from mnn.io import load_arrays

# 1438 training samples in batches of 100: 15 steps per epoch, the last one of 38
# samples, so uneven and partial shards are part of every run.
BASE = dict(layers=[64, 32, 10], batch_size=100, epochs=2, lr=0.05, optimizer="momentum",
            weight_decay=1e-4, warmup_epochs=0.5, dtype="float64", log_every=4)
STEPS_PER_EPOCH = 15


@pytest.fixture(name="comm")
def comm_fixture():
    return get_communicator(MPI.COMM_WORLD)


@pytest.fixture(name="shared_dir")
def shared_dir_fixture(comm, tmp_path):
    """One temporary folder for all ranks (rank 0's), so every rank can read the outputs."""
    return Path(comm.allgather(str(tmp_path) if comm.rank == 0 else None)[0])


def run(comm, **changes):
    summary = train(TrainConfig(**{**BASE, **changes}), comm)
    comm.barrier()  # rank 0's files are complete before anyone reads them
    return summary


def assert_bitwise_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].tobytes() == expected[key].tobytes(), f"{key} differs"


@pytest.mark.mpi
@pytest.mark.parametrize("stop_after", [STEPS_PER_EPOCH + 4, STEPS_PER_EPOCH])
def test_resume_is_bitwise_equal_to_uninterrupted_run(comm, shared_dir, stop_after):
    full = run(comm, output=str(shared_dir / "full"))
    stopped = run(comm, output=str(shared_dir / "resumed"), max_steps=stop_after)
    assert stopped["stopped_early"] and stopped["steps"] == stop_after
    position = load_checkpoint(shared_dir / "resumed" / "checkpoint.npz")
    assert (position.epoch, position.step_in_epoch) == divmod(stop_after, STEPS_PER_EPOCH)

    resumed = run(comm, output=str(shared_dir / "resumed"), resume=True)

    assert resumed["resumed_from"] == str(shared_dir / "resumed" / "checkpoint.npz")
    assert resumed["steps"] == full["steps"] == 2 * STEPS_PER_EPOCH
    assert not resumed["stopped_early"]
    assert_bitwise_equal(load_arrays(shared_dir / "resumed" / "model.npz"),
                         load_arrays(shared_dir / "full" / "model.npz"))
    final_full = load_checkpoint(shared_dir / "full" / "checkpoint.npz")
    final_resumed = load_checkpoint(shared_dir / "resumed" / "checkpoint.npz")
    assert_bitwise_equal(final_resumed.optimizer_state, final_full.optimizer_state)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["test_loss"] == full["test_loss"]


@pytest.mark.mpi
def test_result_does_not_depend_on_the_number_of_ranks(comm, shared_dir):
    distributed = run(comm, output=str(shared_dir / "world"))
    # Every rank also trains alone; the global batches are the same, so only the
    # order of floating-point sums differs.
    alone = train(TrainConfig(**BASE, output=str(shared_dir / f"alone{comm.rank}")),
                  get_communicator(MPI.COMM_SELF))
    comm.barrier()
    assert alone["world_size"] == 1 and distributed["world_size"] == comm.size
    expected = load_arrays(shared_dir / f"alone{comm.rank}" / "model.npz")
    got = load_arrays(shared_dir / "world" / "model.npz")
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert distributed["test_accuracy"] == alone["test_accuracy"]
    assert distributed["samples_seen"] == alone["samples_seen"] == 2 * 1438


@pytest.mark.mpi(min_size=2)
def test_checkpoint_from_n_ranks_resumes_on_one(comm, shared_dir):
    full = run(comm, output=str(shared_dir / "full"))
    run(comm, output=str(shared_dir / "part"), max_steps=STEPS_PER_EPOCH + 3)
    if comm.rank == 0:
        resumed = train(TrainConfig(**BASE, output=str(shared_dir / "rest"),
                                    resume=str(shared_dir / "part" / "checkpoint.npz")),
                        get_communicator(MPI.COMM_SELF))
        assert resumed["world_size"] == 1 and resumed["steps"] == full["steps"]
        expected = load_arrays(shared_dir / "full" / "model.npz")
        got = load_arrays(shared_dir / "rest" / "model.npz")
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    comm.barrier()


@pytest.mark.mpi
def test_evaluation_counts_every_test_sample_once(comm):
    config = TrainConfig(**BASE)
    net, split = build_net(config), load_dataset("digits").test
    sharded = evaluate(net, split, config, comm)
    alone = evaluate(net, split, config, get_communicator(MPI.COMM_SELF))
    assert sharded["samples"] == alone["samples"] == len(split)
    assert sharded["accuracy"] == alone["accuracy"]
    assert sharded["loss"] == pytest.approx(alone["loss"], rel=1e-12)


@pytest.mark.mpi
def test_layers_not_matching_the_dataset_stop_every_rank(comm):
    with pytest.raises(JobConfigError, match="the first width must equal the dataset's 64 features"):
        train(TrainConfig(**{**BASE, "layers": [60, 10]}), comm)
    with pytest.raises(JobConfigError, match=r"expected labels in \[0, 5\)"):
        train(TrainConfig(**{**BASE, "layers": [64, 5]}), comm)


@pytest.mark.mpi
def test_unwritable_output_stops_every_rank_before_training(comm, shared_dir):
    # A path below a regular file cannot be created, even by root.
    blocker = shared_dir / "a_file"
    if comm.rank == 0:
        blocker.write_text("not a directory")
    comm.barrier()
    with pytest.raises(JobConfigError, match="is not writable"):
        train(TrainConfig(**BASE, output=str(blocker / "run")), comm)


@pytest.mark.mpi
def test_resume_with_changed_batch_size_is_refused(comm, shared_dir):
    run(comm, output=str(shared_dir / "a"), max_steps=2)
    with pytest.raises(JobConfigError, match="batch_size: checkpoint has 100, this job 50"):
        run(comm, output=str(shared_dir / "a"), resume=True, batch_size=50)
    with pytest.raises(JobConfigError, match="does not exist"):
        run(comm, resume=str(shared_dir / "missing.npz"))
