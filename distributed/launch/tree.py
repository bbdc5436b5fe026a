"""The processes a launcher started, read from /proc (Linux; elsewhere none are seen):
stopping all of them, and finding the ranks that a launcher runs on this machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["STOP_GRACE_S", "process_tree", "stop_process_tree", "kill_leftovers", "local_ranks", "signal_local_ranks",
           "process_state"]

#: How long a launcher told to stop (SIGTERM) has to stop its ranks before everything it
#: started is SIGKILLed; prterun's own abort takes about 0.5 s, hydra's less.
STOP_GRACE_S = 2.0


def stop_process_tree(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop ``process`` and every process it started, wherever they went.

    SIGTERM first, so that a launcher can stop its ranks; after ``grace``
    seconds SIGKILL for whatever is left. Launchers put their remote shells and
    ranks in sessions of their own, and those outlive a launcher that exits
    (hydra, told to stop while a host does not answer, leaves its ``ssh``
    running); so the tree is read from /proc before and while it stops.
    ``grace=0``: SIGKILL at once, so that the launcher says nothing (a job that
    never started has nothing to save).
    """
    tree = process_tree(process.pid)
    if process.poll() is None and grace > 0:
        process.terminate()
    deadline = time.monotonic() + grace
    while process.poll() is None and time.monotonic() < deadline:
        tree.update(process_tree(process.pid))
        time.sleep(0.05)
    tree.update(process_tree(process.pid))
    if process.poll() is None:
        process.kill()
    kill_leftovers(tree)
    process.wait()


def kill_leftovers(tree: dict[int, int]) -> None:
    """SIGKILL every process of ``tree`` ({pid: start time}, from :func:`process_tree`) that
    still runs: what a launcher left behind when it ended (hydra, ending a job that lost a
    host, leaves its ssh to that host waiting for an answer)."""
    for pid, started in tree.items():
        if _start_time(pid) == started:  # the same process, not a new one with its number
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def process_tree(pid: int) -> dict[int, int]:
    """{pid: start time} of every descendant of ``pid``."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    tree, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        tree[child] = table[child][1]
        todo += children.get(child, [])
    return tree


def local_ranks(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the ranks that the launcher ``launcher_pid`` runs on this machine: its
    descendants that carry a rank in their environment (the topmost, where a rank's own
    children inherit it)."""
    table = _process_table()
    tree = process_tree(launcher_pid)
    ranks = {pid: _rank_of(pid) for pid in tree}
    return {rank: pid for pid, rank in ranks.items()
            if rank is not None and ranks.get(table.get(pid, (0, 0))[0]) is None}


def signal_local_ranks(launcher_pid: int, signum: int) -> bool:
    """Send ``signum`` to the ranks that the launcher started on this machine
    (:func:`local_ranks`); whether there were any."""
    ranks = list(local_ranks(launcher_pid).values())
    for pid in ranks:
        try:
            # prterun signals each rank's process group, so that a rank's own children hear it too.
            if os.getpgid(pid) == pid:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return bool(ranks)


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, T when stopped, ...); None if it is gone."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return None if fields is None else fields[0]


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name in (b"PMI_RANK", b"OMPI_COMM_WORLD_RANK", b"PMIX_RANK") and value.isdigit():
            return int(value)
    return None


def _process_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of every process we can see."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None:
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]))
    return table


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return None if fields is None else int(fields[19])


def _stat_fields(path: Path) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...): index 1 is the
    parent, 19 the start time; None for a process that is gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()
