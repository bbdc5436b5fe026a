"""mnn.io on real files: whole-or-nothing replacement, concurrent writers, .npz without pickle."""
import io
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from mnn.io import atomic_write, atomic_write_text, load_arrays, save_arrays


def sample_arrays():
    rng = np.random.default_rng(0)
    return {"0.LinearLayer.w": rng.standard_normal((4, 3)).astype(np.float32),
            "step": np.array(7, np.int64), "labels": np.arange(5, dtype=np.uint8),
            "names": np.array(["a", "bc"])}


def test_arrays_round_trip_exactly(tmp_path):
    arrays = sample_arrays()
    save_arrays(tmp_path / "a.npz", arrays)
    loaded = load_arrays(tmp_path / "a.npz")
    assert list(loaded) == list(arrays)
    for key, array in arrays.items():
        assert loaded[key].dtype == array.dtype and loaded[key].shape == array.shape
        np.testing.assert_array_equal(loaded[key], array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_keys_that_clash_with_savez_arguments_are_kept(tmp_path):
    arrays = {"file": np.arange(3), "allow_pickle": np.ones(2)}
    save_arrays(tmp_path / "a.npz", arrays)
    loaded = load_arrays(tmp_path / "a.npz")
    assert loaded.keys() == arrays.keys()


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(ValueError):
        save_arrays(tmp_path / "a.npz", {"x": np.array([{"a": 1}], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_numpy_npz_files_load_stored_and_compressed(tmp_path):
    arrays = sample_arrays()
    np.savez(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    for name in ("stored.npz", "compressed.npz"):
        loaded = load_arrays(tmp_path / name)
        for key, array in arrays.items():
            np.testing.assert_array_equal(loaded[key], array)


def test_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(ValueError, match="does not exist") as caught:
        load_arrays(path)
    assert str(path) in str(caught.value)


def written_npz_bytes(tmp_path):
    save_arrays(tmp_path / "whole.npz", {"w": np.arange(300, dtype=np.float64), "b": np.ones(7)})
    return (tmp_path / "whole.npz").read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.2, 0.5, 0.8, 0.95, 0.999])
def test_cut_short_file_is_a_clear_error(tmp_path, fraction):
    content = written_npz_bytes(tmp_path)
    path = tmp_path / "cut.npz"
    path.write_bytes(content[:int(len(content) * fraction)])
    with pytest.raises(ValueError, match="is not a readable .npz file") as caught:
        load_arrays(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("offset", [100, 1000, 2000])
def test_corrupt_member_is_a_clear_error(tmp_path, offset):
    content = bytearray(written_npz_bytes(tmp_path))
    content[offset] ^= 0xFF  # inside the first member: its header or data, caught by the CRC
    path = tmp_path / "corrupt.npz"
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"is not a readable .npz file: member 'w.npy'") as caught:
        load_arrays(path)
    assert str(path) in str(caught.value)


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_bytes(b"not a zip file"), "is not a readable .npz file"),
    (lambda path: path.write_bytes(npy_bytes(np.arange(3))), "is not a readable .npz file"),
    (lambda path: write_zip(path, {"notes.txt": "hello"}),
     "member 'notes.txt' is not a .npy array"),
    (lambda path: np.savez(path, x=np.array([None, 1], dtype=object)),
     r"member 'x.npy': Object arrays cannot be loaded when allow_pickle=False"),
], ids=["not-zip", "bare-npy", "other-member", "object-array"])
def test_files_that_are_not_plain_npz_are_clear_errors(tmp_path, make, message):
    path = tmp_path / "data.npz"
    make(path)
    with pytest.raises(ValueError, match=message) as caught:
        load_arrays(path)
    assert str(path) in str(caught.value)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoint.npz"
    save_arrays(path, {"w": np.full(3, 1.0)})

    def write_half_then_fail(handle):
        handle.write(b"PK partial bytes")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, write_half_then_fail)
    np.testing.assert_array_equal(load_arrays(path)["w"], np.full(3, 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


def test_text_replaces_the_old_file_with_usual_permissions(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second \u2713\n")
    assert path.read_text(encoding="utf-8") == "second \u2713\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    # Like a file made by open(): readable by others unless the umask says otherwise.
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_two_processes_writing_the_same_path_at_once_leave_one_whole_file(tmp_path):
    target = tmp_path / "out" / "shared.bin"
    target.parent.mkdir()
    signals = tmp_path / "signals"
    signals.mkdir()
    half = 1 << 20
    # Each writer writes half of its bytes, says so, and writes the rest only once
    # the other writer is also half way: both are inside atomic_write together.
    writer = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mnn.io import atomic_write
        me, other, fill = sys.argv[1], sys.argv[2], bytes([int(sys.argv[3])])
        def write(handle):
            handle.write(fill * {half})
            handle.flush()
            (Path({str(signals)!r}) / me).touch()
            deadline = time.monotonic() + 60
            while not (Path({str(signals)!r}) / other).exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the other writer never got half way")
                time.sleep(0.005)
            handle.write(fill * {half})
        atomic_write({str(target)!r}, write)
    """)
    processes = [subprocess.Popen([sys.executable, "-c", writer, me, other, fill], stderr=subprocess.PIPE)
                 for me, other, fill in (("a", "b", "97"), ("b", "a", "98"))]
    errors = [process.communicate(timeout=120)[1].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    content = target.read_bytes()
    assert content in (b"a" * (2 * half), b"b" * (2 * half))
    assert sorted(p.name for p in target.parent.iterdir()) == ["shared.bin"]
