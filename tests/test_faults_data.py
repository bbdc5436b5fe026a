"""What happens when the data or a checkpoint is not what the run was trained on: real
mnn-train processes (under mpiexec where ranks matter, both MPIs), one clear line, exit 2.

A text that changed after training, ranks that read different copies of a text,
a resume that changes the model or the length of an epoch, a checkpoint whose
weights hold NaN.
"""
import json
import shutil
import subprocess

import numpy as np
import pytest
import tomli_w

from mnn.distributed.training.checkpoint import load_checkpoint
from mnn.distributed.comm import SingleProcessCommunicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.trainer import train
from mnn.io import load_arrays, save_arrays
from processes import ENV, TRAIN, mpiexec, needs_mpiexec, run

TEXT = "def add(a, b):\n    return a + b\n\n" * 40  # 16 characters
GPT = {"gpt": {"n_layers": 1, "d_model": 16, "n_heads": 2, "context": 16}}
JOB = {"epochs": 2, "steps_per_epoch": 4, "batch_size": 8, "optimizer": "adam", "lr": 0.01,
       "keep_checkpoints": 2, "model": GPT}


def the_only_error(result):
    """The one ``mnn-train: error:`` line of a refused job (exit 2), without a traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("mnn-train: error:") == 1, result.stderr
    return result.stderr


@pytest.fixture(name="trained", scope="module")
def trained_fixture(tmp_path_factory):
    """A GPT trained 2 epochs of 4 steps on a text file, with 2 checkpoints; its job file."""
    folder = tmp_path_factory.mktemp("text")
    (folder / "code.py").write_text(TEXT)
    job = folder / "job.toml"
    job.write_text(tomli_w.dumps({**JOB, "dataset": f"text:{folder / 'code.py'}"}))
    train(TrainConfig(**JOB, dataset=f"text:{folder / 'code.py'}", output=str(folder / "run")),
          SingleProcessCommunicator())
    return folder, job


@pytest.fixture(name="copy")
def copy_fixture(trained, tmp_path):
    """A copy of the trained run and its text, to change: (text file, job file, output)."""
    folder, job = trained
    shutil.copy(folder / "code.py", tmp_path / "code.py")
    shutil.copytree(folder / "run", tmp_path / "run")
    values = {**JOB, "dataset": f"text:{tmp_path / 'code.py'}"}
    (tmp_path / "job.toml").write_text(tomli_w.dumps(values))
    # The checkpoint names the text it was trained on by path: point it at the copy.
    for checkpoint in (tmp_path / "run").glob("checkpoint*.npz"):
        arrays = load_arrays(checkpoint)
        config = json.loads(arrays["config_json"].tobytes())
        config["dataset"] = values["dataset"]
        arrays["config_json"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
        save_arrays(checkpoint, arrays)
    return tmp_path / "code.py", tmp_path / "job.toml", tmp_path / "run"


def resume(job, output, *options):
    return run(["--config", str(job), "--output", str(output), "--resume", "--epochs", "3", *options])


def test_the_run_records_the_text_it_trained_on(trained):
    folder, _ = trained
    saved = load_checkpoint(folder / "run" / "checkpoint.npz").config["text_fingerprint"]
    assert saved["chars"] == "".join(sorted(set(TEXT))) and len(saved["sha256"]) == 64
    assert "[text_fingerprint]" in (folder / "run" / "config.toml").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda text: text.replace("add", "dda"),
     "its 16 characters are the same, but the text is not (SHA-256 "),
    (lambda text: text.replace("a", "z"),  # as many characters, another mapping
     "its characters changed (16 characters, recorded 16; gained 'z'; lost 'a'), so a token id would mean "
     "another character"),
    (lambda text: text + "é",
     "its characters changed (17 characters, recorded 16; gained 'é')"),
])
def test_resuming_on_a_text_that_changed_is_refused_naming_it(copy, change, message):
    """The trial's case: after the text changed, --resume carried on with another mapping (or,
    with more characters, said "rank 0: KeyError: 'layers'")."""
    text_file, job, output = copy
    text_file.write_text(change(TEXT))
    error = the_only_error(resume(job, output))
    assert f"cannot resume from {str(output / 'checkpoint.npz')!r}: the text of dataset 'text:{text_file}' is " \
           f"not the one the checkpoint was trained on: {message}" in error
    assert "restore that text, or train afresh" in error


def test_a_gpt_resumed_with_other_sizes_names_them(copy):
    _, job, output = copy
    values = {**JOB, "dataset": f"text:{job.parent / 'code.py'}",
              "model": {"gpt": {**GPT["gpt"], "n_layers": 2, "d_model": 32}}}
    job.write_text(tomli_w.dumps(values))
    error = the_only_error(resume(job, output))
    assert "these settings must match the checkpoint's: model.gpt.d_model: checkpoint has 16, this job 32; " \
           "model.gpt.n_layers: checkpoint has 1, this job 2" in error


@pytest.mark.slow
def test_an_mlp_resumed_with_other_layers_names_both(tmp_path):
    first = run(["--max-steps", "2", "--output", str(tmp_path)])
    assert first.returncode == 0, first.stderr
    error = the_only_error(run(["--layers", "64,32,10", "--output", str(tmp_path), "--resume"]))
    assert "model: checkpoint has the MLP 64,128,10 with loss cross_entropy, this job the MLP 64,32,10 with " \
           "loss cross_entropy" in error


@pytest.mark.parametrize("steps", ["3", "2"])
@pytest.mark.slow
def test_a_resume_with_other_steps_per_epoch_is_refused(copy, steps):
    """The trial's cases: a smaller --steps-per-epoch mid-epoch said "step 4/3" and then raised
    a ValueError; at an epoch's end it blamed --max-steps."""
    _, job, output = copy
    mid_epoch = run(["--config", str(job), "--output", str(output / "mid"), "--max-steps", "7"])
    assert mid_epoch.returncode == 0, mid_epoch.stderr  # epoch 2 at step 3 of 4
    for at in (output / "mid", output):  # mid-epoch, and at the end of epoch 2
        error = the_only_error(resume(job, at, "--steps-per-epoch", steps))
        assert f"steps_per_epoch: checkpoint has 4, this job {steps} (its position is counted in epochs of " \
               f"that many steps)" in error


def test_a_checkpoint_whose_weights_hold_nan_is_skipped_for_the_one_before(copy):
    _, job, output = copy
    newest = output / "checkpoint.npz"
    arrays = load_arrays(newest)
    name = next(key for key in arrays if key.startswith("model/"))
    arrays[name] = np.full_like(arrays[name], np.nan)
    save_arrays(newest, arrays)
    resumed = resume(job, output)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {newest}: {str(newest)!r} is damaged: {name} holds" in resumed.stdout
    assert "which a run never saves" in resumed.stdout
    assert json.loads((output / "summary.json").read_text())["steps"] == 12  # from step 4 on: 2 more epochs

    for checkpoint in output.glob("checkpoint*.npz"):
        save_arrays(checkpoint, {**load_arrays(checkpoint), name: np.full_like(arrays[name], np.nan)})
    error = the_only_error(resume(job, output, "--epochs", "4"))
    assert f"no checkpoint in {str(output)!r} can be read: " in error and "is damaged" in error


def ranks_in_folders(first, second, args):
    """One mpiexec, rank 0 started in folder ``first`` and rank 1 in ``second`` (MPMD), so that
    one job file's relative text path names a different file on each rank."""
    def in_folder(folder):
        return ["sh", "-c", f'cd "{folder}" && exec "$@"', "sh", *TRAIN, *args]
    command = mpiexec(1) + in_folder(first) + [":", "-n", "1"] + in_folder(second)
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=ENV)


@needs_mpiexec
@pytest.mark.parametrize("other_text, how", [
    (TEXT.replace("add", "dda"), "its 16 characters are the same, but the text is not"),
    (TEXT + "é", "its characters changed (17 characters, rank 0's 16; gained 'é')"),
])
def test_ranks_that_read_different_texts_are_stopped_at_start_up(tmp_path, other_text, how):
    """The trial's case: ranks that read different copies of the text trained silently (or,
    with vocabularies of different sizes, crashed with DataParallel tracebacks and MPI_Abort)."""
    for folder, text in (("a", TEXT), ("b", other_text)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "code.py").write_text(text)
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps({**JOB, "dataset": "text:code.py"}))
    result = ranks_in_folders(tmp_path / "a", tmp_path / "b",
                              ["--config", str(job), "--output", str(tmp_path / "out")])
    error = the_only_error(result)
    assert "the ranks do not read the same data" in error
    assert "rank 1 on " in error and f"its text differs from rank 0's: {how}" in error
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@needs_mpiexec
@pytest.mark.parametrize("other_samples, how", [
    (64, "the training features' mean and std (digest) "),  # as many samples, other values
    (48, "training samples 48 (rank 0: 64)"),
])
def test_ranks_that_read_different_copies_of_an_npz_are_stopped_at_start_up(tmp_path, other_samples, how):
    """Different values train silently; different sizes run different numbers of steps."""
    for folder, samples, seed in (("a", 64, 0), ("b", other_samples, 1)):
        (tmp_path / folder).mkdir()
        rng = np.random.default_rng(seed)
        np.savez(tmp_path / folder / "d.npz", x_train=rng.random((samples, 6)), y_train=np.arange(samples) % 3,
                 x_test=rng.random((20, 6)), y_test=np.arange(20) % 3)
    result = ranks_in_folders(tmp_path / "a", tmp_path / "b", ["--dataset", "d.npz", "--layers", "6,8,3",
                                                               "--batch-size", "16", "--output", str(tmp_path / "out")])
    error = the_only_error(result)
    assert "the ranks do not read the same data" in error and "rank 1 on " in error and how in error


@needs_mpiexec
def test_ranks_that_read_the_same_text_train(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "code.py").write_text(TEXT)
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps({**JOB, "dataset": "text:code.py", "epochs": 1}))
    result = ranks_in_folders(tmp_path / "a", tmp_path / "b",
                              ["--config", str(job), "--output", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["world_size"] == 2


def test_a_resume_on_data_that_shrank_below_its_position_is_refused(tmp_path):
    """An .npz replaced by a smaller one: the checkpoint's step 15 of an epoch of 20 does not
    exist in epochs of 10 steps (a ValueError traceback from the sampler before)."""
    def write(samples):
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "d.npz", x_train=rng.random((samples, 6)), y_train=rng.integers(0, 3, samples),
                 x_test=rng.random((50, 6)), y_test=rng.integers(0, 3, 50))
    job = ["--dataset", str(tmp_path / "d.npz"), "--layers", "6,8,3", "--batch-size", "32",
           "--output", str(tmp_path / "out")]
    write(640)
    first = run([*job, "--max-steps", "15"])
    assert first.returncode == 0, first.stderr
    write(320)
    error = the_only_error(run([*job, "--resume", "--epochs", "2"]))
    assert f"cannot resume from {str(tmp_path / 'out' / 'checkpoint.npz')!r}: it stopped after step 15 of epoch 1, " \
           "but an epoch of this job has 10 steps (320 training samples of d): the data changed" in error


def test_resume_naming_a_directory_says_so(trained, tmp_path):
    folder, job = trained
    error = the_only_error(run(["--config", str(job), "--output", str(tmp_path), "--resume", str(folder / "run")]))
    assert f"resume: {str(folder / 'run')!r} is a directory, not a checkpoint: give its checkpoint " \
           f"({str(folder / 'run' / 'checkpoint.npz')!r}), or --output {folder / 'run'} with --resume alone" in error
