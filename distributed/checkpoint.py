"""Training checkpoints as plain .npz files, written atomically, read without pickle.

A checkpoint holds everything needed to continue a run exactly where it stopped:
the model's state dict, the optimizer's state arrays (momentum, Adam moments,
step counts), the run's :class:`~mnn.distributed.position.Position` (epochs done,
steps done in the next epoch, total steps, samples seen) and the resolved job config (``TrainConfig.to_dict()``) as
JSON text stored as a uint8 array; the trainer reads it back with
``TrainConfig.from_dict``, which validates it. There is no RNG state to save: the order of global batches is a function
of (seed, epoch, batch size) alone, so the position is enough, whatever the
number of ranks that resumes.

Checkpoints are written by rank 0 with :func:`mnn.io.save_arrays`, which
replaces the file atomically: a crash at any point leaves either the old
checkpoint or the new one, never a torn one.

    save_checkpoint("runs/a/checkpoint.npz", Checkpoint(...))
    checkpoint = load_checkpoint("runs/a/checkpoint.npz")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnn.distributed.position import Position
from mnn.io import load_arrays, save_arrays

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
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


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Atomically write ``checkpoint`` to ``path`` (call on rank 0 only)."""
    arrays: dict[str, np.ndarray] = {_VERSION_KEY: np.array(FORMAT_VERSION, dtype=np.int64)}
    for name, array in checkpoint.model_state.items():
        arrays[_MODEL_PREFIX + name] = np.asarray(array)
    for name, array in checkpoint.optimizer_state.items():
        arrays[_OPTIMIZER_PREFIX + name] = np.asarray(array)
    for field, key in _POSITION_KEYS.items():
        arrays[key] = np.array(getattr(checkpoint.position, field), dtype=np.int64)
    arrays["world_size"] = np.array(checkpoint.world_size, dtype=np.int64)
    config_text = json.dumps(checkpoint.config, sort_keys=True)
    arrays[_CONFIG_KEY] = np.frombuffer(config_text.encode("utf-8"), dtype=np.uint8)
    save_arrays(path, arrays)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; ValueError if it is not one."""
    arrays = load_arrays(path)
    required = (_VERSION_KEY, _CONFIG_KEY, *_POSITION_KEYS.values(), "world_size")
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
        position=Position(**{field: int(arrays[key]) for field, key in _POSITION_KEYS.items()}),
        world_size=int(arrays["world_size"]),
        config=config,
    )
