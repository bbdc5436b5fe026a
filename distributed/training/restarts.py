"""A run that mnn-launch started again after a failure (``--max-restarts``): where it
continues, and what the failure cost.

mnn-launch tells each start of the job how many restarts came before it
(``MNN_RESTART_COUNT``, :mod:`mnn.distributed.environment`). A restart continues
from the newest checkpoint in OUTPUT that loads, as ``--resume`` does; with no
checkpoint there yet (the failure came before the first), it starts as the job
asked, from the beginning or its own ``--resume PATH``. Its global batches do not
depend on the number of ranks, so a restart on fewer ranks still ends with the
model of an uninterrupted run.

What a failure cost. The output directory's lock records the global step the
job had done and when (:class:`~mnn.distributed.training.output_dir.OutputLock`),
and a killed job leaves it behind. From it and mnn-launch's variables, rank 0
of the restart records a ``restart`` event:

* ``reached_step``: the steps the failed start had done; ``checkpoint_step``:
  where this start continues (0 from the beginning); ``redo_steps``: the
  difference, the steps trained twice;
* ``detect_s``: from the failed start's last step to mnn-launch seeing the
  failure (the kill itself comes at most a step after that last step);
  ``restart_s``: from then to this start being ready to train (mnn-launch
  asking the hosts, MPI's start-up, loading the data and the checkpoint);
* ``ranks_before``, ``ranks_after``, ``cause`` (mnn-launch's words), and the
  Unix times ``seen_at`` (mnn-launch saw the failure) and ``resumed_at``.

Times are Unix times of the hosts involved: across hosts they are as good as
the hosts' clocks agree. The summary adds ``restarts``, ``steps_redone`` and
``lost_s``: for each restart its ``detect_s`` and ``restart_s``, plus the steps
redone at this start's mean step time.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from mnn.distributed.environment import (MAX_RESTARTS_ENV, RESTART_CAUSE_ENV, RESTART_COUNT_ENV, RESTART_RANKS_ENV,
                                         RESTART_SEEN_AT_ENV)

__all__ = ["restart_count", "Restart", "this_restart", "restart_line", "restart_totals"]


def restart_count() -> int:
    """The restarts before this start of the job (0 when it is the first, or not under
    ``mnn-launch --max-restarts``)."""
    value = os.environ.get(RESTART_COUNT_ENV, "")
    return int(value) if value.isdigit() else 0


@dataclass(frozen=True)
class Restart:
    """What mnn-launch said about the restart that made this start."""

    count: int
    max_restarts: int | None
    cause: str
    ranks_before: int | None
    seen_at: float | None  # when mnn-launch saw the failure (Unix time)

    def event(self, ranks_after: int, checkpoint_step: int, previous_lock: dict[str, Any]) -> dict[str, Any]:
        """The ``restart`` event (see the module docstring), with the failed start's lock."""
        now = time.time()
        reached = previous_lock.get("step")
        reached = reached if isinstance(reached, int) and not isinstance(reached, bool) else None
        step_at = previous_lock.get("step_at")
        step_at = float(step_at) if isinstance(step_at, (int, float)) and not isinstance(step_at, bool) else None
        return {
            "event": "restart", "restart": self.count, "max_restarts": self.max_restarts, "cause": self.cause,
            "ranks_before": self.ranks_before, "ranks_after": ranks_after, "checkpoint_step": checkpoint_step,
            "reached_step": reached,
            "redo_steps": max(0, reached - checkpoint_step) if reached is not None else None,
            "detect_s": _seconds(step_at, self.seen_at),
            "restart_s": _seconds(self.seen_at, now),
            "seen_at": self.seen_at, "resumed_at": now,
        }


def this_restart() -> Restart | None:
    """The restart that made this start, from mnn-launch's variables; None for a first start."""
    count = restart_count()
    if count == 0:
        return None
    return Restart(count, _number(MAX_RESTARTS_ENV, int), os.environ.get(RESTART_CAUSE_ENV, "a failure"),
                   _number(RESTART_RANKS_ENV, int), _number(RESTART_SEEN_AT_ENV, float))


def restart_line(event: dict[str, Any]) -> str:
    """The restart event for a person: one line."""
    of = f" of {event['max_restarts']}" if event["max_restarts"] else ""
    before = event["ranks_before"] if event["ranks_before"] is not None else "?"
    where = (f"from the checkpoint at step {event['checkpoint_step']}" if event["checkpoint_step"]
             else "from the beginning (no checkpoint yet)")
    redo = f": {event['redo_steps']} step{'s' if event['redo_steps'] != 1 else ''} to redo" \
        if event["redo_steps"] is not None else ""
    times = [f"{event[key]:.1f} s {what}" for key, what in (("detect_s", "to see the failure"),
                                                              ("restart_s", "to start again"))
             if event[key] is not None]
    return (f"restart {event['restart']}{of}: {before} ranks -> {event['ranks_after']}, continuing {where}{redo}"
            + (f" ({', '.join(times)})" if times else ""))


def restart_totals(events: list[dict[str, Any]], seconds_per_step: float) -> dict[str, Any]:
    """The summary's ``restarts``, ``steps_redone`` and ``lost_s`` over the ``restart``
    events of the run, the steps redone counted at ``seconds_per_step``."""
    redone = sum(event.get("redo_steps") or 0 for event in events)
    waited = sum((event.get("detect_s") or 0.0) + (event.get("restart_s") or 0.0) for event in events)
    return {"restarts": len(events), "steps_redone": redone, "lost_s": waited + redone * seconds_per_step}


def _number(name: str, kind: type) -> Any:
    try:
        return kind(os.environ[name])
    except (KeyError, ValueError):
        return None


def _seconds(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)
