"""Every damaged checkpoint is a ValueError that names the file (and the member when one is at fault).

A valid checkpoint written by save_checkpoint is damaged in about 1,300 seeded
ways: single bytes flipped across the whole file, cuts at many lengths, zeroed
ranges, and, with a consistent CRC (the zip rebuilt by zipfile around damaged
.npy bytes, so only the .npy reader can notice), bytes of each member's header
replaced, its dict text mangled or rewritten (a shape of 10**12 elements, an
object dtype with a pickle, a Python 2 long, a missing key), and its data cut
or extended. Each damaged file is read with load_checkpoint (which reads every
member with load_arrays; the rewritten headers with load_arrays alone too): it
either loads or raises ValueError, never another type, and a header claiming
a huge size allocates nothing. The explicit cases, with the message each
gives, are in test_io.py and test_checkpoint.py.
"""
import io
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from mnn.distributed.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mnn.distributed.training.position import Position
from mnn.io import load_arrays

SEED = 8
# Characters that break the header's dict literal in every way the parsers know.
HEADER_NOISE = list("(){}[]'\",:.-+0123456789LjeE \n\t\\#\x00\xff")
HEADER_REWRITES = [
    "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
    "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3L,), }",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (3,",
    "{'descr': '<f8', 'fortran_order': False, }",
    "{'descr': '<f8', 'fortran_order': True, 'shape': (1, 1, 1, 1, 1, 1, 1, 1), }",
    "{'descr': [('a', '<f8', (10000, 10000, 10000))], 'fortran_order': False, 'shape': (), }",
    "{'descr': ('<f8', (-1,)), 'fortran_order': False, 'shape': (), }",
    "{'descr': 'V0', 'fortran_order': False, 'shape': (10000000000000000000,), }",
    "'''",
    "",
]


def write_valid_checkpoint(path):
    rng = np.random.default_rng(SEED)
    save_checkpoint(path, Checkpoint(
        model_state={"0.LinearLayer.w": rng.standard_normal((4, 3)).astype(np.float32),
                     "0.LinearLayer.b": np.zeros(4, np.float32)},
        optimizer_state={"velocity.0.LinearLayer.w": rng.standard_normal((4, 3)), "step": np.array(3)},
        position=Position(1, 3, 13, 643), world_size=2, config={"layers": [3, 4], "lr": 0.1}))


def noise(rng, count):
    return "".join(HEADER_NOISE[index] for index in rng.integers(0, len(HEADER_NOISE), count))


def rezipped(members):
    """An .npz of these (name, bytes) members with CRCs that match them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members:
            archive.writestr(name, content)
    return buffer.getvalue()


def header_end(npy):
    """Where a version 1.0 .npy member's data starts (what save_arrays writes)."""
    return 10 + int.from_bytes(npy[8:10], "little")


def damaged_files(content, members, rng):
    """``(label, bytes, key)``: a damaged checkpoint, and the array whose member was damaged
    (None when the damage may fall anywhere)."""
    for offset in range(0, len(content), 6):
        damaged = bytearray(content)
        damaged[offset] ^= int(rng.integers(1, 256))
        yield f"byte {offset} flipped", bytes(damaged), None
    for length in range(0, len(content), 23):
        yield f"cut at {length} bytes", content[:length], None
    for start in rng.integers(0, len(content), 60):
        width = int(rng.integers(1, 200))
        yield f"bytes {start}..{start + width} zeroed", content[:start] + bytes(width) + content[start + width:], None

    for index, (name, npy) in enumerate(members):
        key = name[:-len(".npy")]

        def with_member(new_npy):
            return rezipped(members[:index] + [(name, new_npy)] + members[index + 1:])

        end = header_end(npy)
        for offset in range(0, end, 4):
            damaged = bytearray(npy)
            damaged[offset] = ord(noise(rng, 1)) if offset >= 10 else int(rng.integers(0, 256))
            yield f"{name}: header byte {offset} replaced", with_member(bytes(damaged)), key
        text = npy[10:end].decode("latin1")
        for _ in range(6):
            start = int(rng.integers(0, len(text)))
            stop = start + int(rng.integers(0, 12))
            inserted = noise(rng, int(rng.integers(0, 6)))
            mangled = (text[:start] + inserted + text[stop:]).encode("latin1")
            yield (f"{name}: header text {start}..{stop} replaced by {inserted!r}",
                   with_member(npy[:8] + len(mangled).to_bytes(2, "little") + mangled + npy[end:]), key)
        for rewrite in HEADER_REWRITES:
            header = rewrite.encode("latin1")
            data = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N." if "|O" in rewrite else npy[end:]
            yield (f"{name}: header rewritten as {rewrite!r}",
                   with_member(npy[:8] + len(header).to_bytes(2, "little") + header + data), key)
        yield f"{name}: data cut", with_member(npy[:-1]), key
        yield f"{name}: data extended", with_member(npy + b"\x00"), key


def test_damaged_checkpoints_load_or_raise_value_error_naming_file_and_member(tmp_path):
    write_valid_checkpoint(tmp_path / "valid.npz")
    content = (tmp_path / "valid.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "valid.npz") as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    path = tmp_path / "checkpoint.npz"
    outcomes = {"loaded": 0, "ValueError": 0}
    slowest, peak = (0.0, ""), (0, "")
    for label, damaged, key in damaged_files(content, members, np.random.default_rng(SEED)):
        path.write_bytes(damaged)
        # load_checkpoint reads every member with load_arrays, then checks the values.
        loads = [load_checkpoint] if "rewritten" not in label else [load_checkpoint, load_arrays]
        for load in loads:
            # CPU time, not the clock's: other processes on a loaded machine do not count.
            started = time.process_time()
            # Only for the headers that claim huge sizes: tracemalloc slows every allocation.
            tracing = "rewritten" in label
            if tracing:
                tracemalloc.start()
            try:
                load(path)
                outcomes["loaded"] += 1
            except ValueError as error:
                outcomes["ValueError"] += 1
                message = str(error)
                assert str(path) in message, (label, message)
                assert key is None or key in message, (label, message)
            except Exception as error:
                pytest.fail(f"{label}: {load.__name__} raised {type(error).__name__}: {error}")
            finally:
                if tracing:
                    peak = max(peak, (tracemalloc.get_traced_memory()[1], label))
                    tracemalloc.stop()
            slowest = max(slowest, (time.process_time() - started, label))
    assert sum(outcomes.values()) > 1300 and outcomes["ValueError"] > 1000, outcomes
    assert peak[0] < 1 << 20, f"{peak[0]} bytes allocated at the peak, for {peak[1]}"
    assert slowest[0] < 1.0, slowest
