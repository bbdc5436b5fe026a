"""A GPT-style character model through train(): N ranks equal one process, dropout included.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_gpt.py`` for N = 1, 2, 3.
"""
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.distributed.comm import get_communicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.trainer import train
from mnn.io import load_arrays

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
# Global batches of 7 windows: uneven shards on 2 and 3 ranks.
BASE = dict(epochs=2, steps_per_epoch=4, batch_size=7, optimizer="momentum", lr=0.05, dtype="float64",
            log_every=2, model={"gpt": {"n_layers": 2, "d_model": 16, "n_heads": 2, "context": 8, "dropout": 0.2}})


@pytest.fixture(name="corpus")
def corpus_fixture(comm, tmp_path):
    """A small text file in one folder all ranks see (rank 0's)."""
    folder = Path(comm.allgather(str(tmp_path) if comm.rank == 0 else None)[0])
    if comm.rank == 0:
        (folder / "code.py").write_text(TEXT)
    comm.barrier()
    return folder


def config(corpus, name, **changes):
    return TrainConfig(**{**BASE, "dataset": f"text:{corpus / 'code.py'}", "output": str(corpus / name), **changes})


@pytest.mark.mpi
def test_gpt_with_dropout_trains_the_same_on_any_number_of_ranks(comm, corpus):
    together = train(config(corpus, "world"), comm)
    alone = train(config(corpus, f"alone{comm.rank}"), get_communicator(MPI.COMM_SELF))
    comm.barrier()
    expected, got = load_arrays(corpus / f"alone{comm.rank}" / "model.npz"), load_arrays(corpus / "world" / "model.npz")
    assert got.keys() == expected.keys() and "3.Residual.0.LayerNormLayer.g" in got
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert together["test_bits_per_char"] == pytest.approx(alone["test_bits_per_char"], rel=1e-9)
    # Dropout is on in training: without it the parameters would differ.
    without = train(config(corpus, f"nodrop{comm.rank}", model={"gpt": {**BASE["model"]["gpt"], "dropout": 0.0}}),
                    get_communicator(MPI.COMM_SELF))
    comm.barrier()
    other = load_arrays(corpus / f"nodrop{comm.rank}" / "model.npz")
    assert not np.allclose(other["0.EmbeddingLayer.w"], expected["0.EmbeddingLayer.w"], rtol=1e-6)
    assert without["steps"] == together["steps"] == 8


@pytest.mark.mpi
def test_gpt_checkpoint_resumes_exactly_on_another_number_of_ranks(comm, corpus):
    full = train(config(corpus, "full"), comm)
    train(config(corpus, "part", max_steps=5), comm)
    comm.barrier()
    # The rest of the run on one process, from the N-rank checkpoint (mid-epoch: step 5 of 8).
    if comm.rank == 0:
        assert load_checkpoint(corpus / "part" / "checkpoint.npz").position.global_step == 5
        rest = train(config(corpus, "rest", resume=str(corpus / "part" / "checkpoint.npz")),
                     get_communicator(MPI.COMM_SELF))
        assert rest["steps"] == full["steps"]
        expected, got = load_arrays(corpus / "full" / "model.npz"), load_arrays(corpus / "rest" / "model.npz")
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-12, err_msg=key)
    comm.barrier()
