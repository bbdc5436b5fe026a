r"""The timeline: where every rank's time goes, step by step, as one Chrome trace-event file.

``mnn-train --timeline FILE`` (``TrainConfig(timeline=...)``) records on every
rank a span for each forward, backward, bucket all-reduce (from its start to
the moment this rank saw it done), wait for the reductions and optimizer step,
and rank 0 writes them all into FILE. Horovod's timeline is the model: one
file on rank 0 that holds every worker's activity, written as it goes, in the
Chrome trace-event format that https://ui.perfetto.dev and chrome://tracing
open. Here a rank is a process (``pid`` = rank, named "rank r"), and each
process has a track (``tid``) for its steps (forward, backward, wait,
optimizer) and one per gradient bucket, where a bucket's all-reduce shows how
it overlaps backward. Every span is a complete event (``"ph": "X"``) with
``ts`` and ``dur`` in microseconds and the step number in its ``args``.

**One clock for all ranks.** Each rank measures with its own
``time.perf_counter``, and clocks of different hosts disagree. At the start
rank 0 plays ping-pong with every other rank (Cristian's method): it notes
its time :math:`t_1`, sends a ping, the rank notes its time :math:`t_r` as the
ping arrives and sends it back, and rank 0 notes :math:`t_4` as the answer
arrives. Since :math:`t_1 \le t_r \le t_4` in true time, the rank's clock is
ahead of rank 0's by :math:`t_r - (t_1 + t_4)/2`, give or take half the round
trip :math:`t_4 - t_1`; of ``_CLOCK_ROUNDS`` rounds the one with the shortest
round trip counts (microseconds on one host, about a network latency across
hosts). Barriers would be simpler but are worse: ranks leave a barrier up to
milliseconds apart when they share cores (Open MPI yields the core while it
waits). Timestamps are written on rank 0's clock, from the moment it opened
the timeline.

**Bounded memory.** Each rank keeps the spans since the last flush; every
``flush_every_steps`` steps (and at :meth:`Timeline.close`) they are gathered to
rank 0, which appends them to the file, so a long run never holds more than
that many steps of spans. Until :meth:`Timeline.close` writes the closing
``]`` the file is a JSON array without its end, which both viewers read (the
format allows it, for traces of runs that crashed); after it, it is plain JSON.

**Never at the run's expense.** The timeline writes only a file that is not
there yet or that holds a timeline mnn wrote (:func:`check_timeline_path`): any
other file is refused when it opens. A write that fails later (a full disk)
costs the timeline, not the run: rank 0 writes one warning line to stderr, and
from the next flush on every rank records nothing more; the file keeps the
spans written so far (a JSON array without its end, which the viewers read).

**Off, it costs nothing.** ``Timeline(comm, None)`` is disabled: it makes no
collective call, records nothing, and the code that would feed it checks one
attribute (``DataParallel`` holds ``None`` instead of it).

Usage (on every rank; opening, :meth:`~Timeline.next_step`, :meth:`~Timeline.flush`
and :meth:`~Timeline.close` are collective)::

    timeline = Timeline(comm, "runs/a/timeline.json")
    dp = DataParallel(net, optimizer, comm, timeline=timeline)
    for step, batch in enumerate(batches, start=1):
        timeline.next_step(step)              # labels the spans; flushes now and then
        ...                                   # dp records forward, backward, all-reduce, wait, optimizer
    timeline.close()                          # rank 0 finishes the file
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mnn.checks import check_int
from mnn.distributed.comm import Communicator, get_communicator, run_all
from mnn.io import unusable_path

__all__ = ["Timeline", "STEP_TRACK", "DEFAULT_FLUSH_EVERY_STEPS", "check_timeline_path"]

#: The track (``tid``) of forward, backward, wait and optimizer spans.
STEP_TRACK = 0
#: Steps between two gathers of the spans to rank 0.
DEFAULT_FLUSH_EVERY_STEPS = 100
# Ping-pongs per rank to find its clock offset: the quickest of them counts, so a
# few slow ones (a rank descheduled on shared cores) do not matter.
_CLOCK_ROUNDS = 10
# The first event of every timeline: how a file mnn wrote is told from any other.
_HEADER_NAME = "timeline"


class Timeline:
    """Spans of every rank, written by rank 0 to ``path`` as Chrome trace events.

    ``comm``: anything :func:`~mnn.distributed.comm.get_communicator` takes.
    ``path``: the file rank 0 writes (its folder is created), or None for a
    disabled timeline. ``flush_every_steps``: how many :meth:`next_step` calls
    between two gathers to rank 0.

    Opening is collective (it aligns the clocks; a file rank 0 cannot open, or
    must not overwrite, raises :class:`~mnn.distributed.comm.RankFailure` on
    every rank), and so are :meth:`next_step`, :meth:`flush` and :meth:`close`.
    A write that fails after opening disables the timeline (one warning line). :meth:`span` and
    :meth:`name_track` are local.
    """

    def __init__(self, comm: Any, path: str | os.PathLike | None,
                 flush_every_steps: int = DEFAULT_FLUSH_EVERY_STEPS):
        self.comm: Communicator = get_communicator(comm)
        self.path = None if path is None else Path(path)
        self.enabled = path is not None
        self.flush_every_steps = check_int("flush_every_steps", flush_every_steps, minimum=1)
        self.step: int | None = None  # the step the next spans belong to
        # (name, track, start, end, step, args) with perf_counter seconds, since the last flush
        self._spans: list[tuple[str, int, float, float, int | None, dict[str, Any] | None]] = []
        self._track_names: dict[int, str] = {STEP_TRACK: "step"}
        self._tracks_told: set[int] = set()  # tracks whose names went to rank 0
        self._steps_since_flush = 0
        self._file: TextIO | None = None
        self.zero = 0.0
        if self.enabled:
            self.zero = _rank0_zero(self.comm)
            run_all(self.comm, self._open)

    # -- recording (local) ----------------------------------------------------------

    def span(self, name: str, start: float, end: float, track: int = STEP_TRACK,
             args: dict[str, Any] | None = None) -> None:
        """Record ``name`` from ``start`` to ``end`` (``time.perf_counter()`` seconds) on
        ``track``; ``args`` are shown with it (next to the step). Nothing when disabled."""
        if self.enabled:
            self._spans.append((name, track, start, end, self.step, args))

    def name_track(self, track: int, name: str) -> None:
        """Call ``track`` of this rank ``name`` in the viewer (e.g. "all-reduce bucket 0")."""
        self._track_names[track] = name
        self._tracks_told.discard(track)

    # -- collective -----------------------------------------------------------------

    def next_step(self, step: int) -> None:
        """Label the spans from here on with ``step``; every ``flush_every_steps`` calls,
        :meth:`flush` first (collective: every rank calls it once per step)."""
        if not self.enabled:
            return
        if self._steps_since_flush == self.flush_every_steps:
            self.flush()
        self._steps_since_flush += 1
        self.step = step

    def flush(self) -> None:
        """Gather every rank's spans to rank 0 and append them to the file (collective).
        If rank 0 cannot write them, it says so and every rank disables the timeline."""
        if not self.enabled:
            return
        tracks = {track: name for track, name in self._track_names.items() if track not in self._tracks_told}
        self._tracks_told.update(tracks)
        spans = [(name, track, (start - self.zero) * 1e6, (end - start) * 1e6, step, args)
                 for name, track, start, end, step, args in self._spans]
        self._spans = []
        self._steps_since_flush = 0
        everyone = self.comm.gather((tracks, spans), root=0)
        written = self._on_rank0(lambda: self._write(everyone)) if self.comm.rank == 0 else None
        if not self.comm.broadcast_object(written):
            self.enabled = False

    def close(self) -> None:
        """Flush, and let rank 0 finish the file as plain JSON (collective); then disabled."""
        if not self.enabled:
            return
        self.flush()
        if self.enabled and self.comm.rank == 0:
            self._on_rank0(self._finish)
        self.enabled = False

    # -- rank 0's file ----------------------------------------------------------------

    def _on_rank0(self, write: Any) -> bool:
        """``write()`` on rank 0; whether it worked. A failure closes the file and says so
        in one line: the run goes on without its timeline."""
        try:
            write()
            return True
        except (OSError, ValueError) as error:
            file, self._file = self._file, None
            try:
                if file is not None:
                    file.close()
            except OSError:
                pass  # what the buffer held is lost with the rest
            print(f"mnn: warning: the timeline {self.path} cannot be written ({type(error).__name__}: {error}); "
                  f"training goes on without it{'' if self.step is None else f' from step {self.step}'}",
                  file=sys.stderr, flush=True)
            return False

    def _open(self) -> None:
        if self.comm.rank != 0:
            return
        check_timeline_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        # The first event is written without a comma before it, every later one with.
        self._file.write("[\n" + _event({"name": _HEADER_NAME, "ph": "M", "pid": 0,
                                          "args": {"clock": "rank 0's perf_counter, microseconds",
                                                   "ranks": self.comm.size}}))
        for rank in range(self.comm.size):
            self._append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
            self._append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        self._file.flush()

    def _write(self, everyone: list[tuple[dict[int, str], list[tuple]]]) -> None:
        for rank, (tracks, spans) in enumerate(everyone):
            for track, name in sorted(tracks.items()):
                self._append({"name": "thread_name", "ph": "M", "pid": rank, "tid": track, "args": {"name": name}})
                self._append({"name": "thread_sort_index", "ph": "M", "pid": rank, "tid": track,
                              "args": {"sort_index": track}})
            # Thousands of spans per flush: each is formatted from pieces encoded once (the
            # names and the args of a bucket repeat), which is ten times quicker than json.dumps.
            encoded: dict[Any, str] = {}
            lines = []
            for name, track, ts, dur, step, args in spans:
                if name not in encoded:
                    encoded[name] = json.dumps(name)
                if id(args) not in encoded:  # the args are alive in `spans`, so ids are unique
                    encoded[id(args)] = "".join("," + json.dumps(key) + ":" + json.dumps(value)
                                                for key, value in (args or {}).items())
                lines.append(f',\n{{"name":{encoded[name]},"ph":"X","pid":{rank},"tid":{track},"ts":{ts:.3f},'
                             f'"dur":{dur:.3f},"args":{{"step":{"null" if step is None else int(step)}'
                             f'{encoded[id(args)]}}}}}')
            self._file.write("".join(lines))
        self._file.flush()

    def _append(self, event: dict[str, Any]) -> None:
        self._file.write(",\n" + _event(event))

    def _finish(self) -> None:
        self._file.write("\n]\n")
        self._file.close()
        self._file = None


def _event(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


def check_timeline_path(path: str | os.PathLike, run_output: str | None = None) -> None:
    """Raise ValueError, naming ``path``, unless a timeline may be written there: a file
    that does not exist yet, or a timeline mnn wrote (whose first event is the
    "timeline" header). ``run_output``: what ``path`` is among the run's own outputs
    (say a checkpoint), which it must never replace, or None when it is none of them."""
    path = Path(path)
    if run_output is not None:
        raise ValueError(f"timeline: {str(path)!r} is {run_output}, which the timeline must not overwrite; "
                         "give it a file of its own")
    problem = unusable_path(path)
    if problem is not None:
        raise ValueError(f"timeline: {str(path)!r} cannot be written: {problem}")
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise ValueError(f"timeline: {str(path)!r} is a directory, not a file")
    header = "[\n" + _event({"name": _HEADER_NAME, "ph": "M"})[:-1] + ","
    try:
        with path.open("rb") as handle:
            start = handle.read(len(header)) if path.is_file() else b""
    except OSError as error:
        raise ValueError(f"timeline: {str(path)!r} exists and cannot be read: {error}") from None
    if start != header.encode():
        raise ValueError(f"timeline: {str(path)!r} exists and is not a timeline mnn wrote, so it is not "
                         "overwritten: give another file, or remove it")


def _rank0_zero(comm: Communicator) -> float:
    """Rank 0's time zero on this rank's clock (collective): timestamps are
    ``perf_counter() - zero``. Rank 0 finds each rank's clock offset by ping-pong
    (module docstring), one rank after the other."""
    # A ping carries nothing, an answer the rank's time; [:0] is an empty message.
    ping, answer = np.zeros(1), np.zeros(1)
    if comm.rank != 0:
        for _ in range(_CLOCK_ROUNDS):
            comm.sendrecv(answer[:0], 0, ping, 0)
            answer[0] = time.perf_counter()
            comm.sendrecv(answer, 0, ping[:0], 0)
        zero, offsets = comm.broadcast_object(None)
        return zero + offsets[comm.rank]
    zero, offsets = time.perf_counter(), [0.0] * comm.size
    for rank in range(1, comm.size):
        fastest = math.inf
        for _ in range(_CLOCK_ROUNDS):
            sent = time.perf_counter()
            comm.sendrecv(ping, rank, answer[:0], rank)
            comm.sendrecv(ping[:0], rank, answer, rank)
            back = time.perf_counter()
            if back - sent < fastest:
                fastest, offsets[rank] = back - sent, float(answer[0]) - (sent + back) / 2
    comm.broadcast_object((zero, offsets))
    return zero
