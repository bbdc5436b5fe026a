"""Bad jobs end as one line: ``mnn-train: error: ...`` and exit 2, never a traceback (issue 13, items 14, 16, 22).

Job files that cannot be read (a directory, not UTF-8, nested too deeply), models
nested too deeply or far larger than the machine (refused before anything is
allocated, naming the size and what the machine has), an output lock that is a
folder, an output that is a dangling symbolic link, and the Python API given
data of the wrong shape. End-to-end cases start ``mnn-train`` through the fault
suite's helper; the Python API's run in this process.
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mnn.distributed.comm import SingleProcessCommunicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.output_dir import LOCK_NAME, OutputLock, set_aside_earlier_run
from mnn.distributed.training.preflight import JobConfigError, prepare_job
from mnn.distributed.environment import NO_MPI_ENV
from mnn.scripts.train import main
from processes import ENV, GENERATE, TRAIN, exit_status, needs_mpiexec, run

# A GPT of 15 billion parameters: 121 GB of float32 parameters and gradients.
HUGE_GPT = "[model.gpt]\nn_layers = 48\nd_model = 5120\nn_heads = 40\ncontext = 16\n"
# 26 trillion parameters in one layer.
HUGE_LINEAR = ('[[model.layers]]\ntype = "LinearLayer"\nshape = [64, 400000000000]\n'
               '[[model.layers]]\ntype = "CrossEntropyLossLayer"\n')


@pytest.fixture(name="train_here")
def train_here_fixture(capsys, monkeypatch):
    """``train_here(argv)``: mnn-train's main run in this process, one process without MPI, as a
    CompletedProcess. For a job refused before training no process of its own adds anything; a
    Python warning would have been a line on its stderr, so none may be raised."""
    monkeypatch.setenv(NO_MPI_ENV, "1")

    def train_here(argv):
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            status = exit_status(main, argv)
        assert not raised, [str(warning.message) for warning in raised]
        stdout, stderr = capsys.readouterr()
        return subprocess.CompletedProcess(["mnn-train", *argv], status, stdout, stderr)
    return train_here


def assert_one_error_line(result, *words):
    """Exit 2, and stderr is one ``mnn-train: error:`` line holding ``words``."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnn-train: error: "), result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]


def residuals_as_inline_tables(depth):
    entry = '{type = "LinearLayer", shape = [64, 64]}'
    for _ in range(depth):
        entry = f'{{type = "Residual", layers = [{entry}]}}'
    return f'[model]\nlayers = [{entry}, {{type = "CrossEntropyLossLayer"}}]\n'


def residuals_as_table_headers(depth):
    lines, table = [], "model.layers"
    for _ in range(depth):
        lines += [f"[[{table}]]", 'type = "Residual"']
        table += ".layers"
    return "\n".join(lines + [f"[[{table}]]", 'type = "ReluLayer"']) + "\n"


# --- job files ----------------------------------------------------------------------------

def test_a_config_that_is_a_directory(tmp_path, train_here):
    assert_one_error_line(train_here(["--config", str(tmp_path)]), f"config file '{tmp_path}' is a directory")


def test_a_config_that_is_not_utf8(tmp_path, train_here):
    job = tmp_path / "job.toml"
    job.write_bytes("# caf\xe9\nepochs = 1\n".encode("latin-1"))
    assert_one_error_line(train_here(["--config", str(job)]), str(job), "is not UTF-8 text", "byte 0xe9 on line 1")


@pytest.mark.parametrize("text, words", [
    ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", ["nests arrays or inline tables too deeply"]),
    (residuals_as_inline_tables(200), ["nests arrays or inline tables too deeply"]),
    (residuals_as_table_headers(400), ["model.layers[0] (Residual): Residuals nested more than 32 deep"]),
], ids=["array-100k-deep", "residual-200-deep-inline", "residual-400-deep-headers"])
def test_deep_nesting(tmp_path, text, words, train_here):
    job = tmp_path / "deep.toml"
    job.write_text(text)
    assert_one_error_line(train_here(["--config", str(job)]), *words)


def test_a_size_that_is_not_an_integer(tmp_path, train_here):
    job = tmp_path / "job.toml"
    job.write_text(HUGE_LINEAR.replace("400000000000", "4e11"))
    assert_one_error_line(train_here(["--config", str(job)]), "model.layers[0] (LinearLayer): expected shape (n_in, n_out) "
                                                       "of two positive ints, got (64, 400000000000.0)")


# --- a model larger than the machine --------------------------------------------------------

def test_a_model_larger_than_memory_is_refused_before_it_is_allocated(tmp_path, train_here):
    job = tmp_path / "job.toml"
    job.write_text(HUGE_LINEAR)
    result = train_here(["--config", str(job), "--output", str(tmp_path / "out")])
    # Before: numpy's MemoryError "Unable to allocate 186. TiB", as a traceback.
    assert_one_error_line(result, "model: this job needs about 618 TB of memory per rank",
                          "26,000,000,000,000 parameters", "available (MemAvailable in /proc/meminfo)")
    assert not (tmp_path / "out").exists()  # refused before the output directory is touched


def test_an_mlp_shorthand_larger_than_memory_is_refused_naming_layers(train_here):
    assert_one_error_line(train_here(["--layers", "64,400000000000,10"]),
                          "layers: this job needs about 854 TB of memory per rank", "30,000,000,000,010 parameters")


def test_a_gpt_larger_than_the_address_space_limit_is_refused(tmp_path):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    job = tmp_path / "job.toml"
    job.write_text(f'dataset = "text:{tmp_path / "text.txt"}"\nbatch_size = 4\n' + HUGE_GPT)
    limit = 6 << 30  # a 6 GB ulimit -v, set in mnn-train's own process
    command = [sys.executable, "-c", f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, "
               f"({limit}, {limit})); sys.argv[0] = 'mnn-train'; runpy.run_module('mnn.scripts.train', "
               f"run_name='__main__')"]
    result = run(["--config", str(job)], command=command)
    assert_one_error_line(result, ",068,188 parameters x 4 bytes x 2 for the parameters and their gradients",
                          "left under the address-space limit (ulimit -v, RLIMIT_AS)")


@needs_mpiexec
@pytest.mark.slow
def test_two_ranks_are_refused_together_with_one_line(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(HUGE_LINEAR)
    result = run(["--config", str(job)], ranks=2)
    # Plain mpiexec adds its own lines (Open MPI's prterun: "one or more processes exited
    # with non-zero status"); mnn's is one line, from one rank.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("mnn-train: error: ") == 1, result.stderr
    assert ("mnn-train: error: ranks 0, 1: model: this job needs about" in result.stderr
            and "more than this machine has for each of its 2 ranks" in result.stderr), result.stderr


def test_example_jobs_are_far_from_the_memory_bound():
    from mnn.distributed.training.preflight import _memory_limits
    from mnn.model import model_size
    gpt = model_size({"gpt": {"vocab": 100, "n_layers": 2, "d_model": 128, "n_heads": 4, "context": 64}}, 64)
    needed = (4 * gpt.parameters + 2 * 64 * gpt.activations) * 4
    assert needed < 400e6
    limits = _memory_limits(ranks_here=1)
    assert limits and all(room > 0 for room in limits.values())


# --- the output directory -------------------------------------------------------------------

def test_an_output_lock_that_is_a_directory(tmp_path, train_here):
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(ValueError, match=f"its lock '{tmp_path / LOCK_NAME}' is a directory, not the lock file"):
        OutputLock.acquire(tmp_path)
    assert (tmp_path / LOCK_NAME).is_dir()
    result = train_here(["--max-steps", "1", "--output", str(tmp_path)])
    assert_one_error_line(result, "is a directory, not the lock file a job writes")


def test_an_output_that_is_a_dangling_symbolic_link(tmp_path, train_here):
    output = tmp_path / "out"
    output.symlink_to(tmp_path / "gone")
    result = train_here(["--max-steps", "1", "--output", str(output)])
    assert_one_error_line(result, f"output directory '{output}' is a symbolic link to '{tmp_path / 'gone'}', "
                                  f"which does not exist")


# --- the Python API -------------------------------------------------------------------------

def arrays():
    rng = np.random.default_rng(0)
    return {"x_train": rng.normal(size=(8, 4)), "y_train": rng.integers(0, 2, 8),
            "x_test": rng.normal(size=(4, 4)), "y_test": rng.integers(0, 2, 4)}


@pytest.mark.parametrize("data, words", [
    ({key: value for key, value in arrays().items() if key != "y_test"}, "got a dict without y_test"),
    ({**arrays(), "x_val": 1}, "got a dict with unknown key(s) 'x_val'"),
    ({}, "got a dict without x_train, y_train, x_test, y_test"),
    (tuple(arrays().values())[:3], "got a tuple of 3 items"),
    ({**arrays(), "y_train": None}, "got None for y_train"),
    ("digits", "got str"),
])
def test_the_python_api_given_data_of_the_wrong_shape(data, words):
    config = TrainConfig(layers=[4, 2])
    with pytest.raises(JobConfigError) as error:
        prepare_job(config, SingleProcessCommunicator(), data=data)
    message = str(error.value)
    assert "data: expected a Dataset, or the arrays (x_train, y_train, x_test, y_test)" in message
    assert words in message, message


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_earlier_runs_folder_that_is_not_a_folder(tmp_path, kind):
    (tmp_path / "checkpoint.npz").write_bytes(b"an earlier run")
    if kind == "file":
        (tmp_path / "previous").write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "previous").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=f"whose files go into '{tmp_path / 'previous'}', but that is a "):
        set_aside_earlier_run(tmp_path)
    assert (tmp_path / "checkpoint.npz").read_bytes() == b"an earlier run"
    assert (tmp_path / "previous").exists()


def test_an_earlier_runs_diverged_state_goes_with_its_checkpoints(tmp_path):
    for name in ("checkpoint.npz", "checkpoint-00000023.npz", "diverged.npz", "summary.json"):
        (tmp_path / name).write_bytes(name.encode())
    set_aside_earlier_run(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["previous"]
    assert (tmp_path / "previous" / "diverged.npz").read_bytes() == b"diverged.npz"


@pytest.mark.parametrize("version, files, room", [
    ("v1", {"memory.limit_in_bytes": "6000000000", "memory.usage_in_bytes": "1000000000"}, 5_000_000_000),
    ("v1", {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "1000"}, None),
    ("v2", {"memory.max": "4000000000\n", "memory.current": "500000000\n"}, 3_500_000_000),
    ("v2", {"memory.max": "max\n", "memory.current": "500000000\n"}, None),
])
def test_a_cgroups_memory_limit_bounds_what_a_job_may_use(tmp_path, monkeypatch, version, files, room):
    from mnn.distributed.training import preflight
    v2, v1 = tmp_path / "unified", tmp_path / "memory"
    folder = (v2 if version == "v2" else v1) / "job" / "42"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    (tmp_path / "cgroup").write_text("12:cpu,cpuacct:/job/42\n4:memory:/job/42\n1:name=systemd:/\n0::/job/42\n")
    monkeypatch.setattr(preflight, "_PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(preflight, "_CGROUP_MEMORY", (
        ("", v2, "memory.max", "memory.current"), ("memory", v1, "memory.limit_in_bytes", "memory.usage_in_bytes")))
    assert preflight._cgroup_room() == room
    if room is not None:
        assert preflight._memory_limits(ranks_here=2)["left under this cgroup's memory limit"] == room // 2


def test_a_global_batch_larger_than_the_data_is_not_counted_beyond_the_data(tmp_path):
    # The batch is the whole training split: its activations fit, whatever --batch-size says.
    result = run(["--batch-size", str(10**21), "--max-steps", "1"])
    assert result.returncode == 0, result.stderr[-3000:]


# --- the second trial's cases (issue 13: "cases that are not listed here") -----------------

TINY_GPT = "[model.gpt]\nn_layers = 1\nd_model = 8\nn_heads = 2\ncontext = 8\n"


def tiny_text_job(tmp_path):
    """A job file of a tiny GPT on a short text, and the text."""
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    job = tmp_path / "gpt.toml"
    job.write_text(f'dataset = "text:{tmp_path / "text.txt"}"\nsteps_per_epoch = 2\n' + TINY_GPT)
    return job


@pytest.mark.slow
def test_a_checkpoint_whose_weights_are_not_in_the_runs_dtype_is_damaged(tmp_path):
    from mnn.distributed.training.checkpoint import load_checkpoint
    from mnn.io import load_arrays, save_arrays
    assert run(["--max-steps", "1", "--output", str(tmp_path)]).returncode == 0
    path = tmp_path / "checkpoint.npz"
    arrays = load_arrays(path)
    save_arrays(path, {key: value.astype(np.int8) if key.startswith("model/") else value
                       for key, value in arrays.items()})
    # Before: load_state_dict cast the int8 values back to float32, and the run trained on.
    with pytest.raises(ValueError, match=r"is damaged: model/0\.LinearLayer\.w holds int8 values, but its run "
                                         r"trained in float32"):
        load_checkpoint(path)
    result = run(["--max-steps", "2", "--output", str(tmp_path), "--resume"])
    assert_one_error_line(result, "is damaged: model/0.LinearLayer.w holds int8 values")


def test_a_checkpoint_that_is_a_pipe_is_refused_at_once(tmp_path):
    fifo = tmp_path / "checkpoint.npz"
    os.mkfifo(fifo)
    # Before: mnn-generate opened the pipe and waited for a writer, forever.
    result = subprocess.run(GENERATE + ["--checkpoint", str(fifo)], capture_output=True, text=True,
                            timeout=60, env=ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (f"mnn-generate: error: {str(fifo)!r} is not a regular file (a pipe, socket or "
                                     f"device), so not an .npz file"), result.stderr


def test_a_text_jobs_batch_is_counted_whole(tmp_path, train_here):
    # A text's windows are drawn with replacement: a batch larger than the text is that large.
    result = train_here(["--config", str(tiny_text_job(tmp_path)), "--batch-size", str(10**12), "--max-steps", "1"])
    # Before: the estimate counted 1,576 windows, and the sampler's allocation failed in a traceback.
    assert_one_error_line(result, "model: this job needs about", "activations of 1000000000000 samples")


def test_data_beyond_float32s_range_standardises_without_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "huge.npz"
    np.savez(data, x_train=rng.normal(size=(40, 64)) * 1e300, y_train=rng.integers(0, 10, 40),
             x_test=rng.normal(size=(10, 64)) * 1e300, y_test=rng.integers(0, 10, 10))
    result = run(["--dataset", str(data), "--max-steps", "1"])
    # Before: "RuntimeWarning: overflow encountered in cast" and its source line, from the
    # digest the ranks compare of the features' mean and standard deviation.
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]


def test_generate_refuses_a_checkpoint_whose_config_describes_another_model(tmp_path):
    from mnn.io import load_arrays, save_arrays
    assert run(["--config", str(tiny_text_job(tmp_path)), "--max-steps", "1", "--output", str(tmp_path / "run")]
               ).returncode == 0
    path = tmp_path / "run" / "checkpoint.npz"
    arrays = load_arrays(path)
    config = json.loads(arrays["config_json"].tobytes())
    config["model"]["gpt"]["context"] = 10**12
    arrays["config_json"] = np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)
    save_arrays(path, arrays)
    result = subprocess.run(GENERATE + ["--checkpoint", str(path), "--tokens", "3"], capture_output=True,
                            text=True, timeout=60, env=ENV)
    # Before: build_net allocated the described positional embedding: a MemoryError traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"mnn-generate: error: {path} does not hold the model its config describes: "
                                    f"8,000,000,001,364 parameters described, 1,428 stored"), result.stderr


@pytest.mark.parametrize("config, got", [({"epochs": 1}, "dict"), (None, "NoneType"), ("job.toml", "str")])
def test_the_python_api_given_a_config_that_is_not_a_trainconfig(config, got):
    from mnn.distributed.training.trainer import train
    # Before: AttributeError: 'dict' object has no attribute 'stall_timeout'.
    with pytest.raises(TypeError, match=f"config: expected a TrainConfig .*, got {got}$"):
        train(config, SingleProcessCommunicator())


def test_the_python_api_checks_a_config_changed_after_it_was_made():
    from mnn.distributed.training.trainer import train
    config = TrainConfig(max_steps=1)
    config.epochs = -5
    # Before: it trained, with -5 epochs.
    with pytest.raises(ValueError, match="epochs: expected an integer >= 1, got -5"):
        train(config, SingleProcessCommunicator())


@pytest.mark.parametrize("comm", ["world", 3])
def test_the_python_api_given_a_comm_that_is_not_one(comm):
    from mnn.distributed.training.trainer import train
    # Before: AttributeError: 'str' object has no attribute 'Get_rank'.
    with pytest.raises(TypeError, match=f"comm: expected a Communicator, an mpi4py communicator or None, "
                                        f"got {type(comm).__name__}"):
        train(TrainConfig(max_steps=1), comm)


@pytest.mark.parametrize("option, words", [
    ("--output", "output directory '{name}' cannot be used: File name too long"),
    ("--timeline", "timeline: '{name}' cannot be written: File name too long"),
])
def test_a_file_name_too_long_is_named_with_its_option(tmp_path, option, words, train_here):
    name = str(tmp_path / ("n" * 300))
    result = train_here([option, name, "--max-steps", "1"])
    # Before: "rank 0: OSError: [Errno 36] File name too long: '…'", naming no option.
    assert_one_error_line(result, words.format(name=name))


def test_a_job_file_with_a_config_key_is_named_once(tmp_path, train_here):
    job = tmp_path / "job.toml"
    job.write_text('config = "other.toml"\n')
    result = train_here(["--config", str(job)])
    # Before: "config file '…': config file '…': unknown key(s) 'config'" (the key looked like the prefix).
    assert_one_error_line(result, f"mnn-train: error: config file '{job}': unknown key(s) 'config'; valid keys are")


@pytest.mark.parametrize("option", ["--output", "--dataset", "--timeline"])
def test_a_path_that_is_not_utf8_is_a_bad_job(tmp_path, option, train_here):
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")  # a Latin-1 name, as a shell passes it
    output = [] if option == "--output" else ["--output", str(tmp_path / "out")]
    if option == "--dataset":
        rng = np.random.default_rng(0)
        name += ".npz"
        np.savez(os.fsdecode(os.fsencode(name)), x_train=rng.normal(size=(8, 64)), y_train=rng.integers(0, 10, 8),
                 x_test=rng.normal(size=(4, 64)), y_test=rng.integers(0, 10, 4))
    result = train_here([option, name, "--max-steps", "1", *output])
    # Before (--output): exit 1 once training had started, "cannot write …: UnicodeEncodeError" from config.toml.
    assert_one_error_line(result, f"{option[2:]}: expected a path that is UTF-8 text (the run records it in "
                                  f"config.toml and its checkpoints), got {name!r}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("optimizer, key, value, words", [
    ("adam", "step", np.array(-5), "step: expected a count of steps (an integer scalar >= 0), got -5"),
    ("adam", "step", np.array(2.5), "step: expected a count of steps (an integer scalar >= 0), got 2.5"),
    ("momentum", "momentum.0.LinearLayer.w", np.ones((128, 64), np.int8),
     "momentum.0.LinearLayer.w: expected floating-point values, got int8"),
])
@pytest.mark.slow
def test_an_optimizer_state_a_run_never_saves_is_refused(tmp_path, optimizer, key, value, words):
    from mnn.io import load_arrays, save_arrays
    args = ["--optimizer", optimizer, "--lr", "0.001", "--output", str(tmp_path)]
    assert run([*args, "--max-steps", "2"]).returncode == 0
    arrays = load_arrays(tmp_path / "checkpoint.npz")
    arrays["optimizer/" + key] = value
    save_arrays(tmp_path / "checkpoint.npz", arrays)
    # Before: loaded as it was; a negative Adam step trained into NaN and blamed the learning rate.
    assert_one_error_line(run([*args, "--max-steps", "4", "--resume"]), words)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.slow
def test_a_stdout_that_cannot_be_written_does_not_stop_training(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run(TRAIN + ["--max-steps", "30", "--log-every", "1", "--output", str(tmp_path)],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=ENV)
    # Before: an OSError traceback from the first printed line ([Errno 28] No space left on device).
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip() == (f"mnn: warning: the output cannot be printed ([Errno 28] No space left on "
                                     f"device); training goes on, and {tmp_path / 'metrics.jsonl'} keeps every event"
                                     ), result.stderr
    assert (tmp_path / "model.npz").exists() and (tmp_path / "summary.json").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("stdout, words", [
    ("/dev/full", "mnn-generate: error: cannot print the text: [Errno 28] No space left on device"),
    (None, "mnn-generate: error: cannot print the text: stdout is closed"),
])
def test_generate_with_a_stdout_that_cannot_be_written(tmp_path, stdout, words):
    assert run(["--config", str(tiny_text_job(tmp_path)), "--max-steps", "1", "--output", str(tmp_path / "run")]
               ).returncode == 0
    code = "import sys, runpy; sys.stdout = None; sys.argv[0] = 'mnn-generate'; " \
           "runpy.run_module('mnn.scripts.generate', run_name='__main__')"
    command = GENERATE if stdout else [sys.executable, "-c", code]
    with open(stdout or os.devnull, "w") as out:
        result = subprocess.run(command + ["--checkpoint", str(tmp_path / "run"), "--tokens", "50"], stdout=out,
                                stderr=subprocess.PIPE, text=True, timeout=60, env=ENV)
    # Before: an OSError traceback (/dev/full); "AttributeError: 'NoneType' object has no attribute 'write'".
    assert result.returncode == 1 and result.stderr.strip() == words, result.stderr[-3000:]


def test_a_dataset_cache_file_that_is_a_pipe_is_rebuilt(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.normal(size=(8, 64)), y_train=rng.integers(0, 10, 8),
             x_test=rng.normal(size=(4, 64)), y_test=rng.integers(0, 10, 4))
    assert run(["--dataset", str(data), "--max-steps", "1"]).returncode == 0
    for cached in (tmp_path / ".cache").iterdir():
        cached.unlink()
        os.mkfifo(cached)
    # Before: reading the cache opened a pipe and waited for a writer, forever.
    result = run(["--dataset", str(data), "--max-steps", "1"], timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert all(cached.is_file() for cached in (tmp_path / ".cache").iterdir())


@pytest.mark.slow
def test_resuming_the_diverged_state_warns_of_nothing_but_the_divergence(tmp_path):
    assert run(["--lr", "1e6", "--max-steps", "50", "--output", str(tmp_path / "a")]).returncode == 1
    result = run(["--lr", "1e6", "--max-steps", "50", "--output", str(tmp_path / "b"),
                  "--resume", str(tmp_path / "a" / "diverged.npz")])
    # Before: NumPy's "RuntimeWarning: overflow encountered in matmul" (twice, with its source line)
    # from preflight's trial batch through the restored, exploded weights, before the line.
    assert result.returncode == 1 and "Warning" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith("mnn-train: error: training diverged at") and result.stderr.count("\n") == 1


# --- the second trial's cases, part 2 ------------------------------------------------------

@pytest.mark.parametrize("kind, words", [("fifo", "a named pipe (FIFO)"), ("folder", "a directory")])
@pytest.mark.parametrize("resume", [True, False])
@pytest.mark.slow
def test_a_checkpoint_that_is_a_pipe_or_a_folder_in_the_output_is_named(tmp_path, kind, words, resume):
    checkpoint = tmp_path / "checkpoint.npz"
    os.mkfifo(checkpoint) if kind == "fifo" else checkpoint.mkdir()
    result = run(["--max-steps", "1", "--output", str(tmp_path)] + (["--resume"] if resume else []), timeout=60)
    # Before: --resume found no checkpoint ("starting from scratch") while setting the earlier run's aside
    # found one and moved it into previous/ (saying "to continue a run, use --resume"), exit 0.
    assert_one_error_line(result, str(checkpoint), words, "not a checkpoint")
    assert checkpoint.exists() and not (tmp_path / "previous").exists()


def test_a_runs_config_reused_after_its_text_changed_trains_on_the_text_as_it_is(tmp_path):
    assert run(["--config", str(tiny_text_job(tmp_path)), "--max-steps", "1", "--output", str(tmp_path / "a")]
               ).returncode == 0
    with open(tmp_path / "text.txt", "a") as text:
        text.write("THE QUICK BROWN FOX\n")
    result = run(["--config", str(tmp_path / "a" / "config.toml"), "--max-steps", "1",
                  "--output", str(tmp_path / "b")])
    # Before: the recorded vocab (28) made the model, and the first step failed on a new character:
    # "EmbeddingLayer: expected token ids in [0, 28), got id ...".
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "differs from the one" in said and "gained 'B'" in said, said[-3000:]
    from mnn.distributed.training.config import load_toml
    old, new = (TrainConfig.from_dict(load_toml(tmp_path / run / "config.toml")) for run in ("a", "b"))
    assert new.model["gpt"]["vocab"] == len(new.text_fingerprint["chars"]) == old.model["gpt"]["vocab"] + 15
    # Resuming the first run on the changed text still says the text changed.
    resumed = run(["--config", str(tmp_path / "a" / "config.toml"), "--max-steps", "2",
                   "--output", str(tmp_path / "a"), "--resume"])
    assert_one_error_line(resumed, "is not the one the checkpoint was trained on")


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_generate_stopped_by_a_signal_says_how_far_it_got(tmp_path, signum):
    import select
    import signal
    import time
    assert run(["--config", str(tiny_text_job(tmp_path)), "--max-steps", "1", "--output", str(tmp_path / "run")]
               ).returncode == 0
    process = subprocess.Popen(GENERATE + ["--checkpoint", str(tmp_path / "run"), "--tokens", str(10**9)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not select.select([process.stdout], [], [], 1)[0]:  # it is printing
            assert time.monotonic() < deadline and process.poll() is None, "mnn-generate printed nothing"
        process.send_signal(getattr(signal, signum))
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    # Before: SIGTERM and SIGHUP ended it with 143 and 129 and no word.
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.decode().strip().startswith("mnn-generate: interrupted after "), stderr[-3000:]


def test_an_empty_config_option_is_named_as_empty(tmp_path, train_here):
    result = train_here(["--config", "", "--max-steps", "1"])
    # Before: "config file '.' is a directory, not a TOML job file".
    assert_one_error_line(result, "config file", "empty")


def test_a_gpt_vocab_smaller_than_the_texts_characters_is_a_bad_job(tmp_path, train_here):
    job = tiny_text_job(tmp_path)
    job.write_text(job.read_text() + "vocab = 5\n")
    result = train_here(["--config", str(job), "--max-steps", "1"])
    # Before: the first step failed in training: "EmbeddingLayer: expected token ids in [0, 5), got id 27".
    assert_one_error_line(result, "model.gpt: vocab = 5, fewer than the 28 characters of the text")
