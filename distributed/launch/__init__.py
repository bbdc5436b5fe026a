"""mnn.distributed.launch: what mnn-launch does, one concern per module.

- ``hosts``: ``--hosts`` and hostfiles, how ranks fill the hosts, this machine's names and cores;
- ``mpi``: mpi4py's MPI library and the ``mpiexec`` that belongs to it (:func:`detect_mpi`);
- ``settings``: what a job is asked to be (:class:`LaunchSettings`: command, ranks, hosts, launcher, timeout);
- ``plan``: the command line and environment of a job (:func:`build_command`);
- ``remote``: the other hosts, which must answer ssh before a job starts (:func:`require_answers`);
- ``process``: running a plan with signals passed on, or with a time limit, leaving no process behind;
- ``startup``: the bound on a job's start-up (every rank through MPI's start-up and a first collective);
- ``restarts``: a job that failed started again (``--max-restarts``), on the hosts that still answer;
- ``tree``: the processes a launcher started (stopping them all; its ranks on this machine);
- ``launcher_output``: the launcher's output, passed on whoever reads it, without Open MPI's noise after
  an interrupt;
- ``rank_deaths``: a rank that died: what the launcher says about it, and mnn-launch's one line
  naming the rank, its host, its process and how it died;
- ``check``: the ``--check`` preflight.

The command line, and the help that explains all of it, is ``mnn.scripts.launch``.
Tests build commands with :func:`build_command`, a pure function of the
:class:`LaunchSettings`, the environment and the detected :class:`MpiSetup`.
"""

from mnn.distributed.launch.check import build_hello_command, run_check
from mnn.distributed.launch.hosts import parse_hostfile, parse_hosts
from mnn.distributed.launch.mpi import MpiSetup, detect_mpi, find_mpiexec, mpi_family
from mnn.distributed.launch.plan import LaunchPlan, build_command, format_plan, ssh_options
from mnn.distributed.launch.process import STOP_SIGNALS, JobEnd, run_plan
from mnn.distributed.launch.remote import check_remote_hosts, require_answers
from mnn.distributed.launch.settings import DEFAULT_START_TIMEOUT_S, LaunchSettings
from mnn.distributed.launch.tree import process_tree, stop_process_tree

__all__ = [
    "DEFAULT_START_TIMEOUT_S",
    "LaunchSettings",
    "MpiSetup",
    "LaunchPlan",
    "parse_hostfile",
    "parse_hosts",
    "mpi_family",
    "detect_mpi",
    "find_mpiexec",
    "build_command",
    "build_hello_command",
    "format_plan",
    "ssh_options",
    "STOP_SIGNALS",
    "JobEnd",
    "run_plan",
    "stop_process_tree",
    "process_tree",
    "check_remote_hosts",
    "require_answers",
    "run_check",
]
