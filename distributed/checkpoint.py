"""Training checkpoints as plain .npz files, written atomically, read without pickle.

A checkpoint holds everything needed to continue a run exactly where it stopped:
the model's state dict, the optimizer's state arrays (momentum, Adam moments,
step counts), the position in the data (epoch, steps done in that epoch, total
steps, samples seen) and the resolved job config as JSON text stored as a uint8
array. There is no RNG state to save: the order of global batches is a function
of (seed, epoch, batch size) alone, so the position is enough, whatever the
number of ranks that resumes.

Files are written by one process (rank 0) through :func:`atomic_write`: the bytes
go to a temporary file in the same directory, are flushed and fsynced, the temp
file is renamed over the target with ``os.replace`` and the directory is fsynced.
A crash at any point leaves either the old file or the new one, never a torn one.

    save_checkpoint("runs/a/checkpoint.npz", Checkpoint(...))
    checkpoint = load_checkpoint("runs/a/checkpoint.npz")
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "atomic_write",
    "atomic_write_text",
    "save_arrays",
    "load_arrays",
    "save_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1

_MODEL_PREFIX = "model/"
_OPTIMIZER_PREFIX = "optimizer/"
_POSITION_KEYS = ("epoch", "step_in_epoch", "global_step", "samples_seen", "world_size")
_CONFIG_KEY = "config_json"
_VERSION_KEY = "format_version"


@dataclass
class Checkpoint:
    """A run's state between two optimizer steps.

    ``epoch`` is the epoch to continue in and ``step_in_epoch`` the number of its
    global batches already trained on; ``world_size`` is only a record of the run
    that wrote it (a checkpoint can be resumed on any number of ranks).
    """

    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    epoch: int
    step_in_epoch: int
    global_step: int
    samples_seen: int
    world_size: int
    config: dict[str, Any]


# -------------------------------------------------------------- atomic files
def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file so that readers (and crashes) see the old or the new file, whole.

    ``write(handle)`` fills a temporary file next to ``path``; it is then flushed,
    fsynced and renamed over ``path``, and the directory entry is fsynced. If
    ``write`` raises, the temporary file is removed and ``path`` is untouched.
    The temporary name is fixed, so one left behind by a killed process is simply
    overwritten by the next write; only one process may write a given path.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text (config.toml, summary.json)."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write a dict of arrays as an uncompressed .npz (model.npz).

    Written member by member rather than through ``np.savez(file, **arrays)``, whose
    keyword arguments would swallow keys named ``file`` or ``allow_pickle``, and
    with pickling refused, so every file we write loads with allow_pickle=False.
    """
    def write(handle: io.BufferedWriter) -> None:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    atomic_write(path, write)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Read an .npz written by :func:`save_arrays`, refusing pickled objects."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # np.load raises these for truncated/non-npz files and for object arrays.
        raise ValueError(f"{str(path)!r} is not a readable .npz file: {error}") from None


# ----------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Atomically write ``checkpoint`` to ``path`` (call on rank 0 only)."""
    arrays: dict[str, np.ndarray] = {_VERSION_KEY: np.array(FORMAT_VERSION, dtype=np.int64)}
    for name, array in checkpoint.model_state.items():
        arrays[_MODEL_PREFIX + name] = np.asarray(array)
    for name, array in checkpoint.optimizer_state.items():
        arrays[_OPTIMIZER_PREFIX + name] = np.asarray(array)
    for key in _POSITION_KEYS:
        arrays[key] = np.array(getattr(checkpoint, key), dtype=np.int64)
    config_text = json.dumps(checkpoint.config, sort_keys=True)
    arrays[_CONFIG_KEY] = np.frombuffer(config_text.encode("utf-8"), dtype=np.uint8)
    save_arrays(path, arrays)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; ValueError if it is not one."""
    arrays = load_arrays(path)
    required = (_VERSION_KEY, _CONFIG_KEY, *_POSITION_KEYS)
    missing = [key for key in required if key not in arrays]
    if missing:
        raise ValueError(
            f"{str(path)!r} is not an mnn checkpoint: missing {', '.join(missing)}")
    version = int(arrays[_VERSION_KEY])
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r}: expected checkpoint format {FORMAT_VERSION}, got {version}")
    try:
        config = json.loads(arrays[_CONFIG_KEY].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r}: the stored config is not valid JSON: {error}") from None

    def with_prefix(prefix: str) -> dict[str, np.ndarray]:
        return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}

    return Checkpoint(
        model_state=with_prefix(_MODEL_PREFIX),
        optimizer_state=with_prefix(_OPTIMIZER_PREFIX),
        config=config,
        **{key: int(arrays[key]) for key in _POSITION_KEYS},
    )
