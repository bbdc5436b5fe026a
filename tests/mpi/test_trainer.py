"""train() on real MPI processes: exact resume, rank-count independence, clean failures.

Run as ``mpiexec -n N python -m pytest --with-mpi tests/mpi/test_trainer.py`` for
N = 1, 2, 3. Every rank calls train() with the same config; rank 0 writes the
output directory, which all ranks then read from a shared temporary folder.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mnn.datasets import load_dataset
from mnn.distributed.training.checkpoint import load_checkpoint, save_checkpoint
from mnn.distributed.comm import get_communicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.preflight import JobConfigError
from mnn.distributed.training.task import build_job_net, choose_task, evaluate
from mnn.distributed.training.reporting import Reporter
from mnn.distributed.training.trainer import TrainingDiverged, TrainingFailed, train
from mnn.io import load_arrays

# 1438 training samples in batches of 100: 15 steps per epoch, the last one of 38
# samples, so uneven and partial shards are part of every run.
BASE = dict(layers=[64, 32, 10], batch_size=100, epochs=2, lr=0.05, optimizer="momentum",
            weight_decay=1e-4, warmup_epochs=0.5, dtype="float64", log_every=4)
STEPS_PER_EPOCH = 15


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
    position = load_checkpoint(shared_dir / "resumed" / "checkpoint.npz").position
    assert (position.epochs_done, position.step_in_epoch) == divmod(stop_after, STEPS_PER_EPOCH)

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
    net, dataset = build_job_net(config), load_dataset("digits")
    task, split = choose_task(net, dataset, config.dtype), dataset.test
    sharded = evaluate(net, split, task, comm)
    alone = evaluate(net, split, task, get_communicator(MPI.COMM_SELF))
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
    with pytest.raises(JobConfigError, match="'.*a_file' is a file, not a directory"):
        train(TrainConfig(**BASE, output=str(blocker)), comm)


@pytest.mark.mpi
def test_a_metrics_file_rank_0_cannot_write_stops_every_rank_after_the_same_step(comm, shared_dir, monkeypatch,
                                                                                  capsys):
    output = shared_dir / "metrics_gone"
    run(comm, output=str(output), epochs=1)
    log_train = Reporter.train

    def log_then_lose_the_file(self, *args, **kwargs):
        log_train(self, *args, **kwargs)
        if self.metrics_path is not None and self.metrics_path.is_file():
            self.metrics_path.unlink()  # a folder in its place: appending to it fails
            self.metrics_path.mkdir()
    monkeypatch.setattr(Reporter, "train", log_then_lose_the_file)
    with pytest.raises(TrainingFailed) as failed:
        run(comm, output=str(output), epochs=2, resume=True)
    assert not isinstance(failed.value, TrainingDiverged)
    if comm.rank == 0:
        # train events at global steps 16, 20, 24 (log_every 4): the one of step 20 (epoch 2 step 5)
        # cannot be written, and every rank learns it at the next one's all-reduce
        assert str(failed.value).startswith(f"cannot write {output / 'metrics.jsonl'}: [Errno 21] Is a directory")
        assert f"training stopped at epoch 2/2 step 9/{STEPS_PER_EPOCH}; the last checkpoint is " \
               f"{output / 'checkpoint.npz'}, at the end of epoch 1/2: continue with --resume once" in str(failed.value)
    assert load_checkpoint(output / "checkpoint.npz").position.epochs_done == 1


@pytest.mark.mpi
def test_skipped_steps_are_bounded_and_counted(comm, shared_dir):
    with pytest.raises(TrainingDiverged, match="3 steps in a row were not finite"):
        run(comm, output=str(shared_dir / "skips"), lr=1e12, on_nonfinite="skip", max_skipped_steps=3)
    summary = run(comm, output=str(shared_dir / "skips_unbounded"), lr=1e100, on_nonfinite="skip",
                  max_skipped_steps=0, epochs=1)
    skipped = [event for event in read_events(shared_dir / "skips_unbounded" / "metrics.jsonl")
               if event["event"] == "nonfinite"]
    assert summary["skipped_steps"] == len(skipped) > 0


def read_events(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.mpi
def test_epochs_are_counted_one_way_in_metrics_and_lines(comm, shared_dir, capsys):
    # 15 steps per epoch: stopping after 19 leaves epoch 2 partial (4 of its 15 steps).
    run(comm, output=str(shared_dir / "m"), max_steps=STEPS_PER_EPOCH + 4)
    events = read_events(shared_dir / "m" / "metrics.jsonl")
    train_events = [event for event in events if event["event"] == "train"]
    assert [(e["epoch"], e["step_in_epoch"], e["global_step"]) for e in train_events] == [
        (1, 4, 4), (1, 8, 8), (1, 12, 12), (1, 15, 15), (2, 1, 16), (2, 4, 19)]
    evals = [event for event in events if event["event"] == "eval"]
    assert [(e["epoch"], e["step_in_epoch"], e["epochs_done"]) for e in evals] == [
        (1, 15, 1), (2, 4, 1)]
    assert events[-1]["event"] == "summary" and events[-1]["epochs"] == 1
    if comm.rank == 0:
        lines = [line for line in capsys.readouterr().out.splitlines() if "test accuracy" in line]
        assert lines[0].startswith("epoch 1/2 | ")
        assert lines[1].startswith("epoch 2/2 (partial, step 4/15) | ")


@pytest.mark.mpi
def test_resume_lists_the_settings_that_changed(comm, shared_dir, capsys):
    run(comm, output=str(shared_dir / "c"), max_steps=3)
    capsys.readouterr()
    run(comm, output=str(shared_dir / "c"), resume=True, lr=0.02, eval_every=2)
    resume = read_events(shared_dir / "c" / "metrics.jsonl")
    resume = [event for event in resume if event["event"] == "resume"]
    assert len(resume) == 1
    assert resume[0]["changed"] == {"lr": [0.05, 0.02], "eval_every": [1, 2], "max_steps": [3, None]}
    assert (resume[0]["epoch"], resume[0]["step_in_epoch"], resume[0]["epochs_done"]) == (1, 3, 0)
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert "resumed from " in out and "at epoch 1/2 step 3/15" in out
        assert "settings changed since the checkpoint: lr 0.05 -> 0.02, eval_every 1 -> 2, " \
               "max_steps 3 -> None" in out
    else:
        assert out == ""


@pytest.mark.mpi
def test_resuming_a_finished_run_trains_nothing_and_says_so(comm, shared_dir, capsys):
    finished = run(comm, output=str(shared_dir / "f"))
    before = {name: (shared_dir / "f" / name).read_bytes()
              for name in ("metrics.jsonl", "summary.json", "checkpoint.npz", "model.npz")}
    capsys.readouterr()
    again = run(comm, output=str(shared_dir / "f"), resume=True)
    out = capsys.readouterr().out
    checkpoint = shared_dir / "f" / "checkpoint.npz"
    if comm.rank == 0:
        assert out == (f"checkpoint {checkpoint} is at the end of epoch 2 of 2: nothing left to "
                       f"train; raise --epochs to train further\n")
    assert again["steps"] == finished["steps"] and again["samples_per_s"] == 0.0
    assert again["test_accuracy"] == finished["test_accuracy"]
    for name, content in before.items():
        assert (shared_dir / "f" / name).read_bytes() == content, f"{name} was rewritten"

    more = run(comm, output=str(shared_dir / "f"), resume=True, epochs=3,
               max_steps=2 * STEPS_PER_EPOCH)
    assert more["steps"] == finished["steps"]
    if comm.rank == 0:
        assert "max_steps is 30: nothing left to train; raise --max-steps" in capsys.readouterr().out


@pytest.mark.mpi
def test_checkpoint_with_an_invalid_stored_config_is_refused(comm, shared_dir):
    run(comm, output=str(shared_dir / "bad"), max_steps=2)
    path = shared_dir / "bad" / "checkpoint.npz"
    if comm.rank == 0:
        checkpoint = load_checkpoint(path)
        checkpoint.config["lr"] = -1.0
        save_checkpoint(path, checkpoint)
    comm.barrier()
    with pytest.raises(JobConfigError, match="its stored config is not a valid job: lr: expected a "
                                             "positive number, got -1.0"):
        run(comm, output=str(shared_dir / "bad"), resume=True)
    if comm.rank == 0:
        checkpoint.config["lr"] = 0.05
        checkpoint.config["learning_rate"] = 0.05
        save_checkpoint(path, checkpoint)
    comm.barrier()
    with pytest.raises(JobConfigError, match="unknown key.*'learning_rate'"):
        run(comm, output=str(shared_dir / "bad"), resume=True)


@pytest.mark.mpi
def test_resume_with_changed_batch_size_is_refused(comm, shared_dir):
    run(comm, output=str(shared_dir / "a"), max_steps=2)
    with pytest.raises(JobConfigError, match="batch_size: checkpoint has 100, this job 50"):
        run(comm, output=str(shared_dir / "a"), resume=True, batch_size=50)
    with pytest.raises(JobConfigError, match="does not exist"):
        run(comm, resume=str(shared_dir / "missing.npz"))
