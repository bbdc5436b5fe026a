"""The launcher's stdout and stderr, passed on by a process of our own: as they come, after
an interrupt without what prterun adds to mnn-train's one line, and never back-pressure
from a reader that went away.

Output that nobody reads any more (``mnn-launch ... | head``) must not stop the
job: a launcher whose stdout is a closed pipe dies of SIGPIPE (hydra) or aborts
the job (prterun). So the launcher writes into pipes that the copier drains
whatever becomes of its own stdout and stderr: what cannot be written is dropped,
and the job runs to its end.

After an interrupt every rank exits 130 on purpose, and mnn-train has said so
in one line. prterun then adds a notice that a process "exited with non-zero
status, thus causing the job to be terminated" and, about half the time, its
PMIx server's complaint that a rank it wanted to stop had gone already
(PMIX_ERR_UNREACH) or, now and then with three ranks on two cores, its event
library's warning about a descriptor closed under it ("[warn] Epoll ...").
Under Open MPI the copier drops these from stderr, and nothing else.

The stall watchdog's report (:mod:`mnn.distributed.watchdog`) says that the
job is being aborted. A launcher may then wait without end for a host that is
lost (prterun waits for its daemon there), so the copier tells mnn-launch, which
gives the launcher a few seconds to end the job before it stops it itself. What the
launcher says about a rank that died goes to mnn-launch the same way
(:mod:`~mnn.distributed.launch.rank_deaths`), one line per notice.

A process, not a thread: a launcher whose output is a pipe that nobody reads
dies before it has stopped its ranks, so the copier must outlive a
SIGKILLed mnn-launch; it ends when the launcher (and whatever it left behind)
has closed both pipes.
"""

from __future__ import annotations

import os
import re
import select
import signal
import threading
import time

from mnn.distributed.launch.rank_deaths import DeathReader
from mnn.distributed.launch.tree import STOP_GRACE_S

__all__ = ["start_output_copier", "tell_interrupted", "wait_for_copier", "ABORT_NOTICE", "UNFINISHED_NOTICE"]

_EXIT_NOTICE = re.compile(rb"detected that one or more processes exited with non-zero status")
_EXIT_130 = re.compile(rb"Exit code:\s+130\b")
_TEARDOWN_NOISE = re.compile(rb"^\[[^\]]*\] PMIX ERROR: PMIX_ERR_UNREACH |^\[warn\] Epoll ")
_RULE = b"-----"  # Open MPI's notices open and close with a rule of dashes
# The end of the stall watchdog's report; the window that finds it across two reads.
_STALL_ABORT = re.compile(rb"; aborting all \d+ ranks \(stall timeout ")
_WINDOW = 64
# The first deaths are the ones that matter; a bound keeps the notice pipe from filling up (and
# the copier from blocking on it) whatever the ranks print.
_MAX_NOTICES = 16
# Whether what was last written to a descriptor ended inside a line.
_unfinished_line = {1: False, 2: False}
#: The line the copier writes to its notice pipe when a rank reported that it aborts the job
#: (a death the launcher reported is a line of its own: ``LauncherDeath.encode``).
ABORT_NOTICE = b"abort\n"
#: The line the copier writes last when the launcher's stderr ended inside a line (prterun may
#: end on a NUL byte): what mnn-launch says after it must start a line of its own.
UNFINISHED_NOTICE = b"unfinished\n"


def start_output_copier(stdout_fd: int, stderr_fd: int, drop_noise: bool, notice_fd: int | None = None) -> int:
    """Fork the process that copies the launcher's output from the pipes ``stdout_fd`` and
    ``stderr_fd`` to our stdout and stderr until the launcher closes them; return its pid.
    ``drop_noise``: drop Open MPI's notices after an interrupt; ``notice_fd``: a pipe to
    write :data:`ABORT_NOTICE` to when a rank reports that it aborts the job, and each death
    of a rank that the launcher reports (see the module docstring)."""
    # Held back until the child's handler is in place: SIGUSR1's default action ends a process.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        return pid
    try:
        # Only the launcher's output: a copy of any other pipe's end would keep that pipe open.
        keep = sorted({stdout_fd, stderr_fd} | ({notice_fd} if notice_fd is not None else set()))
        for low, high in zip([2, *keep], [*keep, os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)
        interrupted = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the terminal's signals are mnn-launch's business
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a reader gone is an error to ignore, not death
        signal.signal(signal.SIGUSR1, lambda signum, frame: interrupted.set())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        _copy(stdout_fd, stderr_fd, interrupted if drop_noise else None, notice_fd)
    finally:
        os._exit(0)


def tell_interrupted(pid: int) -> None:
    """Tell the copier that the job was interrupted (it may have ended already)."""
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        pass


def wait_for_copier(pid: int, timeout: float = STOP_GRACE_S) -> None:
    """Wait until the copier has passed on the launcher's last words; not for a process that
    the launcher left behind holding its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _copy(stdout_fd: int, stderr_fd: int, interrupted: threading.Event | None, notice_fd: int | None) -> None:
    """Copy both pipes until both are closed; ``interrupted``, when given, filters stderr;
    ``notice_fd``, when given, hears of a stall report on stderr (once) and of each death
    the launcher reports."""
    pending = b""
    seen = b""  # the end of stderr so far, where a report may have begun
    told_abort, told_notices = False, 0
    readers = {stdout_fd: DeathReader(), stderr_fd: DeathReader()}
    open_fds = [stdout_fd, stderr_fd]
    while open_fds:
        for fd in select.select(open_fds, [], [])[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
            if notice_fd is not None:
                if fd == stderr_fd and not told_abort and _STALL_ABORT.search(seen + chunk):
                    _write(notice_fd, ABORT_NOTICE)
                    told_abort = True
                for notice in readers[fd].feed(chunk):
                    if told_notices < _MAX_NOTICES:
                        _write(notice_fd, notice)
                        told_notices += 1
            if fd == stderr_fd:
                seen = (seen + chunk)[-_WINDOW:]
            if fd == stdout_fd:
                _write(1, chunk)
            elif interrupted is None or not interrupted.is_set():
                _write(2, pending + chunk)
                pending = b""
            else:
                # The job is ending: hold back whole notices, pass on everything else by line.
                pending = _drop_interrupt_noise(pending + chunk, final=not chunk)
    if notice_fd is not None and _unfinished_line[2]:
        _write(notice_fd, UNFINISHED_NOTICE)


def _drop_interrupt_noise(text: bytes, final: bool) -> bytes:
    """Write the complete lines of ``text`` but each complete notice of exit status 130 and
    each line of teardown noise, and return what must wait for more (a last incomplete
    line, a notice not yet closed); ``final``: there is no more, write everything."""
    lines = text.split(b"\n")
    tail = lines.pop()  # after the last newline
    out, notice = [], None
    for line in lines:
        if _TEARDOWN_NOISE.match(line):  # other processes write it, inside a notice too
            continue
        if notice is None:
            if line.startswith(_RULE):
                notice = [line]
            else:
                out.append(line)
        elif len(notice) == 1:
            if line.startswith(_RULE):  # the first rule closed something else
                out.append(notice[0])
                notice = [line]
            elif _EXIT_NOTICE.search(line):
                notice.append(line)
            else:  # a rule that opens something else
                out += [notice[0], line]
                notice = None
        else:
            notice.append(line)
            if line.startswith(_RULE):
                if not _EXIT_130.search(b"\n".join(notice)):
                    out += notice
                notice = None
    held = notice or []
    if final:
        out += held
        held = []
    _write(2, b"".join(line + b"\n" for line in out) + (tail if final else b""))
    return b"" if final else b"".join(line + b"\n" for line in held) + tail


def _write(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (this process's stdout or stderr, whatever sys.stdout was
    made), or as much as the reader takes: a closed pipe or terminal drops the rest."""
    if data:
        _unfinished_line[fd] = not data.endswith(b"\n")
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return
