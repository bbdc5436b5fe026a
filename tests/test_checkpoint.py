"""Checkpoint files: exact round trip, no pickle, atomic replacement.

The atomic writer and the .npz reader themselves are tested in test_io.py.
"""
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from mnn.distributed.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mnn.distributed.position import Position
from mnn.io import save_arrays


def make_checkpoint(step=3):
    rng = np.random.default_rng(step)
    return Checkpoint(
        model_state={"0.LinearLayer.w": rng.standard_normal((4, 3)).astype(np.float32),
                     "0.LinearLayer.b": np.zeros(4, np.float32)},
        optimizer_state={"velocity.0.LinearLayer.w": rng.standard_normal((4, 3)),
                         "step": np.array(step, np.int64)},
        position=Position(epochs_done=1, step_in_epoch=step, global_step=10 + step, samples_seen=640 + step),
        world_size=2, config={"layers": [3, 4], "lr": 0.1, "output": None},
    )


def assert_same(loaded, expected):
    for field in ("position", "world_size", "config"):
        assert getattr(loaded, field) == getattr(expected, field), field
    for state in ("model_state", "optimizer_state"):
        got, want = getattr(loaded, state), getattr(expected, state)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key])


def test_round_trip_is_exact(tmp_path):
    checkpoint = make_checkpoint()
    save_checkpoint(tmp_path / "checkpoint.npz", checkpoint)
    assert_same(load_checkpoint(tmp_path / "checkpoint.npz"), checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


def test_file_is_a_plain_npz_without_pickled_objects(tmp_path):
    save_checkpoint(tmp_path / "c.npz", make_checkpoint())
    with np.load(tmp_path / "c.npz", allow_pickle=False) as archive:
        assert archive["config_json"].dtype == np.uint8
        assert "model/0.LinearLayer.w" in archive.files


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    for junk in (b"not a zip file", b"PK\x03\x04 cut short"):
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(ValueError, match="not a readable .npz"):
            load_checkpoint(tmp_path / "junk.npz")
    save_arrays(tmp_path / "model.npz", {"w": np.ones(2)})
    with pytest.raises(ValueError, match="not an mnn checkpoint: missing"):
        load_checkpoint(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.npz")


def test_process_killed_mid_write_keeps_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.npz"
    old = make_checkpoint(step=1)
    save_checkpoint(path, old)
    # A child process starts writing a new checkpoint and dies abruptly (no cleanup,
    # no exception handlers) right after the data reached its temporary file.
    child = textwrap.dedent(f"""
        import os
        import numpy as np
        from mnn.distributed import checkpoint
        from mnn.distributed.position import Position
        os.fsync = lambda fd: os._exit(9)
        state = {{"0.LinearLayer.w": np.full((4, 3), 7.0, np.float32)}}
        checkpoint.save_checkpoint({str(path)!r}, checkpoint.Checkpoint(
            state, {{}}, Position(5, 0, 99, 999), 1, {{}}))
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()
    assert_same(load_checkpoint(path), old)

    # The killed writer's hidden temporary file stays (it cannot be told apart
    # from a live writer's), and the next save is not disturbed by it.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.npz"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.npz.") and leftovers[0].endswith(".tmp")
    new = make_checkpoint(step=2)
    save_checkpoint(path, new)
    assert_same(load_checkpoint(path), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.npz", *leftovers])
    assert zipfile.is_zipfile(path)
