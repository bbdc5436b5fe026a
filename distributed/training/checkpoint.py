"""Training checkpoints as plain .npz files, written atomically, read without pickle.

A checkpoint holds everything needed to continue a run exactly where it stopped:
the model's state dict, the optimizer's state arrays (momentum, Adam moments,
step counts), the run's :class:`~mnn.distributed.training.position.Position` (epochs done,
steps done in the next epoch, total steps, samples seen) and the resolved job config (``TrainConfig.to_dict()``) as
JSON text stored as a uint8 array; the trainer reads it back with
``TrainConfig.from_dict``, which validates it. There is no RNG state to save: the order of global batches is a function
of (seed, epoch, batch size) alone, so the position is enough, whatever the
number of ranks that resumes.

The format (version 1): an uncompressed .npz (a zip of .npy members, see
:mod:`mnn.io`) with the int64 scalars ``format_version`` (1), ``epoch``
(epochs done), ``step_in_epoch``, ``global_step``, ``samples_seen`` and
``world_size``, the uint8 array ``config_json``, and one member per array of
state, ``model/<name>`` and ``optimizer/<name>``.

Checkpoints are written by rank 0 with :func:`mnn.io.save_arrays`, which
replaces the file atomically: a crash at any point leaves either the old
checkpoint or the new one, never a torn one. Reading checks everything it
uses, so a damaged file is a ValueError that names it and says what is wrong.

Keeping the last k. ``OUTPUT/checkpoint.npz`` is always the newest checkpoint
(scripts and users rely on the name). With ``save_checkpoint(path, c, keep=k)``
the checkpoint it replaces is first kept as ``checkpoint-<global step>.npz``
(the step zero-padded to 8 digits, so names sort by step; a hard link, no bytes
copied), and rotated files beyond the k - 1 newest are deleted afterwards, so k
checkpoints remain. :func:`find_checkpoints` lists them newest first:
``checkpoint.npz``, then the rotated ones by descending step.
:func:`load_newest_checkpoint` returns the first of them that loads, with the
reason for each one skipped. Usage::

    save_checkpoint("runs/a/checkpoint.npz", Checkpoint(...), keep=3)   # rank 0
    checkpoint = load_checkpoint("runs/a/checkpoint.npz")
    newest = load_newest_checkpoint("runs/a")     # None when there is none
    if newest is not None:
        for path, reason in newest.skipped:       # reason names the file
            print(f"skipped {path.name}: {reason}")
        print(f"resuming from {newest.path.name}")

In the background. :class:`BackgroundWriter` writes a copy of a checkpoint in a
thread of its own while training goes on (the ``--checkpoint-every-steps`` and
``--checkpoint-every-seconds`` checkpoints, frequent enough that waiting for each
would show in the step time); :meth:`BackgroundWriter.wait` returns once it is
on disk and raises what the write raised. The checkpoint's arrays are the
writer's until then: the trainer hands it ``state_dict()``s, which are copies
taken before the next step changes a parameter, so the file holds the step it
was started at.

Temporary files that a killed writer left behind (``.checkpoint.npz.*.tmp``)
are removed by :func:`mnn.io.clean_stale_temporaries`, to be called while no
writer can be live.
"""
from __future__ import annotations

import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mnn.checks import check_int
from mnn.distributed.training.position import Position
from mnn.io import atomic_copy, load_arrays, save_arrays

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "NewestCheckpoint",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_files",
    "is_checkpoint_name",
    "find_checkpoints",
    "load_newest_checkpoint",
    "BackgroundWriter",
]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1

_MODEL_PREFIX = "model/"
_OPTIMIZER_PREFIX = "optimizer/"
# Stored names of the Position fields (the format keeps its first names).
_POSITION_KEYS = {"epochs_done": "epoch", "step_in_epoch": "step_in_epoch", "global_step": "global_step",
                  "samples_seen": "samples_seen"}
_CONFIG_KEY = "config_json"
_VERSION_KEY = "format_version"
_WORLD_SIZE_KEY = "world_size"
# Rotated checkpoints: "checkpoint-00000120.npz" beside "checkpoint.npz".
_STEP_DIGITS = 8


@dataclass
class Checkpoint:
    """A run's state between two optimizer steps.

    ``world_size`` is only a record of the run that wrote it: a checkpoint can
    be resumed on any number of ranks.
    """

    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    position: Position
    world_size: int
    config: dict[str, Any]


class NewestCheckpoint(NamedTuple):
    """What :func:`load_newest_checkpoint` found: the checkpoint that loaded, its
    path, and ``(path, reason)`` for each newer one that did not (the reason is
    the error's message, which names the file)."""

    path: Path
    checkpoint: Checkpoint
    skipped: list[tuple[Path, str]]


def save_checkpoint(path: str | Path, checkpoint: Checkpoint, keep: int = 1) -> None:
    """Atomically write ``checkpoint`` to ``path`` (call on rank 0 only), keeping ``keep`` checkpoints.

    1. With ``keep > 1``, the checkpoint ``path`` holds is kept as
       ``NAME-<its global step>.npz`` (only its step is read; one that cannot
       be read is not worth keeping and is simply replaced).
    2. The new checkpoint replaces ``path`` atomically.
    3. Rotated checkpoints beyond the ``keep - 1`` newest are deleted, and so
       are those at or past the new checkpoint's step: a run resumed from an
       older checkpoint has redone those steps, and they belong to the run it
       abandoned.

    A crash between the steps leaves ``path`` whole (the old or the new
    checkpoint) and at most one rotated file too many, which the next save removes.
    """
    keep = check_int("keep", keep, 1)
    path = Path(path)
    arrays = _as_arrays(checkpoint)  # first: a config that is not JSON changes no file
    new_step = checkpoint.position.global_step
    if keep > 1:
        old_step = _stored_global_step(path)
        if old_step is not None and old_step < new_step:
            atomic_copy(path, _rotated_path(path, old_step))
    save_arrays(path, arrays)
    rotated = _rotated_checkpoints(path)
    kept = [step for step in sorted(rotated, reverse=True) if step < new_step][:keep - 1]
    for step, rotated_path in rotated.items():
        if step not in kept:
            rotated_path.unlink(missing_ok=True)


class BackgroundWriter:
    """Writes one checkpoint at a time with :func:`save_checkpoint`, in a thread (rank 0 only)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, path: str | Path, checkpoint: Checkpoint, keep: int = 1) -> None:
        """Begin writing ``checkpoint``, whose arrays nothing may change until :meth:`wait`
        (a ``state_dict()`` is a copy), once the write before it is done; raises that one's
        error instead, if it failed."""
        self.wait()

        def write() -> None:
            try:
                save_checkpoint(path, checkpoint, keep=keep)
            except BaseException as error:  # handed to wait(), in the trainer's thread
                self._error = error

        self._thread = threading.Thread(target=write, name="mnn checkpoint writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Return once no write is under way; raise the error of the last one, if it failed."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _as_arrays(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """The members of ``checkpoint``'s file (see the module docstring)."""
    arrays: dict[str, np.ndarray] = {_VERSION_KEY: np.array(FORMAT_VERSION, dtype=np.int64)}
    for name, array in checkpoint.model_state.items():
        arrays[_MODEL_PREFIX + name] = np.asarray(array)
    for name, array in checkpoint.optimizer_state.items():
        arrays[_OPTIMIZER_PREFIX + name] = np.asarray(array)
    for field, key in _POSITION_KEYS.items():
        arrays[key] = np.array(getattr(checkpoint.position, field), dtype=np.int64)
    arrays[_WORLD_SIZE_KEY] = np.array(checkpoint.world_size, dtype=np.int64)
    config_text = json.dumps(checkpoint.config, sort_keys=True)
    arrays[_CONFIG_KEY] = np.frombuffer(config_text.encode("utf-8"), dtype=np.uint8)
    return arrays


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; ValueError naming the file and
    the problem if it is not one (missing, damaged, another format, values of the wrong kind,
    weights that are NaN or infinite)."""
    arrays = load_arrays(path)
    required = (_VERSION_KEY, _CONFIG_KEY, *_POSITION_KEYS.values(), _WORLD_SIZE_KEY)
    missing = [key for key in required if key not in arrays]
    if missing:
        raise ValueError(
            f"{str(path)!r} is not an mnn checkpoint: missing {', '.join(missing)}")
    version = _stored_int(path, arrays, _VERSION_KEY, minimum=None)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r}: expected checkpoint format {FORMAT_VERSION}, got {version} ({_VERSION_KEY})")
    config_bytes = arrays[_CONFIG_KEY]
    if config_bytes.dtype != np.uint8 or config_bytes.ndim != 1:
        raise ValueError(f"{str(path)!r}: the stored config ({_CONFIG_KEY}) must be 1-D uint8 (JSON text), "
                         f"got shape {config_bytes.shape} of {config_bytes.dtype}")
    try:
        config = json.loads(config_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{str(path)!r}: the stored config ({_CONFIG_KEY}) is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r}: the stored config ({_CONFIG_KEY}) is not a JSON object, "
                         f"got {type(config).__name__}")

    def with_prefix(prefix: str) -> dict[str, np.ndarray]:
        return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}

    _check_finite(path, arrays)
    _check_model_dtype(path, arrays, config)
    return Checkpoint(
        model_state=with_prefix(_MODEL_PREFIX),
        optimizer_state=with_prefix(_OPTIMIZER_PREFIX),
        position=Position(**{field: _stored_int(path, arrays, key, minimum=0)
                             for field, key in _POSITION_KEYS.items()}),
        world_size=_stored_int(path, arrays, _WORLD_SIZE_KEY, minimum=1),
        config=config,
    )


def _check_model_dtype(path: str | Path, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """ValueError naming the first model array that is not in the dtype its run trained in
    (``dtype`` of the stored config): a run saves its weights as they are, and loading
    would cast int8 or float16 values to the training dtype without a word."""
    name = config.get("dtype")
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "f":
        return  # left out (the default) or not a training dtype: TrainConfig.from_dict names it
    for key, value in arrays.items():
        if key.startswith(_MODEL_PREFIX) and value.dtype != dtype:
            raise ValueError(f"{str(path)!r} is damaged: {key} holds {value.dtype} values, but its run trained in "
                             f"{dtype} (dtype in {_CONFIG_KEY}), which a run saves its weights in")


def _check_finite(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """ValueError naming the first state array that holds values a run never saves: NaN or
    an infinity in the model (the trainer refuses to save such weights), NaN in the
    optimizer's state (an infinite Adam moment can be real). Such a file is damaged, and
    would train on as NaN."""
    for key, value in arrays.items():
        if value.dtype.kind not in "fc":
            continue
        if key.startswith(_MODEL_PREFIX):
            bad, what = ~np.isfinite(value), "NaN or infinite"
        elif key.startswith(_OPTIMIZER_PREFIX):
            bad, what = np.isnan(value), "NaN"
        else:
            continue
        count = int(np.count_nonzero(bad))
        if count:
            raise ValueError(f"{str(path)!r} is damaged: {key} holds {count} {what} value{'s' if count > 1 else ''} "
                             f"of {value.size}, which a run never saves")


def checkpoint_files(output_dir: str | Path, name: str = CHECKPOINT_NAME) -> list[Path]:
    """Every entry of ``output_dir`` named as a checkpoint: ``name`` and the rotated
    ``NAME-<step>.npz``, unordered. The one rule for what counts as a checkpoint, so that
    resuming and setting an earlier run aside agree on whether there is one.

    Raises ValueError naming an entry with such a name that is not a regular file (or a
    link to one): a folder or a pipe is no checkpoint, yet not nothing either, and a
    pipe would make a reader wait for a writer forever.
    """
    path = Path(output_dir) / name
    entries = ([path] if os.path.lexists(path) else []) + list(_rotated_checkpoints(path, any_kind=True).values())
    for entry in entries:
        kind = _kind_of_non_file(entry)
        if kind is not None:
            raise ValueError(f"{str(entry)!r} is {kind}, not a checkpoint (a regular file); move it away, "
                             f"or give another --output")
    return entries


def is_checkpoint_name(name: str, checkpoint_name: str = CHECKPOINT_NAME) -> bool:
    """Whether a file called ``name`` is one of the checkpoints kept as ``checkpoint_name``:
    that name itself, or a rotated ``NAME-<step>.npz`` (the names :func:`checkpoint_files`
    counts, and so the names a run writes its checkpoints under)."""
    return name == checkpoint_name or _rotated_name(checkpoint_name).fullmatch(name) is not None


def find_checkpoints(output_dir: str | Path, name: str = CHECKPOINT_NAME) -> list[Path]:
    """The checkpoints in ``output_dir`` (see :func:`checkpoint_files`), newest first: ``name``
    itself, then the rotated ``NAME-<step>.npz`` by descending step. A rotated file that is
    the same file as ``name`` (a save stopped between keeping the old one and writing the
    new) is listed once."""
    path = Path(output_dir) / name
    checkpoint_files(output_dir, name)  # refuses a folder or a pipe with a checkpoint's name
    rotated = _rotated_checkpoints(path)
    candidates = [path] if path.is_file() else []
    for step in sorted(rotated, reverse=True):
        if not (candidates and _same_file(candidates[0], rotated[step])):
            candidates.append(rotated[step])
    return candidates


def load_newest_checkpoint(output_dir: str | Path, name: str = CHECKPOINT_NAME) -> NewestCheckpoint | None:
    """The newest checkpoint in ``output_dir`` that loads (see :func:`find_checkpoints`), with
    ``(path, reason)`` for each newer one skipped; None when there is none at all.

    Raises ValueError, naming every file and its problem, when there are
    checkpoints but none of them loads.
    """
    skipped: list[tuple[Path, str]] = []
    for path in find_checkpoints(output_dir, name):
        try:
            return NewestCheckpoint(path, load_checkpoint(path), skipped)
        except ValueError as error:
            skipped.append((path, str(error)))
    if skipped:
        raise ValueError(f"no checkpoint in {str(output_dir)!r} can be read: "
                         + "; ".join(reason for _, reason in skipped))
    return None


def _stored_int(path: str | Path, arrays: dict[str, np.ndarray], key: str, minimum: int | None) -> int:
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in "iu":
        raise ValueError(f"{str(path)!r}: {key} must be an integer scalar, got shape {value.shape} "
                         f"of {value.dtype}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{str(path)!r}: {key} must be at least {minimum}, got {int(value)}")
    return int(value)


def _stored_global_step(path: Path) -> int | None:
    """The global step of the checkpoint at ``path``, or None when it is missing or unreadable."""
    key = _POSITION_KEYS["global_step"]
    try:
        return _stored_int(path, load_arrays(path, names=(key,)), key, minimum=0)
    except ValueError:
        return None


def _rotated_path(path: Path, global_step: int) -> Path:
    return path.with_name(f"{path.stem}-{global_step:0{_STEP_DIGITS}d}{path.suffix}")


def _rotated_checkpoints(path: Path, any_kind: bool = False) -> dict[int, Path]:
    """The rotated checkpoints of ``path`` by global step (with ``any_kind``, every entry so
    named, whatever it is)."""
    pattern = _rotated_name(path.name)
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return {}
    rotated = {}
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and (any_kind or entry.is_file()):
            rotated[int(match.group(1))] = entry
    return rotated


def _rotated_name(checkpoint_name: str) -> re.Pattern[str]:
    """The names of the rotated checkpoints of ``checkpoint_name``, the step as group 1."""
    stem, suffix = Path(checkpoint_name).stem, Path(checkpoint_name).suffix
    # Only names this module writes: at least _STEP_DIGITS digits.
    return re.compile(re.escape(stem) + rf"-(\d{{{_STEP_DIGITS},}})" + re.escape(suffix))


def _kind_of_non_file(path: Path) -> str | None:
    """What ``path`` is, in words, when it is not a regular file (or a link to one); None when it is."""
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return f"a symbolic link to {os.readlink(path)!r}, which does not exist"
    mode = path.stat().st_mode
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
    return next((kind for is_kind, kind in kinds if is_kind(mode)), "a device, not a regular file")


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False
