"""The other hosts of a job, before it starts: each must answer ``ssh HOST true`` in time.

MPICH's and Open MPI's launchers start their daemons over ssh and wait for every
one of them, with no deadline: a host that is down, asks for a password or
hangs leaves the launcher waiting forever, saying nothing. Like horovodrun,
mnn-launch therefore first runs ``ssh HOST true`` on every other host at once,
with :func:`~mnn.distributed.launch.plan.ssh_options`, and names each host that
did not answer in time or failed; nothing of the job is started then, and no
ssh is left running.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from typing import Mapping

from mnn.distributed.launch.hosts import remote_hosts
from mnn.distributed.launch.plan import ssh_options
from mnn.distributed.launch.tree import stop_process_tree

__all__ = ["find_ssh", "check_remote_hosts", "describe_unanswered", "require_answers"]


def find_ssh(ssh: str | None, env: Mapping[str, str]) -> str:
    """The remote shell: ``--ssh`` or ``ssh``, found on PATH; ValueError if there is none."""
    found = shutil.which(ssh or "ssh", path=env.get("PATH", ""))
    if found is None:
        raise ValueError(f"--ssh {ssh}: no such executable" if ssh else
                         "the hosts include other machines, but there is no ssh on PATH to reach them: install "
                         "OpenSSH's client, or pass --ssh PROGRAM")
    return found


def check_remote_hosts(hosts: list[str], ssh: str, timeout: float,
                       env: Mapping[str, str]) -> dict[str, str | None]:
    """Run ``ssh OPTIONS HOST true`` for every host at once; {host: None if it answered within
    ``timeout`` seconds, else what went wrong}. Stops every ssh still running at the deadline."""
    started = {}
    outputs = []
    try:
        for host in hosts:
            output = tempfile.TemporaryFile()
            outputs.append(output)
            argv = [ssh, *ssh_options(timeout), host, "true"]
            try:
                started[host] = subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.DEVNULL, stderr=output)
            except OSError as error:
                raise ValueError(f"cannot start {ssh}: {error.strerror or error}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(process.poll() is None for process in started.values()):
            time.sleep(0.05)
        answers = {}
        for (host, process), output in zip(started.items(), outputs):
            if process.poll() is None:
                stop_process_tree(process, grace=0.5)
                answers[host] = f"no answer within {timeout:g} s"
            elif process.returncode != 0:
                output.seek(0)
                said = output.read().decode(errors="replace").strip().splitlines()
                status = process.returncode
                failed = (f"ssh failed with exit status {status}" if status > 0 else
                          f"ssh was killed by signal {-status} ({_signal_name(-status)})")
                answers[host] = failed + (f": {said[-1]}" if said else "")
            else:
                answers[host] = None
        return answers
    finally:
        for process in started.values():
            if process.poll() is None:
                stop_process_tree(process, grace=0.5)
        for output in outputs:
            output.close()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "an unknown signal"


def describe_unanswered(answers: Mapping[str, str | None], ssh: str) -> str:
    """One message for the hosts in ``answers`` that did not answer, naming each."""
    problems = "; ".join(f"{host}: {problem}" for host, problem in answers.items() if problem)
    first = next(host for host, problem in answers.items() if problem)
    return (f"the job was not started: {problems} (asked: '{ssh} HOST true'). Check that each host is up and its "
            f"name right, and that 'ssh {first} true' runs from here without asking for a password")


def require_answers(hosts: list[tuple[str, int]] | None, ssh: str | None, timeout: float,
                    env: Mapping[str, str]) -> None:
    """Raise ValueError naming every host of ``hosts`` other than this machine that does not
    answer ``ssh HOST true`` within ``timeout`` seconds (see the module docstring)."""
    remote = remote_hosts(hosts)
    if not remote:
        return
    program = find_ssh(ssh, env)
    answers = check_remote_hosts(remote, program, timeout, env)
    if any(answers.values()):
        raise ValueError(describe_unanswered(answers, program))
