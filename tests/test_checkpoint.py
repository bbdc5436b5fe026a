"""Checkpoint files: exact round trip, no pickle, atomic replacement, checked values, the last k kept.

The atomic writer and the .npz reader themselves are tested in test_io.py, and
every damaged checkpoint in test_corrupt_files.py.
"""
import os
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from mnn import LinearLayer, SequentialLayers
from mnn.distributed.training import checkpoint as checkpoint_module
from mnn.distributed.training.checkpoint import (BackgroundWriter, Checkpoint, find_checkpoints, load_checkpoint,
                                                load_newest_checkpoint, save_checkpoint)
from mnn.distributed.training.position import Position
from mnn.io import clean_stale_temporaries, load_arrays, save_arrays
from processes import run


def make_checkpoint(step=3, global_step=None):
    rng = np.random.default_rng(step)
    return Checkpoint(
        model_state={"0.LinearLayer.w": rng.standard_normal((4, 3)).astype(np.float32),
                     "0.LinearLayer.b": np.zeros(4, np.float32)},
        optimizer_state={"velocity.0.LinearLayer.w": rng.standard_normal((4, 3)),
                         "step": np.array(step, np.int64)},
        position=Position(epochs_done=1, step_in_epoch=step,
                          global_step=10 + step if global_step is None else global_step, samples_seen=640 + step),
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
        from mnn.distributed.training import checkpoint
        from mnn.distributed.training.position import Position
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

    # Once no writer can be live (the trainer holds the directory's lock), it goes.
    assert clean_stale_temporaries(tmp_path) == [tmp_path / leftovers[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


# ------------------------------------------------------------------ stored values are checked
def rewritten(tmp_path, **changes):
    """A valid checkpoint's arrays with some replaced (None: removed), saved as a new file."""
    save_checkpoint(tmp_path / "valid.npz", make_checkpoint())
    arrays = load_arrays(tmp_path / "valid.npz")
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    save_arrays(tmp_path / "changed.npz", arrays)
    return tmp_path / "changed.npz"


@pytest.mark.parametrize("changes, message", [
    ({"global_step": np.array([1, 2])}, r"global_step must be an integer scalar, got shape \(2,\) of int64"),
    ({"epoch": np.array(1.5)}, r"epoch must be an integer scalar, got shape \(\) of float64"),
    ({"samples_seen": np.array(-1)}, "samples_seen must be at least 0, got -1"),
    ({"world_size": np.array(0)}, "world_size must be at least 1, got 0"),
    ({"format_version": np.array("1")}, "format_version must be an integer scalar"),
    ({"format_version": np.array(2)}, r"expected checkpoint format 1, got 2 \(format_version\)"),
    ({"config_json": np.frombuffer(b"[1, 2]", np.uint8)}, r"the stored config \(config_json\) is not a JSON object"),
    ({"config_json": np.frombuffer(b"{\"lr\": ", np.uint8)}, r"the stored config \(config_json\) is not valid JSON"),
    ({"config_json": np.frombuffer(b"\xff\xfe", np.uint8)}, "is not valid JSON"),
    ({"config_json": np.zeros(3)}, r"config_json\) must be 1-D uint8 \(JSON text\), got shape \(3,\) of float64"),
    ({"step_in_epoch": None}, "is not an mnn checkpoint: missing step_in_epoch"),
], ids=["step-not-scalar", "epoch-float", "negative-samples", "no-ranks", "version-text", "version-2",
        "config-list", "config-cut", "config-not-utf8", "config-floats", "missing-field"])
def test_wrong_stored_values_are_clear_errors(tmp_path, changes, message):
    path = rewritten(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(repr(str(path)))


# ------------------------------------------------------------------ keeping the last k
def saved_steps(directory):
    return {path.name: load_checkpoint(path).position.global_step for path in sorted(directory.iterdir())}


def test_keep_k_leaves_the_newest_as_checkpoint_npz_and_k_minus_1_older(tmp_path):
    path = tmp_path / "checkpoint.npz"
    for step in (10, 20, 30, 40):
        save_checkpoint(path, make_checkpoint(global_step=step), keep=3)
    assert saved_steps(tmp_path) == {"checkpoint-00000020.npz": 20, "checkpoint-00000030.npz": 30,
                                     "checkpoint.npz": 40}
    assert find_checkpoints(tmp_path) == [path, tmp_path / "checkpoint-00000030.npz",
                                          tmp_path / "checkpoint-00000020.npz"]
    # Kept by a hard link: the newest is a file of its own, the older one untouched.
    assert not os.path.samefile(path, tmp_path / "checkpoint-00000030.npz")
    assert_same(load_checkpoint(tmp_path / "checkpoint-00000030.npz"), make_checkpoint(global_step=30))


def test_keep_1_writes_only_checkpoint_npz_and_drops_older_ones(tmp_path):
    path = tmp_path / "checkpoint.npz"
    for step in (10, 20, 30):
        save_checkpoint(path, make_checkpoint(global_step=step), keep=3)
    save_checkpoint(path, make_checkpoint(global_step=40))
    assert saved_steps(tmp_path) == {"checkpoint.npz": 40}
    (tmp_path / "checkpoint-1.npz").write_bytes(b"a user's own file, not a name this module writes")
    save_checkpoint(path, make_checkpoint(global_step=50), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000040.npz", "checkpoint-1.npz",
                                                          "checkpoint.npz"]


def test_saving_a_step_again_or_an_earlier_one_drops_the_abandoned_steps(tmp_path):
    path = tmp_path / "checkpoint.npz"
    for step in (10, 20, 30):
        save_checkpoint(path, make_checkpoint(global_step=step), keep=3)
    save_checkpoint(path, make_checkpoint(global_step=30), keep=3)  # the same step again: no duplicate
    assert saved_steps(tmp_path) == {"checkpoint-00000010.npz": 10, "checkpoint-00000020.npz": 20,
                                     "checkpoint.npz": 30}
    # Resumed from step 10: steps 20 and 30 belong to the abandoned run.
    save_checkpoint(path, make_checkpoint(global_step=15), keep=3)
    assert saved_steps(tmp_path) == {"checkpoint-00000010.npz": 10, "checkpoint.npz": 15}


def test_keep_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ValueError, match="keep: expected an integer >= 1, got 0"):
        save_checkpoint(tmp_path / "checkpoint.npz", make_checkpoint(), keep=0)
    with pytest.raises(TypeError, match="keep: expected an integer"):
        save_checkpoint(tmp_path / "checkpoint.npz", make_checkpoint(), keep=2.0)
    assert list(tmp_path.iterdir()) == []


def test_newest_that_loads_is_resumed_and_the_skipped_ones_say_why(tmp_path):
    path = tmp_path / "checkpoint.npz"
    assert load_newest_checkpoint(tmp_path) is None and find_checkpoints(tmp_path / "absent") == []
    for step in (10, 20, 30):
        save_checkpoint(path, make_checkpoint(global_step=step), keep=3)
    newest = load_newest_checkpoint(tmp_path)
    assert newest.path == path and newest.checkpoint.position.global_step == 30 and newest.skipped == []

    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])
    newest = load_newest_checkpoint(tmp_path)
    assert newest.path == tmp_path / "checkpoint-00000020.npz"
    assert_same(newest.checkpoint, make_checkpoint(global_step=20))
    [(skipped, reason)] = newest.skipped
    assert skipped == path and reason.startswith(f"{str(path)!r} is not a readable .npz file")

    # Training on from step 20: the damaged file is replaced, not kept.
    save_checkpoint(path, make_checkpoint(global_step=25), keep=3)
    assert saved_steps(tmp_path) == {"checkpoint-00000010.npz": 10, "checkpoint-00000020.npz": 20,
                                     "checkpoint.npz": 25}

    for candidate in find_checkpoints(tmp_path):
        candidate.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be read: .*checkpoint.npz' is not a readable "
                       r".*checkpoint-00000020.npz' is not a readable.*checkpoint-00000010.npz' is not"):
        load_newest_checkpoint(tmp_path)


@pytest.mark.parametrize("member, value, message", [
    ("model/0.LinearLayer.w", np.nan, "model/0.LinearLayer.w holds 1 NaN or infinite value of 12"),
    ("model/0.LinearLayer.b", np.inf, "model/0.LinearLayer.b holds 1 NaN or infinite value of 4"),
    ("optimizer/velocity.0.LinearLayer.w", np.nan, "optimizer/velocity.0.LinearLayer.w holds 1 NaN value"),
])
def test_weights_that_are_not_finite_are_damage_and_resume_falls_back(tmp_path, member, value, message):
    """The trial's case: a checkpoint whose weights held NaN loaded, and the run then blamed
    the learning rate."""
    path = tmp_path / "checkpoint.npz"
    for step in (10, 20):
        save_checkpoint(path, make_checkpoint(global_step=step), keep=2)
    arrays = load_arrays(path)
    arrays[member] = arrays[member].copy()
    arrays[member].flat[1] = value
    save_arrays(path, arrays)
    with pytest.raises(ValueError, match=f"{str(path)!r} is damaged: {message}"):
        load_checkpoint(path)
    newest = load_newest_checkpoint(tmp_path)
    assert newest.path == tmp_path / "checkpoint-00000010.npz" and newest.skipped[0][0] == path


def test_an_infinite_optimizer_moment_loads(tmp_path):
    checkpoint = make_checkpoint()
    checkpoint.optimizer_state["velocity.0.LinearLayer.w"][0, 0] = np.inf  # an Adam moment can overflow
    save_checkpoint(tmp_path / "checkpoint.npz", checkpoint)
    assert_same(load_checkpoint(tmp_path / "checkpoint.npz"), checkpoint)


def test_save_stopped_between_keeping_and_writing_lists_the_file_once(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.npz"
    for step in (10, 20):
        save_checkpoint(path, make_checkpoint(global_step=step), keep=3)

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_arrays", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_checkpoint(global_step=30), keep=3)
    assert os.path.samefile(path, tmp_path / "checkpoint-00000020.npz")
    assert find_checkpoints(tmp_path) == [path, tmp_path / "checkpoint-00000010.npz"]
    monkeypatch.undo()
    save_checkpoint(path, make_checkpoint(global_step=30), keep=3)
    assert saved_steps(tmp_path) == {"checkpoint-00000010.npz": 10, "checkpoint-00000020.npz": 20,
                                     "checkpoint.npz": 30}


def test_a_background_write_holds_the_state_it_was_started_with_and_its_failure_comes_out_of_wait(tmp_path):
    # as the trainer hands it over: the net's state_dict(), whose arrays are copies
    net = SequentialLayers([LinearLayer(3, 4, rng=np.random.default_rng(0))])
    expected = replace(make_checkpoint(), model_state=net.state_dict())
    writer = BackgroundWriter()
    writer.start(tmp_path / "checkpoint.npz", replace(expected, model_state=net.state_dict()), keep=2)
    for _, param, _ in net.named_params():
        param[...] = np.nan  # the next step changes the parameters in place while the write goes on
    writer.wait()
    assert not writer.busy
    assert_same(load_checkpoint(tmp_path / "checkpoint.npz"), expected)
    writer.start(tmp_path / "missing" / "checkpoint.npz", expected)
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # raised once; nothing is under way any more


def test_checkpoints_every_steps_and_seconds_are_written_in_the_background_and_rotated(tmp_path):
    result = run(["--max-steps", "23", "--checkpoint-every", "0", "--checkpoint-every-steps", "5",
                  "--keep-checkpoints", "3", "--output", str(tmp_path / "steps")])
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in find_checkpoints(tmp_path / "steps")) == [
        "checkpoint-00000015.npz", "checkpoint-00000020.npz", "checkpoint.npz"]
    assert load_checkpoint(tmp_path / "steps" / "checkpoint.npz").position.global_step == 23
    result = run(["--max-steps", "40", "--checkpoint-every", "0", "--checkpoint-every-seconds", "1e-6",
                  "--keep-checkpoints", "2", "--output", str(tmp_path / "seconds")])
    assert result.returncode == 0, result.stderr
    kept = find_checkpoints(tmp_path / "seconds")
    assert len(kept) == 2 and load_checkpoint(kept[1]).position.global_step >= 30
