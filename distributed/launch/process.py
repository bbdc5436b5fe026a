"""Running a launch: the job in the foreground with SIGINT, SIGTERM and SIGHUP passed on and
its start-up bounded, or a short job with its output captured and a time limit
(``--check``'s hello); in both, no process of the job outlives mnn-launch.

What the two launchers do, and so what mnn-launch does about it:

- MPICH's hydra forwards SIGINT and SIGTERM to every rank and waits for them,
  once; a second signal makes it abort the job (exit status 255 and seven
  lines of its errors), and SIGINT makes it print two lines about Ctrl-C.
  If hydra is SIGKILLed its proxies kill the ranks.
- Open MPI's prterun takes SIGINT and SIGTERM as an order to abort: it gives
  each rank SIGCONT, SIGTERM about 0.25 s later and SIGKILL about 0.25 s after
  that, stops forwarding their output, and exits 1 whatever they return. If
  prterun is SIGKILLed its ranks run on with no parent.
- Both die of a closed stdout (SIGPIPE) or abort on it, and neither bounds
  its start-up (see :mod:`~mnn.distributed.launch.startup`).

mnn-launch therefore starts either in a process group of its own, so that the
terminal's signals (Ctrl-C, and SIGHUP when the terminal closes) reach
mnn-launch alone, and passes each signal on itself, SIGHUP as SIGTERM: the
first to hydra as SIGTERM (hydra passes it to every rank, on every host), or
under Open MPI to the ranks on this machine (they stop as mnn-train stops on
any MPI, after the same step, and prterun passes on their output and their exit
status, and its own notices about it, which
:mod:`~mnn.distributed.launch.launcher_output` drops); the second to the ranks
on this machine; a third, or a signal while no rank runs here, to the launcher,
which aborts the job. Under Open MPI with every rank on other hosts the first
two go to prterun as SIGUSR1, which it forwards to every rank as it is and
mnn-train takes as a request to stop. A signal while the job starts waits until its ranks can
take it (:mod:`~mnn.distributed.launch.startup`), for a few seconds at most. The launcher's output goes
through a copier that keeps reading when nobody reads ours. When mnn-launch
dies, even by SIGKILL, the launcher gets a signal from the kernel (Linux's
parent-death signal): SIGKILL for hydra, SIGTERM for prterun (and srun), which
then stop their ranks.

What the launcher leaves when it ends is stopped then (hydra, ending a job that
lost a host, left its ssh to that host running): mnn-launch reads the launcher's
processes every second while the job runs. And once a rank reports that it
aborts the job (the stall watchdog's report), the launcher has a few seconds to
end it; prterun would wait without end for its daemon on a lost host, so
mnn-launch then stops it and everything it started, and exits 1.

When a rank dies (killed, or crashed) the launcher ends the job, and mnn-launch
adds one line after all its output, naming the rank, its host and process and
how it died (:mod:`~mnn.distributed.launch.rank_deaths`); not after an
interrupt or a rank's stall report, which have their own line.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from mnn.distributed.launch.launcher_output import (ABORT_NOTICE, UNFINISHED_NOTICE, start_output_copier,
                                                   tell_interrupted, wait_for_copier)
from mnn.distributed.launch.plan import LaunchPlan
from mnn.distributed.launch.rank_deaths import (EXPLAINED_NOTICE, RUN_ERROR_NOTICE, LauncherDeath, death_cause,
                                               death_line_for)
from mnn.distributed.launch.settings import DEFAULT_START_TIMEOUT_S
from mnn.distributed.launch.startup import StartWatch
from mnn.distributed.launch.tree import (STOP_GRACE_S, kill_leftovers, process_tree, signal_local_ranks,
                                         stop_process_tree)

__all__ = ["STOP_SIGNALS", "JobEnd", "run_plan", "run_with_timeout"]

#: The signals that mnn-launch passes on: the terminal's Ctrl-C, a request to stop, a
#: closed terminal or ssh session (passed on as SIGTERM).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Signals after which mnn-launch stops handing them to the ranks and lets the
# launcher abort the job: the first stops training after a step, the second
# stops it at once (mnn-train's "a person insisting"), the third is for a job
# that no longer listens.
_SIGNALS_TO_RANKS = 2
# A signal this long after the first is a person insisting, as mnn-train takes it.
_REPEAT_AFTER_S = 1.0
# How long a signal is held while the ranks start, before mnn-launch stops the job itself
# (a job that hangs in its start would otherwise keep it until --start-timeout). Nothing is
# lost either way: a rank writes nothing before it is ready.
_HOLD_S = 5.0
_POLL_S = 0.1
# How often the running job's processes are read (what the launcher leaves when it ends is
# stopped then), and how long a launcher has to end a job that a rank said it aborts.
_FOLLOW_S = 1.0
_ABORT_GRACE_S = STOP_GRACE_S
_EXIT_ABORTED = 1  # what the ranks' abort asks for (the stall watchdog's)
# Open MPI's launcher forwards it to every rank unchanged (SIGINT and SIGTERM abort the job),
# and mnn-train takes it as a request to stop (mnn.distributed.training.stopping).
_FORWARDED_STOP = signal.SIGUSR1
_PR_SET_PDEATHSIG = 1
_EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class JobEnd:
    """How a job ended: its exit ``status`` (as mnn-launch exits: 128 + N after signal N),
    whether a stop signal ended it (``interrupted``: passed on, or held while it started),
    whether a rank's stall report did (``stalled``), whether mnn-train ended it with an
    error of its own (``run_error``: a bad job, a divergence, an output it cannot write),
    which rank died and how (``death``, the words of mnn-launch's line about it, or None:
    :func:`~mnn.distributed.launch.rank_deaths.death_cause`) and when mnn-launch first
    saw the job fail (``failed_at``, Unix time: a death or stall report, else the end)."""

    status: int
    interrupted: bool = False
    stalled: bool = False
    run_error: bool = False
    death: str | None = None
    failed_at: float = 0.0


def run_plan(plan: LaunchPlan, env: Mapping[str, str], start_timeout: float = DEFAULT_START_TIMEOUT_S) -> JobEnd:
    """Run the plan in the foreground, passing on SIGINT, SIGTERM and SIGHUP; return how it
    ended. ValueError, once every process of the job is stopped, when a job that reports
    its start-up did not start within ``start_timeout`` seconds."""
    mpi = plan.family in ("mpich", "openmpi")
    watch = StartWatch.create(start_timeout, plan.rank_hosts, plan.reports_start) if plan.rank_hosts else None
    job = _Job(plan.family if mpi else None, watch)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # From before the launcher starts: a signal in between is held, not lost.
        previous = {signum: signal.signal(signum, job.relay) for signum in STOP_SIGNALS
                    if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        job.start(plan, env, own_group=mpi)
        returncode = job.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        job.close()
    ended_at = time.time()
    death = job.death_cause(returncode)
    if death is not None:  # after everything the launcher said, on a line of its own
        print("\n" * job.unfinished + death_line_for(death), file=sys.stderr, flush=True)
    return JobEnd(returncode if returncode >= 0 else 128 - returncode, interrupted=job.interrupted,
                  stalled=job.aborting_at is not None, run_error=job.run_error, death=death,
                  failed_at=job.failure_seen_at or ended_at)


class _Job:
    """A running job: its launcher, the copier of its output, its signal handler
    (:meth:`relay`, see the module docstring) and its wait, which watches the start-up."""

    def __init__(self, family: str | None, watch: StartWatch | None):
        self.family = family  # "mpich" or "openmpi" (the launcher in a group of its own), else None
        self.watch = watch
        self.process: subprocess.Popen | None = None
        self.copier: int | None = None
        self.held: list[int] = []  # signals held back while the job starts
        self.held_at = 0.0
        self.insisted = False
        self.passed_on = 0
        self.tree: dict[int, int] = {}  # the launcher's processes seen so far: {pid: start time}
        self.notices: int | None = None  # the copier's notice pipe (read end)
        self.aborting_at: float | None = None  # when a rank said it aborts the job
        self.notice_text = b""  # the copier's notices: a line not yet complete
        self.deaths: list[LauncherDeath] = []  # what the launcher said about ranks that died
        self.begun: dict[int, int] = {}  # {rank: process id}, as the ranks reported
        self.explained = False  # a rank said why it ends
        self.run_error = False  # ... and that was mnn-train's own error
        self.failure_seen_at: float | None = None  # Unix time of the first death or stall report
        self.unfinished = False  # the launcher's stderr ended inside a line

    def start(self, plan: LaunchPlan, env: Mapping[str, str], own_group: bool) -> None:
        job_env = {**env, **plan.env_updates, **plan.launcher_env}
        if self.watch is not None:
            job_env.update(self.watch.environment())
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        try:
            self.process = subprocess.Popen(plan.argv, env=job_env, stdout=stdout_write, stderr=stderr_write,
                                            preexec_fn=_launcher_setup(plan.family, own_group))
        except OSError as error:
            os.close(stdout_read)
            os.close(stderr_read)
            raise ValueError(f"cannot start {plan.argv[0]}: {error.strerror or error}") from None
        finally:
            os.close(stdout_write)
            os.close(stderr_write)
        self.notices, notice_write = os.pipe()
        self.copier = start_output_copier(stdout_read, stderr_read, drop_noise=plan.family == "openmpi",
                                          notice_fd=notice_write)
        os.close(notice_write)
        os.close(stdout_read)
        os.close(stderr_read)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            kill_leftovers(self.tree)
        if self.copier is not None:
            wait_for_copier(self.copier)
        if self.notices is not None:
            self._read_notices(wait=True)  # the copier has ended: its end of the pipe is closed
            os.close(self.notices)
        if self.watch is not None:
            self.begun = self.watch.begun()
            self.watch.remove()

    def starting(self) -> bool:
        """Whether the launcher is not running yet, or the job reports its start-up and has not
        yet started."""
        return self.process is None or (self.watch is not None and self.watch.watched and not self.watch.ready())

    def relay(self, signum: int, frame: object) -> None:
        """The handler of SIGINT, SIGTERM and SIGHUP while the job runs."""
        if signum == signal.SIGHUP:
            signum = signal.SIGTERM
        if self.copier is not None:
            tell_interrupted(self.copier)
        if self.process is not None and self.process.poll() is not None:
            return
        if self.starting():
            now = time.monotonic()
            if not self.held:
                self.held_at = now
            elif now - self.held_at > _REPEAT_AFTER_S:
                self.insisted = True
            self.held.append(signum)
            return
        self._pass_on(signum)

    def _pass_on(self, signum: int) -> None:
        self.passed_on += 1
        if self.family == "mpich" and self.passed_on == 1:
            self.process.send_signal(signal.SIGTERM)  # SIGINT would add hydra's lines about Ctrl-C
            return
        if self.family is not None and self.passed_on <= _SIGNALS_TO_RANKS:
            if signal_local_ranks(self.process.pid, signum):
                return
            if self.family == "openmpi":  # every rank runs on another host: prterun forwards this one
                self.process.send_signal(_FORWARDED_STOP)
                return
        # Ctrl-C in a terminal already reached a launcher in our process group.
        if self.family is None and signum == signal.SIGINT and _in_terminal_foreground():
            return
        self.process.send_signal(signum)

    def wait(self) -> int:
        """The launcher's exit status, once the job has ended or been stopped."""
        watching = self.watch is not None
        while True:
            if self.held and not self.passed_on and not self.starting():
                self._pass_on(self.held[0])  # copies of one request within a second count once
            try:
                return self.process.wait(timeout=_POLL_S if watching else _FOLLOW_S)
            except subprocess.TimeoutExpired:
                pass
            if self._follow():
                stop_process_tree(self.process, grace=0)
                return _EXIT_ABORTED
            if not watching:
                continue
            if self.watch.ready():
                watching = False  # its port closes once every rank has said it began
            elif self.insisted or (self.held and time.monotonic() - self.held_at > _HOLD_S):
                stop_process_tree(self.process, grace=0)
                print("mnn-launch: interrupted before training started: stopped the job while it was starting",
                      file=sys.stderr, flush=True)
                return _EXIT_INTERRUPTED
            elif self.watch.overdue():
                if self.watch.watched:
                    failure = self.watch.failure(self.process.pid)
                    stop_process_tree(self.process, grace=0)
                    raise ValueError(failure)
                watching = False
                self.watch.stop_listening()

    def _follow(self) -> bool:
        """Note the launcher's processes, and whether a rank said it aborts the job; whether the
        launcher has had long enough to end it (prterun waits without end for a lost host)."""
        self.tree.update(process_tree(self.process.pid))
        self._read_notices(wait=False)
        return self.aborting_at is not None and time.monotonic() - self.aborting_at > _ABORT_GRACE_S

    def _read_notices(self, wait: bool) -> None:
        """Take in the copier's notices: what it has written so far, or (``wait``, once the
        copier has ended) everything."""
        while wait or select.select([self.notices], [], [], 0)[0]:
            chunk = os.read(self.notices, 4096)
            if not chunk:
                break
            *lines, self.notice_text = (self.notice_text + chunk).split(b"\n")
            for line in lines:
                notice, death = line + b"\n", LauncherDeath.decode(line)
                if notice == ABORT_NOTICE and self.aborting_at is None:
                    self.aborting_at = time.monotonic()
                self.explained = self.explained or notice == EXPLAINED_NOTICE
                self.run_error = self.run_error or notice == RUN_ERROR_NOTICE
                self.unfinished = notice == UNFINISHED_NOTICE
                if death is not None:
                    self.deaths.append(death)
                if (death is not None or notice == ABORT_NOTICE) and self.failure_seen_at is None:
                    self.failure_seen_at = time.time()

    @property
    def interrupted(self) -> bool:
        """Whether a stop signal came: passed on, or held while the job started."""
        return bool(self.held or self.passed_on)

    def death_cause(self, returncode: int) -> str | None:
        """Which rank died and how (:mod:`~mnn.distributed.launch.rank_deaths`), None when no
        rank died unexplained: the job succeeded, was interrupted, or a rank's stall report
        ended it."""
        if returncode == 0 or self.interrupted or self.aborting_at is not None:
            return None
        return death_cause(self.deaths, self.watch.hosts if self.watch is not None else [], self.begun,
                           socket.gethostname(), self.explained)


def _launcher_setup(family: str | None, own_group: bool) -> Callable[[], None] | None:
    """What the launcher's process does between fork and exec: perhaps a process group of its
    own, and the signal it gets when mnn-launch dies (see the module docstring)."""
    death_signal = signal.SIGKILL if family == "mpich" else signal.SIGTERM
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: after fork only call it
        except (OSError, AttributeError):
            prctl = None
    if prctl is None and not own_group:
        return None
    parent = os.getpid()

    def setup() -> None:
        if own_group:
            os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
            if os.getppid() != parent:  # mnn-launch died before prctl: nobody would tell us
                os.kill(os.getpid(), death_signal)

    return setup


def _in_terminal_foreground() -> bool:
    """Whether our process group is the foreground group of a controlling terminal."""
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(terminal) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(terminal)


def run_with_timeout(argv: list[str], env: Mapping[str, str], timeout: float,
                     family: str | None = None) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr) of a launcher of ``family``; on
    timeout, or when interrupted, the launcher and everything it started are stopped
    (:func:`~mnn.distributed.launch.tree.stop_process_tree`)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Files, not pipes: a child that the launcher leaves behind could hold a pipe open forever.
        process = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   preexec_fn=_launcher_setup(family, own_group=False))
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_tree(process)
            returncode = None
        except BaseException:
            stop_process_tree(process)
            raise
        out.seek(0)
        err.seek(0)
        return returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")
