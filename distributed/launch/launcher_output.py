"""Open MPI's launcher's stderr, passed on by a process of its own: as it comes, and after
an interrupt without what prterun adds to mnn-train's one line.

After an interrupt every rank exits 130 on purpose, and mnn-train has said so
in one line. prterun then adds a notice that a process "exited with non-zero
status, thus causing the job to be terminated" and, about half the time, its
PMIx server's complaint that a rank it wanted to stop had gone already
(PMIX_ERR_UNREACH) or, now and then with three ranks on two cores, its event
library's warning about a descriptor closed under it ("[warn] Epoll ...").
The copier drops these, and nothing else.

A process, not a thread: prterun whose stderr is a pipe that nobody reads
dies before it has stopped its ranks, so the copier must outlive a
SIGKILLed mnn-launch; it ends when prterun closes its stderr.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

from mnn.distributed.launch.tree import STOP_GRACE_S

__all__ = ["start_stderr_copier", "tell_interrupted", "wait_for_copier"]

_EXIT_NOTICE = re.compile(rb"detected that one or more processes exited with non-zero status")
_EXIT_130 = re.compile(rb"Exit code:\s+130\b")
_TEARDOWN_NOISE = re.compile(rb"^\[[^\]]*\] PMIX ERROR: PMIX_ERR_UNREACH |^\[warn\] Epoll ")
_RULE = b"-----"  # Open MPI's notices open and close with a rule of dashes


def start_stderr_copier(read_fd: int) -> int:
    """Fork the process that copies the launcher's stderr from ``read_fd`` to ours until the
    launcher closes it; return its pid."""
    # Held back until the child's handler is in place: SIGUSR1's default action ends a process.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        return pid
    try:
        # Only the launcher's stderr: a copy of any other pipe's end would keep that pipe open.
        os.closerange(3, read_fd)
        os.closerange(read_fd + 1, os.sysconf("SC_OPEN_MAX"))
        interrupted = threading.Event()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's signals are mnn-launch's business
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda signum, frame: interrupted.set())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        _copy(read_fd, interrupted)
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


def _copy(fd: int, interrupted: threading.Event) -> None:
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not interrupted.is_set():
            _write(pending + chunk)
            pending = b""
        else:
            # The job is ending: hold back whole notices, pass on everything else by line.
            pending = _drop_interrupt_noise(pending + chunk, final=not chunk)
        if not chunk:
            break


def _drop_interrupt_noise(text: bytes, final: bool) -> bytes:
    """Write the complete lines of ``text`` but each complete notice of exit status 130 and
    each line of teardown noise, and return what must wait for more (a last incomplete
    line, a notice not yet closed); ``final``: there is no more, write everything."""
    lines = text.split(b"\n")
    tail = lines.pop()  # after the last newline
    out, notice = [], None
    for line in lines:
        if notice is None:
            if line.startswith(_RULE):
                notice = [line]
            elif not _TEARDOWN_NOISE.match(line):
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
    _write(b"".join(line + b"\n" for line in out) + (tail if final else b""))
    return b"" if final else b"".join(line + b"\n" for line in held) + tail


def _write(data: bytes) -> None:
    if data:
        try:
            os.write(2, data)  # this process's stderr, whatever sys.stderr was made
        except OSError:
            pass
