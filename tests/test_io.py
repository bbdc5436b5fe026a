"""mnn.io on real files: whole-or-nothing replacement, concurrent writers, .npz without pickle,
every damaged .npy member a ValueError naming file, member and problem (see also test_corrupt_files.py)."""
import io
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

from mnn.io import atomic_copy, atomic_write, atomic_write_text, clean_stale_temporaries, load_arrays, save_arrays


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
     r"member 'x.npy': it holds Python objects \(dtype object\), which only pickle can read: refused"),
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


# ------------------------------------------------------------------ damaged .npy members
def npy_member(header, data=b"", version=(1, 0)):
    """The bytes of a .npy file with this header text (not checked) and data."""
    header = header.encode("latin1" if version < (3, 0) else "utf8") if isinstance(header, str) else header
    length = struct.pack("<H" if version == (1, 0) else "<I", len(header))
    return b"\x93NUMPY" + bytes(version) + length + header + data


def write_members(path, members):
    """An .npz with these members' bytes as given: zipfile computes their CRCs, so only
    the .npy reader can find what is wrong with them."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


F8_THREE = np.arange(3, dtype="<f8").tobytes()


@pytest.mark.parametrize("member, message", [
    # numpy's reader falls back to tokenize for version 1.0 headers it cannot parse: TokenError
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (3,", F8_THREE),
     r"its .npy header is not a Python dict literal \(SyntaxError: .*\): \"\{'descr'"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }\n'''", F8_THREE),
     r"its .npy header is not a Python dict literal \(SyntaxError"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (3L,), }", F8_THREE),
     r"not a Python dict literal"),
    (npy_member("(" * 3000 + ")" * 3000, F8_THREE), "not a Python dict literal"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (1" + "0" * 5000 + ",), }", F8_THREE),
     r"not a Python dict literal \(SyntaxError: Exceeds the limit"),
    (npy_member(" " * 20 + "\n"), r"its .npy header is empty \(21 bytes of blanks\)"),
    (npy_member("[1, 2]", F8_THREE), "not a dict with the keys descr, fortran_order and shape: '\\[1, 2\\]'"),
    (npy_member("{'descr': '<f8', 'shape': (3,)}", F8_THREE), "not a dict with the keys"),
    (npy_member("{'descr': '<f8', 'fortran_order': 'no', 'shape': (3,)}", F8_THREE),
     "has fortran_order 'no', not True or False"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (-3,)}", F8_THREE),
     r"has shape \(-3,\), not a tuple of non-negative integers"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': [3]}", F8_THREE), r"has shape \[3\]"),
    (npy_member("{'descr': '<f9', 'fortran_order': False, 'shape': (3,)}", F8_THREE),
     r"has descr '<f9', not a NumPy dtype \(TypeError"),
    (npy_member("{'descr': [('a',)], 'fortran_order': False, 'shape': (3,)}", F8_THREE),
     r"has descr \[\('a',\)\], not a NumPy dtype"),
    (npy_member("{'descr': 5, 'fortran_order': False, 'shape': (3,)}", F8_THREE), "has descr 5, not a NumPy dtype"),
    (npy_member("{'descr': ('<f8', (3,)), 'fortran_order': False, 'shape': ()}", F8_THREE),
     r"has descr \('<f8', \(3,\)\), a subarray dtype, which no saved array has"),
    (npy_member("{'descr': '|O', 'fortran_order': False, 'shape': (1,)}", b"\x80\x04N."),
     r"holds Python objects \(dtype object\), which only pickle can read"),
    (npy_member("{'descr': [('a', '<f8'), ('b', '|O')], 'fortran_order': False, 'shape': (1,)}", bytes(16)),
     "holds Python objects"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,)}", F8_THREE),
     r"claims shape \(1000000000000,\) of float64 = 8000000000000 bytes of data, but the member holds 24"),
    (npy_member("{'descr': '|u1', 'fortran_order': False, 'shape': (4294967296, 4294967296)}", F8_THREE),
     r"claims shape \(4294967296, 4294967296\) of uint8 = 18446744073709551616 bytes of data, but the member "
     r"holds 24"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (2,)}", F8_THREE),
     r"claims shape \(2,\) of float64 = 16 bytes of data, but the member holds 24"),
    (npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (3,)}", F8_THREE[:-1]),
     "= 24 bytes of data, but the member holds 23"),
    (npy_member(b"{'descr': '\xff<f8', 'fortran_order': False, 'shape': (3,)}", F8_THREE, version=(3, 0)),
     "its .npy header is not utf8 text"),
    (b"\x93NUMPY\x01\x00" + struct.pack("<H", 200) + b"{'descr'", "it is cut short: its .npy header needs 200 "
     "bytes, found 8"),
    (b"\x93NUMPY\x02\x00" + struct.pack("<I", 2 ** 31), "its .npy header claims 2147483648 bytes, more than the "
     "10000"),
    (b"\x93NUMPY\x09\x00", r"its .npy format version 9.0 is not one of 1.0, 2.0, 3.0"),
    (b"\x93NUMPX\x01\x00", r"it is not a .npy array: it starts with b'\\x93NUMPX'"),
    (b"\x93NUM", "it is cut short: its .npy magic string and version needs 8 bytes, found 4"),
], ids=["unclosed-tuple(TokenError)", "unclosed-string(TokenError)", "python2-long", "deep-nesting",
        "5000-digit-int", "empty-header", "not-a-dict", "missing-key", "fortran-order-text", "negative-size",
        "shape-list", "unknown-descr", "descr-short-field", "descr-int", "descr-subarray", "object-pickle",
        "object-field",
        "shape-1e12", "shape-overflows-int64", "trailing-data", "data-cut-short", "not-utf8-v3",
        "header-cut-short", "header-length-2GiB", "version-9", "bad-magic", "magic-cut-short"])
def test_damaged_npy_member_names_file_member_and_problem(tmp_path, member, message):
    path = tmp_path / "damaged.npz"
    write_members(path, {"good.npy": npy_bytes(np.ones(2)), "bad.npy": member})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "created on Python 2" warning either
        with pytest.raises(ValueError, match=message) as caught:
            load_arrays(path)
    assert str(caught.value).startswith(f"{str(path)!r} is not a readable .npz file: member 'bad.npy': ")


def assert_refused_without_allocating(path, message):
    """load_arrays(path) raises ValueError matching ``message`` with less than 1 MiB allocated at the peak."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            load_arrays(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_header_claiming_a_huge_shape_allocates_nothing(tmp_path):
    path = tmp_path / "huge.npz"
    # 2 GiB would be allocated (and then found missing) by a reader that trusts the header.
    write_members(path, {"w.npy": npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (268435456,)}",
                                             F8_THREE)})
    assert_refused_without_allocating(path, r"= 2147483648 bytes of data, but the member holds 24")


def test_unsupported_zip_version_is_a_clear_error(tmp_path):
    # zipfile raises NotImplementedError for it; a flipped byte in the central directory does the same.
    path = tmp_path / "future.npz"
    info = zipfile.ZipInfo("w.npy")
    info.extract_version = 99
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, npy_bytes(np.ones(2)))
    with pytest.raises(ValueError, match=r"is not a readable .npz file: it needs a zip feature that is not "
                       r"supported \(zip file version 9.9\)") as caught:
        load_arrays(path)
    assert str(path) in str(caught.value)


def test_duplicate_member_is_a_clear_error(tmp_path):
    path = tmp_path / "twice.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        write_members(path, {"w.npy": npy_bytes(np.ones(2))})
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("w.npy", npy_bytes(np.zeros(2)))
    with pytest.raises(ValueError, match="member 'w.npy' appears twice"):
        load_arrays(path)


def test_every_npy_layout_numpy_writes_loads_writable(tmp_path):
    arrays = {"fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "scalar": np.array(2.5),
              "empty": np.zeros((0, 3), np.float32), "big-endian": np.arange(4, dtype=">i4"),
              "record": np.array([(1, 2.0)], dtype=[("a", "<i2"), ("b", "<f8")]), "text": np.array(["é", "ab"])}
    members = {f"{name}.npy": npy_bytes(array) for name, array in arrays.items()}
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.arange(3.0), version=(2, 0))
    members["v2.npy"] = buffer.getvalue()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns that 3.0 files need numpy >= 1.17
        np.lib.format.write_array(buffer, np.zeros(2, dtype=[("\u00e9t\u00e9", "<f4")]), version=(3, 0))
    members["v3.npy"] = buffer.getvalue()
    write_members(tmp_path / "all.npz", members)
    loaded = load_arrays(tmp_path / "all.npz")
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)
    np.testing.assert_array_equal(loaded["v2"], np.arange(3.0))
    assert loaded["v3"].dtype.names == ("\u00e9t\u00e9",)
    assert loaded["fortran"].flags.f_contiguous
    for array in loaded.values():
        assert array.flags.writeable


def test_names_reads_only_those_arrays(tmp_path):
    path = tmp_path / "a.npz"
    write_members(path, {"w.npy": npy_bytes(np.ones(2)), "bad.npy": b"not an array"})
    assert list(load_arrays(path, names=("w",))) == ["w"]
    with pytest.raises(ValueError, match=r"has no array named 'b'"):
        load_arrays(path, names=("w", "b"))


# ------------------------------------------------------------------ copies and leftovers
@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links"])
def test_atomic_copy_replaces_the_target_whole(tmp_path, monkeypatch, links):
    if not links:
        def no_link(*args):
            raise OSError("hard links are not supported here")
        monkeypatch.setattr(os, "link", no_link)
    source, target = tmp_path / "a.npz", tmp_path / "b.npz"
    save_arrays(source, {"w": np.arange(3.0)})
    target.write_bytes(b"old")
    atomic_copy(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert os.path.samefile(source, target) == links
    save_arrays(source, {"w": np.zeros(1)})  # replacing the source leaves the copy as it was
    np.testing.assert_array_equal(load_arrays(target)["w"], np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]


def test_clean_stale_temporaries_removes_only_what_atomic_write_names(tmp_path):
    stale = [tmp_path / f".checkpoint.npz.{'a' * 32}.tmp",
             tmp_path / f".summary.json.{'0123456789abcdef' * 2}.tmp"]
    kept = [tmp_path / "checkpoint.npz", tmp_path / ".notes.tmp", tmp_path / f".x.{'a' * 31}.tmp",
            tmp_path / f"model.npz.{'b' * 32}.tmp", tmp_path / f".x.{'A' * 32}.tmp"]
    for path in stale + kept:
        path.write_bytes(b"")
    (tmp_path / f".dir.{'c' * 32}.tmp").mkdir()
    assert clean_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted([*kept, tmp_path / f".dir.{'c' * 32}.tmp"])
    assert clean_stale_temporaries(tmp_path / "absent") == []


def test_zip_entry_lying_about_its_size_allocates_nothing(tmp_path):
    # The zip's directory and the .npy header agree on 2 GiB; the file holds 24 bytes of data.
    size = 2 ** 31 - 1
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d,), }" % (size - 10 - 66)
    assert len(header) == 66
    path = tmp_path / "lying.npz"
    write_members(path, {"w.npy": npy_member(header, F8_THREE)})
    content = bytearray(path.read_bytes())
    directory = content.index(b"PK\x01\x02")
    content[directory + 20:directory + 28] = struct.pack("<II", size, size)  # compressed and real size
    path.write_bytes(bytes(content))
    assert_refused_without_allocating(path, r"member 'w.npy': it is cut short or damaged \(EOFError")
