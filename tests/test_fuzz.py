"""Property-based tests (Hypothesis) of everything a job reads: model descriptions, job files,
hostfiles and --hosts, checkpoints (and .npz members whose CRC is right), output locks and
the arrays given to the Python API, generated bad in many ways, in this process.

The contract (the README's "What happens when..."): whatever comes, the reader
returns a valid value or raises ``ValueError``/``TypeError`` whose one-line
message names the place (the file, the field, the layer) and the problem;
never another exception type, never a file written. Every test runs a fixed,
derandomised set of examples, so a run is repeatable and quick; raise
``max_examples`` locally to search harder (``HYPOTHESIS_EXAMPLES=2000``).
"""
import inspect
import io
import json
import os
import socket
import zipfile

import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mnn import SGD
from mnn.distributed.training.checkpoint import Checkpoint, load_checkpoint, load_newest_checkpoint, save_checkpoint
from mnn.distributed.comm import SingleProcessCommunicator
from mnn.distributed.training.config import TrainConfig, resolve_config
from mnn.distributed.launch.hosts import parse_hostfile, parse_hosts
from mnn.distributed.training.output_dir import LOCK_NAME, OutputLock
from mnn.distributed.training.position import Position
from mnn.distributed.training.preflight import JobConfigError, PreparedJob, prepare_job
from mnn.io import load_arrays
from mnn.model import GPT_KEYS, LAYER_TYPES, build_net, mlp_description, model_size

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "0"))


def fuzz(examples):
    """Fixed seed, ``examples`` examples (or $HYPOTHESIS_EXAMPLES), no deadline, no example database."""
    return settings(derandomize=True, max_examples=EXAMPLES or examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def assert_clear_error(error, *places):
    """A ValueError/TypeError on one line that names one of ``places``."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    message = str(error)
    assert message and "\n" not in message, message[:500]
    assert any(place in message for place in places), message[:500]
    return message


def outcome(call, *args):
    """What ``call(*args)`` gave: its value, or the exception (any type: the test judges it)."""
    try:
        return call(*args)
    except Exception as error:  # RecursionError, MemoryError, KeyError...: assert_clear_error says which
        return error


# --- model descriptions ---------------------------------------------------------------------

LAYER_NAMES = sorted(LAYER_TYPES)
ARGUMENT_NAMES = sorted({name for cls in LAYER_TYPES.values() for name in inspect.signature(cls).parameters
                         if name not in ("dtype", "rng")} | {"colour"})
# Sizes: small and valid, zero and negative, far too large to allocate, and not integers at all.
SIZES = st.one_of(st.integers(1, 6), st.integers(-3, 0), st.integers(10**9, 10**15),
                  st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3), st.none())
JUNK = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)


def layer_entries(layer_lists):
    """A layer entry: mostly a real type with arguments of every kind; Residuals hold ``layer_lists``."""
    arguments = st.dictionaries(st.sampled_from(ARGUMENT_NAMES),
                                st.one_of(SIZES, st.lists(SIZES, max_size=3), JUNK), max_size=3)
    plain = st.builds(lambda name, values: {"type": name, **values},
                      st.sampled_from(LAYER_NAMES) | JUNK, arguments)
    residual = st.builds(lambda layers: {"type": "Residual", "layers": layers}, layer_lists)
    return plain | residual | JUNK


LAYER_LISTS = st.recursive(st.lists(layer_entries(st.nothing()), max_size=4),
                           lambda inner: st.lists(layer_entries(inner), max_size=4), max_leaves=12)
GPT_TABLES = st.dictionaries(st.sampled_from([*GPT_KEYS, "colour"]), SIZES, max_size=6)


def nested_residuals(depth):
    entry = {"type": "LinearLayer", "shape": [4, 4]}
    for _ in range(depth):
        entry = {"type": "Residual", "layers": [entry]}
    return {"layers": [entry, {"type": "MSELossLayer"}]}


SHALLOW_DESCRIPTIONS = st.one_of(
    st.builds(lambda layers: {"layers": layers}, LAYER_LISTS),
    st.builds(lambda layers, loss: {"layers": layers + [{"type": loss}]}, LAYER_LISTS,
              st.sampled_from(["CrossEntropyLossLayer", "MSELossLayer", "NllLossLayer"])),
    st.builds(lambda sizes: {"gpt": sizes}, GPT_TABLES),
)
DESCRIPTIONS = SHALLOW_DESCRIPTIONS | st.builds(nested_residuals, st.integers(0, 3000)) | JUNK


@fuzz(300)
@given(DESCRIPTIONS)
def test_a_model_description_is_valid_or_one_error_naming_the_entry(description):
    config = outcome(lambda: TrainConfig(model=description))
    if isinstance(config, TrainConfig):
        # Valid: the description reads back the same and its size is counted without building.
        assert TrainConfig.from_dict(config.to_dict()) == config
        return
    assert_clear_error(config, "model")


@fuzz(200)
@given(DESCRIPTIONS, st.integers(1, 10**6))
def test_a_description_is_sized_without_building_or_one_error_naming_the_entry(description, numbers):
    size = outcome(model_size, description, numbers)
    if isinstance(size, Exception):
        assert_clear_error(size, "model")
        return
    assert size.parameters >= 0 and size.activations >= 0
    if size.parameters <= 1 << 16:
        net = outcome(build_net, description)
        if not isinstance(net, Exception):
            assert size.parameters == sum(param.size for _, param, _ in net.named_params())


# --- job files ------------------------------------------------------------------------------

FIELDS = TrainConfig.field_names()
TOML_VALUES = st.recursive(
    st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=8),
              st.sampled_from(["digits", "text", "adam", "sgd", "mpi", "ring", "fp16", "float64", "skip"]),
              st.datetimes()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
TOML_TABLES = st.one_of(
    st.dictionaries(st.sampled_from([*FIELDS, "learning_rate"]), TOML_VALUES, max_size=5),
    st.builds(lambda model: {"model": model}, SHALLOW_DESCRIPTIONS),
)


def toml_bytes(table, encoding="utf-8"):
    """``table`` as TOML text (None, which TOML lacks, written as "none")."""
    def storable(value):
        if isinstance(value, dict):
            return {str(key): storable(item) for key, item in value.items()}
        if isinstance(value, list):
            return [storable(item) for item in value]
        return "none" if value is None else value
    return tomli_w.dumps(storable(table)).encode(encoding)


def deep_toml(depth, kind, field):
    """``field`` holding arrays or inline tables nested ``depth`` deep, or Residuals as table headers."""
    if kind == "headers":
        lines, table = [], "model.layers"
        for _ in range(depth):
            lines += [f"[[{table}]]", 'type = "Residual"']
            table += ".layers"
        return "\n".join(lines + [f"[[{table}]]", 'type = "ReluLayer"', ""]).encode()
    opening, closing = {"array": ("[", "]"), "table": ("{a = ", "}"),
                        "residual": ('{type = "Residual", layers = [', "]}")}[kind]
    return f"{field} = {opening * depth}1{closing * depth}\n".encode()


with open(os.path.join(os.path.dirname(__file__), "..", "examples", "digits.toml"), "rb") as _example:
    EXAMPLE_JOB = _example.read()


def mutated(data, edits):
    """``data`` with bytes replaced, removed or inserted at the given places."""
    data = bytearray(data)
    for position, value, how in edits:
        position %= len(data) + 1
        if how == "replace" and position < len(data):
            data[position] = value
        elif how == "delete":
            del data[position:position + 1 + value % 8]
        else:
            data.insert(position, value)
    return bytes(data)


EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255),
                           st.sampled_from(["replace", "delete", "insert"])),
                 min_size=1, max_size=6)
JOB_FILES = st.one_of(
    st.binary(max_size=300),
    TOML_TABLES.map(toml_bytes),
    TOML_TABLES.map(lambda table: toml_bytes(table, "utf-16")),
    st.builds(deep_toml, st.integers(1, 200_000), st.sampled_from(["array", "table"]), st.sampled_from(FIELDS)),
    st.builds(deep_toml, st.integers(1, 600), st.sampled_from(["residual", "headers"]), st.just("model")),
    st.builds(mutated, st.just(EXAMPLE_JOB), EDITS),
)


@fuzz(300)
@given(JOB_FILES)
def test_a_job_file_is_valid_or_one_error_naming_the_file(tmp_path_factory, data):
    job = tmp_path_factory.getbasetemp() / "fuzz-job.toml"
    job.write_bytes(data)
    before = sorted(os.listdir(job.parent))
    config = outcome(resolve_config, job)
    assert sorted(os.listdir(job.parent)) == before  # reading writes nothing
    if isinstance(config, TrainConfig):
        # What validates is written back out (config.toml) and reads back the same.
        job.write_text(config.to_toml())
        assert resolve_config(job) == config
        return
    assert_clear_error(config, f"config file {str(job)!r}")


# --- hostfiles (mnn-launch) -----------------------------------------------------------------

HOST_LINES = st.one_of(
    st.text(max_size=40),
    st.builds(lambda host, slots, comment: f"{host}{slots}{comment}",
              st.sampled_from(["127.0.0.1", "127.0.0.2", "localhost", "node-1", "a_b", "", "::1", "[::1]"]),
              st.one_of(st.just(""), st.integers(-2, 10**6).map(lambda n: f":{n}"),
                        st.integers(-2, 64).map(lambda n: f" slots={n}"), st.just(" max_slots=4 slots=2"),
                        st.integers(4000, 6000).map(lambda n: ":" + "9" * n)),
              st.sampled_from(["", " # a comment", "\t", " slots=1 slots=2"])),
)
HOSTFILES = st.one_of(
    st.lists(HOST_LINES, max_size=6).map(lambda lines: "\n".join(lines).encode()),
    st.lists(HOST_LINES, max_size=6).map(lambda lines: "\n".join(lines).encode("latin-1", "replace")),
    st.binary(max_size=200),
)


def check_hostfile(tmp_path_factory, data):
    hostfile = tmp_path_factory.getbasetemp() / "fuzz-hosts"
    hostfile.write_bytes(data)
    hosts = outcome(parse_hostfile, hostfile)
    if isinstance(hosts, Exception):
        assert_clear_error(hosts, f"hostfile {hostfile}")
        return
    assert hosts and all(isinstance(host, str) and host and isinstance(slots, int) and slots >= 1
                         for host, slots in hosts)


@fuzz(300)
@given(HOSTFILES.filter(lambda data: b":" + b"9" * 4000 not in data))
def test_a_hostfile_is_hosts_or_one_error_naming_the_file(tmp_path_factory, data):
    check_hostfile(tmp_path_factory, data)


@fuzz(20)
@given(st.integers(4300, 6000))
def test_an_absurd_slot_count_names_the_hostfile_or_option(tmp_path_factory, digits):
    check_hostfile(tmp_path_factory, b"127.0.0.1:" + b"9" * digits + b"\n")
    check_hosts("127.0.0.1:" + "9" * digits)


def check_hosts(text):
    hosts = outcome(parse_hosts, text)
    if isinstance(hosts, Exception):
        assert_clear_error(hosts, "--hosts")


@fuzz(200)
@given((st.text(max_size=60) | HOST_LINES).filter(lambda text: ":" + "9" * 4000 not in text))
def test_hosts_on_the_command_line_are_hosts_or_one_error_naming_the_option(text):
    check_hosts(text)


# --- checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    """A real checkpoint of a small MLP with momentum, written by the project's own save_checkpoint."""
    config = TrainConfig(layers=[4, 3, 2], optimizer="momentum")
    net = build_net(mlp_description([4, 3, 2]), rng=0)
    optimizer = SGD(net, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    for _, _, grad in net.named_params():
        grad[...] = rng.normal(size=grad.shape)
    optimizer.step()
    path = tmp_path_factory.mktemp("checkpoint") / "checkpoint.npz"
    save_checkpoint(path, Checkpoint(net.state_dict(), optimizer.state_dict(),
                                     Position(epochs_done=1, step_in_epoch=2, global_step=7, samples_seen=448),
                                     world_size=2, config=config.to_dict()))
    return path.read_bytes(), load_checkpoint(path)


def damaged(data, cut, flips):
    data = bytearray(data[:cut] if cut is not None else data)
    for position, mask in flips:
        if data:
            data[position % len(data)] ^= mask
    return bytes(data)


DAMAGE = st.tuples(st.one_of(st.none(), st.integers(0, 10**5)),
                   st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4))


def same_checkpoint(first, second):
    return (first.position == second.position and first.world_size == second.world_size
            and first.config == second.config
            and all(state_a.keys() == state_b.keys() and all(np.array_equal(state_a[key], state_b[key])
                                                             for key in state_a)
                    for state_a, state_b in ((first.model_state, second.model_state),
                                             (first.optimizer_state, second.optimizer_state))))


@fuzz(300)
@given(DAMAGE)
def test_a_damaged_checkpoint_loads_unchanged_or_is_one_error_naming_the_file(tmp_path_factory, checkpoint_bytes,
                                                                            damage):
    original, loaded = checkpoint_bytes
    data = damaged(original, *damage)
    assume(data != original)
    path = tmp_path_factory.getbasetemp() / "fuzz-checkpoint.npz"
    path.write_bytes(data)
    before = sorted(os.listdir(path.parent))
    checkpoint = outcome(load_checkpoint, path)
    assert path.read_bytes() == data and sorted(os.listdir(path.parent)) == before  # nothing written
    if isinstance(checkpoint, Exception):
        assert_clear_error(checkpoint, repr(str(path)))
        return
    # Only bytes no reader uses (a zip timestamp, say) may change and still load: never other values.
    assert same_checkpoint(checkpoint, loaded)


@fuzz(60)
@given(DAMAGE)
def test_resume_falls_back_from_a_damaged_checkpoint_to_the_one_before(tmp_path_factory, checkpoint_bytes, damage):
    original, loaded = checkpoint_bytes
    data = damaged(original, *damage)
    assume(data != original)
    output = tmp_path_factory.getbasetemp() / "fuzz-resume"
    output.mkdir(exist_ok=True)
    (output / "checkpoint.npz").write_bytes(data)
    (output / "checkpoint-00000003.npz").write_bytes(original)
    newest = outcome(load_newest_checkpoint, output)
    assert not isinstance(newest, Exception), f"{type(newest).__name__}: {newest}"
    assert same_checkpoint(newest.checkpoint, loaded)
    for skipped, reason in newest.skipped:
        assert skipped.name == "checkpoint.npz" and str(skipped) in reason


# --- the output directory's lock ------------------------------------------------------------

LOCK_HOLDERS = st.one_of(
    st.binary(max_size=100),
    st.fixed_dictionaries({"host": st.sampled_from([socket.gethostname(), "elsewhere"])},
                          optional={"pid": st.sampled_from([0, -1, 1, True, 2**31, 2**63, 10**30]) | st.integers()
                                    | JUNK, "started": JUNK}).map(lambda holder: json.dumps(holder).encode()),
    JUNK.map(lambda value: json.dumps(value).encode()),
)


@fuzz(200)
@given(LOCK_HOLDERS)
def test_an_output_lock_of_any_content_is_taken_over_or_one_error_naming_the_directory(tmp_path_factory, holder):
    output = tmp_path_factory.getbasetemp() / "fuzz-output"
    output.mkdir(exist_ok=True)
    (output / LOCK_NAME).write_bytes(holder)
    lock = outcome(OutputLock.acquire, output)
    if isinstance(lock, Exception):
        assert_clear_error(lock, f"output directory {str(output)!r}")
        assert (output / LOCK_NAME).read_bytes() == holder  # another job's lock is left alone
        return
    assert json.loads((output / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (output / LOCK_NAME).exists()


# --- arrays given to the Python API (train(config, data=...)) -----------------------------------

ARRAYS = st.one_of(
    st.builds(lambda shape, kind: np.zeros(shape, dtype=kind), st.lists(st.integers(0, 5), max_size=3),
              st.sampled_from(["float32", "float64", "int64", "uint8", "bool", "complex64", "U3", "object"])),
    st.builds(lambda values: np.array(values), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6)),
    st.lists(st.integers(-2, 5), max_size=4),
    JUNK,
)
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
def _with_value(array, value):
    array = array.astype(float)
    array.flat[0] = value
    return array


# What may be wrong with one array given to train(data=...).
DEFECTS = {
    "nan": lambda a: _with_value(a, np.nan), "infinite": lambda a: _with_value(a, -np.inf),
    "huge": lambda a: _with_value(a, 1e300), "negative label": lambda a: _with_value(a, -1),
    "fraction": lambda a: _with_value(a, 0.5), "bool": lambda a: a.astype(bool),
    "float16": lambda a: a.astype(np.float16),
    "int8": lambda a: a.astype(np.int8), "complex": lambda a: a.astype(complex), "object": lambda a: a.astype(object),
    "text": lambda a: a.astype(str), "a row short": lambda a: a[1:], "empty": lambda a: a[:0],
    "an axis more": lambda a: a[..., None], "flattened": lambda a: a.reshape(-1), "scalar": lambda a: a.flat[0],
    "list": lambda a: a.tolist(), "none": lambda a: None,
}


@st.composite
def nearly_right_arrays(draw):
    """(x_train, y_train, x_test, y_test) for the test's net (2 features, 2 classes), with 0 to 2 defects."""
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    n_train, n_test = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    parts = {"x_train": rng.normal(size=(n_train, 2)), "y_train": rng.integers(0, 2, n_train),
             "x_test": rng.normal(size=(n_test, 2)), "y_test": rng.integers(0, 2, n_test)}
    for _ in range(draw(st.integers(0, 2))):
        key, defect = draw(st.sampled_from(ARRAY_KEYS)), draw(st.sampled_from(sorted(DEFECTS)))
        if parts[key] is not None and np.ndim(parts[key]) and np.size(parts[key]):
            parts[key] = DEFECTS[defect](np.asarray(parts[key]))
    return tuple(parts.values())


DATA = st.one_of(
    nearly_right_arrays(),
    nearly_right_arrays().map(lambda parts: dict(zip(ARRAY_KEYS, parts))),
    st.dictionaries(st.sampled_from([*ARRAY_KEYS, "x_val"]), ARRAYS, max_size=5),
    st.lists(ARRAYS, max_size=5).map(tuple),
    st.lists(ARRAYS, max_size=5),
    JUNK,
)


@fuzz(150)
@given(DATA)
def test_data_from_python_is_used_or_one_error_naming_it(data):
    job = outcome(prepare_job, TrainConfig(layers=[2, 2], max_steps=1), SingleProcessCommunicator(), None, data)
    if isinstance(job, PreparedJob):
        return
    assert isinstance(job, JobConfigError), f"{type(job).__name__}: {job}"
    message = str(job)
    # One process: no "rank 0: " before the message, there is no other rank to tell apart.
    assert not message.startswith("rank ") and "\n" not in message, message
    assert any(place in message for place in ("data", "arrays", "layers", "x_train", "y_train", "x_test", "y_test")), \
        message


# --- .npy members with a correct CRC (only mnn.io's reader can tell) -----------------------------

def npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


NPY_MEMBERS = st.one_of(
    st.builds(mutated, st.sampled_from([npy_bytes(np.arange(6.0).reshape(2, 3)), npy_bytes(np.zeros(0, np.int8)),
                                        npy_bytes(np.ones((2, 2), np.float32).T)]), EDITS),
    st.builds(lambda header, data: b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data,
              st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode),
                        st.fixed_dictionaries({"descr": st.sampled_from(["<f8", "|u1", "|O", "V0", "<U2", "(2,)f8"])
                                                        | JUNK,
                                               "fortran_order": st.booleans() | JUNK,
                                               "shape": st.lists(st.integers(-1, 10**12), max_size=3).map(tuple)
                                                        | JUNK}).map(lambda header: repr(header).encode())),
              st.binary(max_size=64)),
)


@fuzz(300)
@given(st.lists(NPY_MEMBERS, min_size=1, max_size=2))
def test_npz_members_of_any_bytes_load_or_are_one_error_naming_file_and_member(tmp_path_factory, members):
    path = tmp_path_factory.getbasetemp() / "fuzz-arrays.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for index, member in enumerate(members):
            archive.writestr(f"a{index}.npy", member)
    arrays = outcome(load_arrays, path)
    if isinstance(arrays, Exception):
        message = assert_clear_error(arrays, repr(str(path)))
        assert "member 'a" in message, message
        return
    assert sorted(arrays) == [f"a{index}" for index in range(len(members))]
    assert all(isinstance(array, np.ndarray) and not array.dtype.hasobject for array in arrays.values())
