"""Tests for mnn.datasets on real files the tests write: IDX (raw and gz), .npz, digits."""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

import mnn.datasets
from mnn.datasets import IDX_FILES, Dataset, load_dataset, read_idx

IMAGE_SHAPE = (4, 3)


def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path, array, magic, gz=False, cut=0):
    content = idx_bytes(array, magic)
    content = content[:len(content) - cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)
    return path


def make_idx_dir(directory, gz=False, n_train=12, n_test=5, seed=0):
    """Write a tiny MNIST-format dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, *IMAGE_SHAPE), dtype=np.uint8),
        "y_train": rng.integers(0, 3, size=n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, *IMAGE_SHAPE), dtype=np.uint8),
        "y_test": rng.integers(0, 3, size=n_test, dtype=np.uint8),
    }
    for key, name in IDX_FILES.items():
        magic = 0x00000803 if key.startswith("x") else 0x00000801
        write_idx(directory / name, arrays[key], magic, gz=gz)
    return arrays


def cache_files(directory):
    cache = directory / ".cache"
    return sorted(cache.iterdir()) if cache.is_dir() else []


# ------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_directory_loads_flattened_memmaps(tmp_path, gz):
    written = make_idx_dir(tmp_path / "mnist", gz=gz)
    data = load_dataset(tmp_path / "mnist")
    assert data.name == "mnist"
    assert data.n_features == 12 and data.n_classes == int(written["y_train"].max()) + 1
    assert len(data.train) == 12 and len(data.test) == 5
    assert isinstance(data.train.x, np.memmap) and data.train.x.shape == (12, 12)
    np.testing.assert_array_equal(data.train.x, written["x_train"].reshape(12, -1))
    np.testing.assert_array_equal(data.test.x, written["x_test"].reshape(5, -1))
    assert data.train.y.dtype == np.int64
    np.testing.assert_array_equal(data.test.y, written["y_test"])


def test_read_idx_checks_ndim_argument(tmp_path):
    with pytest.raises(ValueError, match="ndim must be 1"):
        read_idx(tmp_path / "x", ndim=2)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_bad_magic_names_file(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    images = np.zeros((12, *IMAGE_SHAPE), np.uint8)
    bad = write_idx(tmp_path / IDX_FILES["x_train"], images, magic=0x00000802, gz=gz)
    with pytest.raises(ValueError, match=r"bad magic number 0x00000802.*expected 0x00000803") as caught:
        load_dataset(tmp_path)
    assert str(bad) in str(caught.value)


def test_labels_file_in_place_of_images_is_bad_magic(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES["x_test"], np.zeros(5, np.uint8), magic=0x00000801)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte has bad magic number 0x00000801"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_data_names_file_and_sizes(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    images = np.zeros((5, *IMAGE_SHAPE), np.uint8)
    bad = write_idx(tmp_path / IDX_FILES["x_test"], images, magic=0x00000803, gz=gz, cut=7)
    file_has = "the decompressed file has" if gz else "the file has"
    with pytest.raises(ValueError, match=rf"is truncated: its header claims 5 images of 4x3 = 60 bytes of data, "
                       rf"{file_has} 53 after its 16-byte header") as caught:
        load_dataset(tmp_path)
    assert str(bad) in str(caught.value)


def test_truncated_header_and_trailing_bytes(tmp_path):
    make_idx_dir(tmp_path)
    labels = tmp_path / IDX_FILES["y_train"]
    labels.write_bytes((0x00000801).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="shorter than its 8-byte header"):
        load_dataset(tmp_path)
    labels.write_bytes(idx_bytes(np.zeros(12, np.uint8), 0x00000801) + b"\x01")
    with pytest.raises(ValueError, match="has trailing bytes"):
        load_dataset(tmp_path)


def test_cut_gzip_stream_is_a_clear_error(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    path = tmp_path / (IDX_FILES["x_train"] + ".gz")
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ValueError, match="could not be read"):
        load_dataset(tmp_path)


def test_image_label_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES["y_train"], np.zeros(11, np.uint8), magic=0x00000801)
    with pytest.raises(ValueError, match="train count mismatch: .* 12 images but .* 11 labels"):
        load_dataset(tmp_path)


def test_missing_idx_file(tmp_path):
    make_idx_dir(tmp_path)
    (tmp_path / IDX_FILES["y_test"]).unlink()
    with pytest.raises(ValueError, match=r"has no t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)"):
        load_dataset(tmp_path)


def test_image_sizes_must_agree(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / IDX_FILES["x_test"], np.zeros((5, 2, 2), np.uint8), magic=0x00000803)
    with pytest.raises(ValueError, match="has 12 features per sample but test data .* has 4"):
        load_dataset(tmp_path)


def test_unknown_spec(tmp_path):
    with pytest.raises(ValueError, match="does not exist: expected 'digits'"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="is not a .npz file"):
        load_dataset(tmp_path / "data.csv")


# ------------------------------------------------------------------ cache
def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    make_idx_dir(tmp_path)
    first = load_dataset(tmp_path)
    files = cache_files(tmp_path)
    assert [path.suffix for path in files].count(".npy") == 6 and [p.suffix for p in files].count(".json") == 1
    assert not [path for path in files if path.name.endswith(".tmp")]
    stamps = {path: path.stat().st_mtime_ns for path in files}

    def must_not_parse(*args, **kwargs):
        raise AssertionError("the IDX files were parsed again although the cache is current")

    monkeypatch.setattr(mnn.datasets, "read_idx", must_not_parse)
    second = load_dataset(tmp_path)
    assert {path: path.stat().st_mtime_ns for path in cache_files(tmp_path)} == stamps
    assert os.path.dirname(second.train.x.filename) == str((tmp_path / ".cache").resolve())
    np.testing.assert_array_equal(second.train.x, first.train.x)
    np.testing.assert_array_equal(second.train.std, first.train.std)


def test_changed_source_rebuilds_the_cache(tmp_path):
    make_idx_dir(tmp_path)
    assert load_dataset(tmp_path).train.y.max() <= 2
    labels_path = tmp_path / IDX_FILES["y_train"]
    stat = labels_path.stat()
    new_labels = np.full(12, 7, np.uint8)
    write_idx(labels_path, new_labels, magic=0x00000801)  # same size, new content
    os.utime(labels_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    data = load_dataset(tmp_path)
    np.testing.assert_array_equal(data.train.y, new_labels)
    assert data.n_classes == 8


def test_user_cache_dir_serves_two_datasets(tmp_path):
    written_a = make_idx_dir(tmp_path / "a", seed=1)
    written_b = make_idx_dir(tmp_path / "b", seed=2)
    cache = tmp_path / "shared-cache"
    a = load_dataset(tmp_path / "a", cache_dir=cache)
    b = load_dataset(tmp_path / "b", cache_dir=cache)
    assert not (tmp_path / "a" / ".cache").exists()
    assert len(list(cache.glob("*.json"))) == 2
    np.testing.assert_array_equal(a.train.x, written_a["x_train"].reshape(12, -1))
    np.testing.assert_array_equal(b.train.x, written_b["x_train"].reshape(12, -1))


def test_unwritable_cache_falls_back_to_memory(tmp_path):
    written = make_idx_dir(tmp_path / "data")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="could not write the dataset cache"):
        data = load_dataset(tmp_path / "data", cache_dir=blocker / "cache")
    assert not isinstance(data.train.x, np.memmap)
    np.testing.assert_array_equal(data.train.x, written["x_train"].reshape(12, -1))


def test_processes_building_the_cache_at_once_all_succeed(tmp_path):
    make_idx_dir(tmp_path, n_train=2000, n_test=100)
    code = ("import sys; from mnn.datasets import load_dataset; "
            "d = load_dataset(sys.argv[1]); print(int(d.train.x.sum()), len(d.test))")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), results
    assert len({out for out, _ in results}) == 1
    assert not [path for path in cache_files(tmp_path) if path.name.endswith(".tmp")]


# ------------------------------------------------------------------ npz
def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def valid_npz_arrays(rng=None):
    rng = rng or np.random.default_rng(3)
    return {"x_train": rng.normal(size=(20, 2, 3)), "y_train": rng.integers(0, 4, 20),
            "x_test": rng.normal(size=(6, 2, 3)), "y_test": rng.integers(0, 4, 6)}


def test_npz_loads_and_flattens(tmp_path):
    arrays = valid_npz_arrays()
    data = load_dataset(write_npz(tmp_path / "set.npz", **arrays))
    assert data.name == "set" and data.n_features == 6
    assert data.train.x.shape == (20, 6) and data.test.x.shape == (6, 6)
    np.testing.assert_array_equal(data.train.x, arrays["x_train"].reshape(20, 6))
    assert data.train.y.dtype == np.int64
    assert isinstance(data.train.x, np.memmap)


def test_npz_whole_float_labels_are_accepted(tmp_path):
    arrays = valid_npz_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float32)
    data = load_dataset(write_npz(tmp_path / "set.npz", **arrays))
    assert data.train.y.dtype == np.int64


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), r"lacks y_test: expected keys x_train, y_train, x_test, y_test, found"),
    (lambda a: a.update(y_train=np.full(20, 1.5)), "y_train must hold integer labels, found 1.5"),
    (lambda a: a.update(y_train=np.array(["a"] * 20)), "y_train must hold integer labels, got dtype <U1"),
    (lambda a: a.update(y_test=np.array([0, 1, -2, 0, 1, 1])), "y_test must hold non-negative labels, found -2"),
    (lambda a: a.update(y_train=np.zeros((20, 1), int)), r"y_train must be 1-D \(samples,\), got shape \(20, 1\)"),
    (lambda a: a.update(x_train=np.zeros(20)), r"x_train must be 2-D .* or 3-D .*, got shape \(20,\)"),
    (lambda a: a.update(x_test=np.zeros((6, 1, 2, 3))), r"x_test must be 2-D .* got shape \(6, 1, 2, 3\)"),
    (lambda a: a.update(x_test=np.full((6, 6), np.nan)), "x_test holds NaN or infinite values"),
    (lambda a: a.update(y_test=np.zeros(5, int)), "x_test has 6 samples but y_test has 5 labels"),
    (lambda a: a.update(x_train=np.array([None] * 20)), "member 'x_train.npy': .* allow_pickle=False"),
], ids=["missing-key", "fractional-label", "string-label", "negative-label", "2d-labels", "1d-x", "4d-x",
        "nan-x", "count-mismatch", "object-array"])
def test_bad_npz_is_a_clear_error(tmp_path, change, message):
    arrays = valid_npz_arrays()
    change(arrays)
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as caught:
        load_dataset(path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / ".cache").exists() or not list((tmp_path / ".cache").glob("*.json"))


@pytest.mark.parametrize("damage", ["cut-short", "not-zip", "bare-npy"])
def test_unreadable_npz_is_a_clear_error(tmp_path, damage):
    path = write_npz(tmp_path / "broken.npz", **valid_npz_arrays())
    content = path.read_bytes()
    if damage == "cut-short":
        path.write_bytes(content[:len(content) // 2])
    elif damage == "not-zip":
        path.write_bytes(b"x_train,y_train\n1,2\n")
    else:
        np.save(tmp_path / "broken.npy", np.zeros((3, 2)))
        (tmp_path / "broken.npy").replace(path)
    with pytest.raises(ValueError, match="is not a readable .npz file") as caught:
        load_dataset(path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / ".cache").exists() or not list((tmp_path / ".cache").glob("*.json"))


# ------------------------------------------------------------------ digits
def test_digits_shapes_and_split():
    pytest.importorskip("sklearn")
    data = load_dataset("digits")
    assert len(data.train) + len(data.test) == 1797
    assert (len(data.train), len(data.test)) == (1438, 359)
    assert data.n_features == 64 and data.n_classes == 10
    assert data.train.x.shape == (1438, 64)
    assert set(np.unique(data.test.y)) == set(range(10))
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(data.test.x[0], load_digits().data[4])


# ------------------------------------------------------------------ scaling and batches
def test_scaling_uses_training_statistics_only(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {"x_train": rng.normal(2.0, 3.0, size=(50, 4)), "y_train": rng.integers(0, 2, 50),
              "x_test": rng.normal(-10.0, 0.1, size=(10, 4)), "y_test": rng.integers(0, 2, 10)}
    data = load_dataset(write_npz(tmp_path / "s.npz", **arrays))
    np.testing.assert_allclose(data.train.mean, arrays["x_train"].mean(axis=0))
    np.testing.assert_allclose(data.train.std, arrays["x_train"].std(axis=0))
    np.testing.assert_array_equal(data.test.mean, data.train.mean)
    np.testing.assert_array_equal(data.test.std, data.train.std)
    x_train, _ = data.train.batch(np.arange(50), dtype=np.float64)
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0)
    x_test, y_test = data.test.batch(np.arange(10), dtype=np.float64)
    np.testing.assert_allclose(x_test, (arrays["x_test"] - arrays["x_train"].mean(0)) / arrays["x_train"].std(0))
    np.testing.assert_array_equal(y_test, arrays["y_test"])


def test_chunked_statistics_match_numpy(monkeypatch, tmp_path):
    monkeypatch.setattr(mnn.datasets, "_STATS_CHUNK_ROWS", 7)
    rng = np.random.default_rng(6)
    arrays = {"x_train": 1e6 + rng.normal(size=(40, 3)), "y_train": np.zeros(40, int),
              "x_test": np.zeros((1, 3)), "y_test": np.zeros(1, int)}
    data = load_dataset(write_npz(tmp_path / "c.npz", **arrays))
    np.testing.assert_allclose(data.train.mean, arrays["x_train"].mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(data.train.std, arrays["x_train"].std(axis=0), rtol=1e-9)


def test_only_a_constant_feature_is_left_unscaled(tmp_path):
    x_train = np.zeros((10, 3))
    x_train[:, 0] = np.arange(10)           # std 2.87
    x_train[:, 1] = 5.0                      # constant: centred, std 1
    x_train[:, 2] = 1e-3 * (np.arange(10) % 2)  # small, but its own scale
    arrays = {"x_train": x_train, "y_train": np.zeros(10, int),
              "x_test": np.array([[0.0, 6.0, 1e-3]]), "y_test": np.zeros(1, int)}
    data = load_dataset(write_npz(tmp_path / "k.npz", **arrays))
    np.testing.assert_allclose(data.train.std, [np.arange(10).std(), 1.0, 5e-4])
    x_test, _ = data.test.batch([0], dtype=np.float64)
    np.testing.assert_allclose(x_test[0], [-4.5 / np.arange(10).std(), 1.0, 1.0])


@pytest.mark.parametrize("large", ["one value of 1e300", "a column of N(0, 1e6)"])
def test_a_feature_on_a_large_scale_leaves_the_others_their_own(tmp_path, large):
    rng = np.random.default_rng(3)
    x_train = rng.normal(8.0, 4.0, size=(200, 3))
    if large == "one value of 1e300":
        x_train[7, 2] = 1e300
    else:
        x_train[:, 2] = rng.normal(0.0, 1e6, size=200)
    arrays = {"x_train": x_train, "y_train": np.zeros(200, int), "x_test": x_train[:5], "y_test": np.zeros(5, int)}
    data = load_dataset(write_npz(tmp_path / "big.npz", **arrays))
    np.testing.assert_allclose(data.train.std[:2], x_train[:, :2].std(axis=0), rtol=1e-9)
    x, _ = data.train.batch(np.arange(200), dtype=np.float32)
    np.testing.assert_allclose(x[:, :2].std(axis=0), 1.0, rtol=1e-5)


def test_digits_beside_a_column_of_n_0_1e6_still_train(tmp_path):
    """The trial's case: one column on a large scale beside the digits made every pixel
    "constant", and the MLP learned nothing (accuracy 0.10 instead of 0.88)."""
    from mnn.distributed.comm import SingleProcessCommunicator
    from mnn.distributed.training.config import TrainConfig
    from mnn.distributed.training.trainer import train
    digits = load_dataset("digits")
    rng = np.random.default_rng(0)
    arrays = {}
    for part in ("train", "test"):
        x = np.asarray(digits.train.x if part == "train" else digits.test.x)
        column = rng.normal(0.0, 1e6, size=(len(x), 1))
        arrays[f"x_{part}"] = np.hstack([x, column])
        arrays[f"y_{part}"] = np.asarray(getattr(digits, part).y)
    path = write_npz(tmp_path / "digits_and_noise.npz", **arrays)
    summary = train(TrainConfig(dataset=str(path), layers=[65, 32, 10], epochs=3, lr=0.1),
                    SingleProcessCommunicator())
    assert summary["test_accuracy"] >= 0.85


def test_batch_reads_rows_in_order_with_dtype(tmp_path):
    written = make_idx_dir(tmp_path)
    data = load_dataset(tmp_path)
    x, y = data.train.batch(np.array([5, 0, 5]))
    assert x.dtype == np.float32 and x.shape == (3, 12) and y.dtype == np.int64
    expected = (written["x_train"].reshape(12, -1)[[5, 0, 5]] - data.train.mean) / data.train.std
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    np.testing.assert_array_equal(y, written["y_train"][[5, 0, 5]])
    x64, _ = data.train.batch([1, 2], dtype=np.float64)
    assert x64.dtype == np.float64
    empty_x, empty_y = data.test.batch([])
    assert empty_x.shape == (0, 12) and empty_y.shape == (0,)
    assert data.train.x.flags.writeable is False  # scaling never writes into the mapped file


def test_batch_rejects_bad_indices_and_dtype(tmp_path):
    make_idx_dir(tmp_path)
    data = load_dataset(tmp_path)
    with pytest.raises(TypeError, match="1-D integer array, got shape"):
        data.train.batch(np.array([0.5, 1.0]))
    with pytest.raises(TypeError, match="1-D integer array"):
        data.train.batch(np.zeros((2, 2), int))
    with pytest.raises(TypeError, match="floating type, got int32"):
        data.train.batch([0], dtype=np.int32)


def test_check_classes(tmp_path):
    arrays = valid_npz_arrays()
    arrays["y_test"][2] = 9
    data = load_dataset(write_npz(tmp_path / "labels.npz", **arrays))
    assert data.n_classes == 10
    data.check_classes(10)
    with pytest.raises(ValueError, match=r"the test labels in .*labels.npz \(y_test\) include 9, but the model "
                       r"has 4 classes \(expected labels in \[0, 4\)\)"):
        data.check_classes(4)
    with pytest.raises(ValueError, match="positive integer"):
        data.check_classes(0)


# ------------------------------------------------------------------ empty splits
def npz_with(tmp_path, **changes):
    arrays = valid_npz_arrays()
    arrays.update(changes)
    return write_npz(tmp_path / "data.npz", **arrays)


@pytest.mark.parametrize("changes, message", [
    ({"x_train": np.zeros((0, 2, 3)), "y_train": np.zeros(0, int)},
     r"the training split has no samples \(x_train of shape \(0, 2, 3\)\)"),
    ({"x_test": np.zeros((0, 6)), "y_test": np.zeros(0, int)},
     r"the test split has no samples \(x_test of shape \(0, 6\)\)"),
    ({"x_train": np.zeros((20, 0)), "x_test": np.zeros((6, 0))},
     r"the samples of the training split have no features \(x_train of shape \(20, 0\)\)"),
], ids=["no-training-samples", "no-test-samples", "no-features"])
def test_empty_npz_split_names_file_and_split(tmp_path, changes, message):
    path = npz_with(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as caught:
        load_dataset(path)
    assert str(caught.value).startswith(f"npz file {path}: ")


@pytest.mark.parametrize("part", ["train", "test"])
def test_empty_idx_split_names_file_and_split(tmp_path, part):
    make_idx_dir(tmp_path)
    images = write_idx(tmp_path / IDX_FILES[f"x_{part}"], np.zeros((0, *IMAGE_SHAPE), np.uint8), magic=0x00000803)
    write_idx(tmp_path / IDX_FILES[f"y_{part}"], np.zeros(0, np.uint8), magic=0x00000801)
    words = {"train": "training", "test": "test"}[part]
    with pytest.raises(ValueError, match=rf"the {words} split has no samples \(images of shape \(0, 4, 3\)\)"
                       ) as caught:
        load_dataset(tmp_path)
    assert str(caught.value).startswith(f"IDX file {images}: ")


@pytest.mark.parametrize("empty, message", [
    ("train", r"dataset mine: the training split in mine x_train/y_train has no samples"),
    ("test", r"dataset mine: the test split in mine x_test/y_test has no samples"),
    ("features", r"mine: the samples of x_train have no features \(shape \(4, 3, 0\)\)"),
])
def test_empty_arrays_split_names_it(empty, message):
    x, y = np.ones((4, 3)), np.zeros(4, int)
    arrays = {"train": (x[:0], y[:0], x, y), "test": (x, y, x[:0], y[:0]),
              "features": (np.ones((4, 3, 0)), y, np.ones((4, 3, 0)), y)}[empty]
    with pytest.raises(ValueError, match=message):
        Dataset.from_arrays(*arrays, name="mine")


# ------------------------------------------------------------------ absurd IDX headers
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_header_with_absurd_sizes_reports_them_exactly(tmp_path, gz):
    make_idx_dir(tmp_path)
    huge = 2 ** 31 - 1
    header = (0x00000803).to_bytes(4, "big") + huge.to_bytes(4, "big") * 3
    path = tmp_path / (IDX_FILES["x_train"] + (".gz" if gz else ""))
    (tmp_path / IDX_FILES["x_train"]).unlink()
    path.write_bytes(gzip.compress(header + bytes(10)) if gz else header + bytes(10))
    file_has = "the decompressed file has" if gz else "the file has"
    # (2**31 - 1)**3 overflows int64 (and wraps silently in np.prod).
    with pytest.raises(ValueError, match=rf"is truncated: its header claims 2147483647 images of 2147483647x2147483647 "
                       rf"= {huge ** 3} bytes of data, {file_has} 10 after its 16-byte header") as caught:
        load_dataset(tmp_path)
    assert str(caught.value).startswith(f"IDX file {path} ")
    labels = tmp_path / IDX_FILES["y_test"]
    labels.write_bytes((0x00000801).to_bytes(4, "big") + (2 ** 32 - 1).to_bytes(4, "big"))
    with pytest.raises(ValueError, match=r"its header claims 4294967295 labels = 4294967295 bytes of data, the file "
                       r"has 0 after its 8-byte header"):
        read_idx(labels, ndim=1)


# ------------------------------------------------------------------ huge values
def huge_feature_arrays(scale):
    """Data whose feature 1, which decides the label, is 1e10 times larger than the others; all times ``scale``."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(60, 3))
    x[:, 1] = rng.uniform(-1.0, 1.0, 60) * 1e10
    x *= scale
    labels = (x[:, 1] > 0).astype(int)
    return {"x_train": x[:50], "y_train": labels[:50], "x_test": x[50:], "y_test": labels[50:]}


def test_feature_of_1e200_standardises_like_the_same_data_scaled_down(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    big = load_dataset(write_npz(tmp_path / "big" / "data.npz", **huge_feature_arrays(1e190)))
    small = load_dataset(write_npz(tmp_path / "small" / "data.npz", **huge_feature_arrays(1.0)))
    assert big.train.x[:, 1].max() > 9e199
    assert np.isfinite(big.train.std).all() and big.train.std[1] > 1e199
    np.testing.assert_allclose(big.train.mean / 1e190, small.train.mean, rtol=1e-12)
    np.testing.assert_allclose(big.train.std / 1e190, small.train.std, rtol=1e-12)
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 1e-6)):
        for split in ("train", "test"):
            x_big, _ = getattr(big, split).batch(np.arange(len(getattr(big, split))), dtype)
            x_small, _ = getattr(small, split).batch(np.arange(len(getattr(small, split))), dtype)
            assert x_big.dtype == dtype and np.isfinite(x_big).all()
            np.testing.assert_allclose(x_big, x_small, rtol=rtol, atol=rtol)
    assert abs(big.train.batch(np.arange(50), np.float64)[0][:, 1].std() - 1.0) < 1e-12

    # And so they train alike: a few SGD steps of a linear classifier give the same weights.
    from mnn import CrossEntropyLossLayer, LinearLayer, SequentialLayers
    weights = []
    for data in (big, small):
        net = SequentialLayers([LinearLayer(3, 2, rng=0, dtype=np.float32), CrossEntropyLossLayer()])
        for start in range(0, 50, 10):
            x, y = data.train.batch(np.arange(start, start + 10))
            net(x, y)
            net.backward()
            net.step(0.1)
            net.zero_grads()
        weights.append(net.state_dict()["0.LinearLayer.w"])
    np.testing.assert_allclose(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_float32_data_near_its_largest_value_gives_finite_float32_batches(tmp_path):
    rng = np.random.default_rng(12)
    # A mean near 2e38: a test value of -3e38 is 5e38 away from it, beyond float32's 3.4e38.
    x_train = rng.uniform(1e38, 3.4e38, size=(40, 2)).astype(np.float32)
    x_test = np.array([[3e38, -3e38], [-3e38, 3.4e38], [1.0, 0.0]], np.float32)
    data = load_dataset(write_npz(tmp_path / "f32.npz", x_train=x_train, y_train=np.zeros(40, int),
                                  x_test=x_test, y_test=np.zeros(3, int)))
    for split in (data.train, data.test):
        x, _ = split.batch(np.arange(len(split)), np.float32)
        assert x.dtype == np.float32 and np.isfinite(x).all()
        expected = (split.x.astype(np.float64) - data.train.mean) / data.train.std
        np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_test_value_far_outside_the_training_range_is_clipped_to_finite(tmp_path):
    rng = np.random.default_rng(13)
    x_test = np.array([[1e300, 0.0], [-1e300, 0.5]])
    data = load_dataset(write_npz(tmp_path / "far.npz", x_train=rng.normal(size=(30, 2)), y_train=np.zeros(30, int),
                                  x_test=x_test, y_test=np.zeros(2, int)))
    x, _ = data.test.batch([0, 1], np.float32)
    np.testing.assert_array_equal(x[:, 0], [np.finfo(np.float32).max, -np.finfo(np.float32).max])
    np.testing.assert_allclose(x[:, 1], (x_test[:, 1] - data.train.mean[1]) / data.train.std[1], rtol=1e-6)
    x64, _ = data.test.batch([0, 1], np.float64)
    assert np.isfinite(x64).all()


def test_feature_spanning_more_than_float64_holds_is_rejected_at_load(tmp_path):
    x_train = np.zeros((4, 3))
    x_train[:, 2] = [-1e308, 1e308, 0.0, 1.0]
    path = write_npz(tmp_path / "wide.npz", x_train=x_train, y_train=np.zeros(4, int),
                     x_test=np.zeros((1, 3)), y_test=np.zeros(1, int))
    with pytest.raises(ValueError, match=rf"npz file {path}: feature 2 of x_train spans -1e\+308 to 1e\+308, a range "
                       r"float64 cannot hold .* so it cannot be standardised: rescale the data"):
        load_dataset(path)


def test_arrays_used_as_given_must_fit_the_batch_dtype():
    x = np.ones((4, 2))
    x[3, 1] = 1e200
    data = Dataset.from_arrays(x, np.zeros(4, int), np.ones((2, 2)), np.zeros(2, int), name="mine")
    with pytest.raises(ValueError, match=r"train split \(mine x_train/y_train\): x holds values up to 1e\+200 in "
                       r"magnitude, beyond float32's range \(3.4e\+38\); .* rescale it or train in float64"):
        data.train.batch([0], np.float32)
    x64, _ = data.train.batch([3], np.float64)
    np.testing.assert_array_equal(x64, x[3:])
    assert data.test.check_dtype(np.float32) == np.float32
    targets = Dataset.from_arrays(np.ones((2, 1)), np.array([1.0, -1e300]), np.ones((1, 1)), np.ones(1))
    with pytest.raises(ValueError, match="y holds values up to 1e\\+300"):
        targets.train.check_dtype(np.float32)
