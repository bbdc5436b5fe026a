"""A run's output directory: one job at a time, and nothing of an earlier run lost silently.

Rank 0 alone touches the directory (other hosts may not see it).

* **Lock.** ``OUTPUT/.mnn.lock`` names the host and process of the job that
  uses the directory; it is created with ``O_EXCL``, so of two jobs started
  with the same ``--output`` the second stops with an error naming the first
  instead of mixing its files into them. The lock is removed when the run ends
  (done, interrupted, or stopped by an error of its own); a lock left by a job
  that was killed or crashed (its process no longer exists on this host) is
  taken over, with a note. A lock from another host cannot be
  checked: the error says how to remove it if that job is gone, unless it
  names the same mnn-launch run (``MNN_LAUNCH_ID``): mnn-launch restarts a job
  only once its last start has ended, so that start's lock is taken over.
* **How far the job got.** The lock also holds the global step the job has
  done and when (:meth:`OutputLock.record_step`, after every step, in place).
  A killed job leaves it behind, and a restart reads it (:attr:`OutputLock.previous`)
  to tell the steps it trains again and the time the failure cost.
* **An earlier run.** A run that starts afresh (not ``--resume``) in a
  directory holding an earlier run's checkpoints moves that run's files into
  ``OUTPUT/previous/`` (its TensorBoard event files too) and says so, instead of overwriting them.

Usage (rank 0)::

    lock = OutputLock.acquire(Path("runs/a"))   # ValueError if another job holds it
    notes = [lock.note, set_aside_earlier_run(Path("runs/a"))]
    ...
    lock.release()
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from mnn.distributed.environment import LAUNCH_ID_ENV
from mnn.distributed.training.checkpoint import CHECKPOINT_NAME, checkpoint_files
from mnn.distributed.training.event_file import event_files

__all__ = ["DIVERGED_NAME", "LOCK_NAME", "PREVIOUS_RUN", "RUN_FILES", "OutputLock", "recorded_step",
           "set_aside_earlier_run"]

LOCK_NAME = ".mnn.lock"
PREVIOUS_RUN = "previous"
#: Where a run that diverged keeps the state before the failed step: beside the
#: checkpoints, never over one (resuming from it would diverge again at once).
DIVERGED_NAME = "diverged.npz"
# The files a run writes into OUTPUT (checkpoints also as checkpoint-*.npz).
RUN_FILES = ("config.toml", "metrics.jsonl", CHECKPOINT_NAME, "model.npz", "summary.json", DIVERGED_NAME)
# Process ids are C ints (Linux's pid_max is at most 2**22).
_PID_LIMIT = 2**31
# The step and its time are written over themselves in place, so they keep one width.
_STEP_WIDTH = 12
_TIME_WIDTH = 16


@dataclass
class OutputLock:
    """This process's hold on an output directory. ``note`` says when it took over a stale
    lock, and ``previous`` is that lock's content (``{}`` when there was none)."""

    path: Path
    descriptor: int
    holder: dict
    note: str | None = None
    previous: dict = field(default_factory=dict)
    # The holder as JSON less its closing brace: what record_step writes before the step, after every step.
    _holder_text: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._holder_text = json.dumps(self.holder)[:-1]

    @classmethod
    def acquire(cls, output: Path) -> OutputLock:
        path = output / LOCK_NAME
        note, previous = None, {}
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "launch": os.environ.get(LAUNCH_ID_ENV) or None}
        for _ in range(2):
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                _check_is_a_file(path, output)
                previous = _read_holder(path)
                if _same_launch(previous, holder):
                    note = f"took over the lock of {output} left by this job's start before its restart"
                elif _is_stale(previous):
                    note = (f"took over the lock of {output} left by a job that ended without removing it "
                            f"({_who(previous)})")
                else:
                    raise ValueError(f"output directory {str(output)!r} is in use by another job ({_who(previous)}, "
                                     f"since {previous.get('started', '?')}): give this job another --output, or "
                                     f"wait for that one to end. If it is gone, remove {path}") from None
                path.unlink(missing_ok=True)
                continue
            lock = cls(path, descriptor, holder, note, previous)
            lock.record_step(0)
            return lock
        raise ValueError(f"output directory {str(output)!r}: another job took its lock at the same moment")

    def record_step(self, global_step: int) -> None:
        """Write the global step done and the time now into the lock, over the last ones
        (one write of the same length, so a reader never sees half of one)."""
        step = f'"step": {global_step:{_STEP_WIDTH}d}, "step_at": {time.time():{_TIME_WIDTH}.3f}'
        text = f"{self._holder_text}, {step}}}"
        try:
            os.pwrite(self.descriptor, text.encode(), 0)
        except OSError:
            pass  # a directory turned read-only: metrics.jsonl's write fails too, and stops the run

    def release(self, remove: bool = True) -> None:
        """Remove the lock if it is still this process's (idempotent). ``remove=False`` leaves
        it in place, as a job that was killed leaves it: with the step it got to, and taken
        over by the next job."""
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1
        if remove and _read_holder(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def recorded_step(output: Path) -> int | None:
    """The global step that the job holding (or last holding) ``output``'s lock recorded;
    None when there is no lock, or none that says."""
    step = _read_holder(Path(output) / LOCK_NAME).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _same_launch(previous: dict, holder: dict) -> bool:
    """Whether the lock ``previous`` was taken by an earlier start of this mnn-launch run."""
    return holder["launch"] is not None and previous.get("launch") == holder["launch"]


def _check_is_a_file(path: Path, output: Path) -> None:
    """Refuse a lock path that holds something else than a lock file (which would
    neither read nor unlink as one)."""
    if path.is_symlink() or path.is_file():
        return  # a file, or a link that unlink removes like one
    kind = "a directory" if path.is_dir() else "not a regular file"
    raise ValueError(f"output directory {str(output)!r}: its lock {str(path)!r} is {kind}, not the lock file a job "
                     f"writes; remove it if no job uses the directory, or give another --output")


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing, or cut short by a job killed while writing it
    return holder if isinstance(holder, dict) else {}


def _who(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _is_stale(holder: dict) -> bool:
    """Whether the lock's process is known to be gone: it ran on this host and no longer exists.
    A lock without a readable holder is stale too (a job killed while writing it), and so is
    one of this host that names no possible process (a job writes its own id, a positive int)."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < _PID_LIMIT:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def set_aside_earlier_run(output: Path) -> str | None:
    """Move an earlier run's files into OUTPUT/previous/ when the directory holds its
    checkpoints; return what was done, or None when there was no earlier run."""
    checkpoints = sorted(checkpoint_files(output))  # ValueError for one that is a folder or a pipe
    if not checkpoints:
        return None
    previous = output / PREVIOUS_RUN
    if previous.is_symlink() or (previous.exists() and not previous.is_dir()):
        # Not a folder this module made: never removed on the way.
        raise ValueError(f"output directory {str(output)!r} holds an earlier run, whose files go into "
                         f"{str(previous)!r}, but that is {'a symbolic link' if previous.is_symlink() else 'a file'}; "
                         f"move it away, or give another --output")
    replaced = previous.exists()
    if replaced:
        shutil.rmtree(previous)
    previous.mkdir()
    moved = [path for path in [*checkpoints, *(output / name for name in RUN_FILES), *event_files(output)]
             if path.exists()]
    for path in dict.fromkeys(moved):
        path.rename(previous / path.name)
    return (f"{output} held an earlier run's checkpoints: moved its files into {previous}"
            f"{' (replacing the run kept there before)' if replaced else ''}; to continue a run, use --resume")
