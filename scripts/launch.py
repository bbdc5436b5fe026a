"""mnn-launch: start a command on N MPI ranks with the launcher, hosts and threads that fit.

Usage::

    mnn-launch -n 4 mnn-train --dataset digits             # 4 ranks on this machine
    mnn-launch --hosts node1:2,node2:2 mnn-train ...        # 2 ranks on each of two hosts
    mnn-launch -n 8 --hostfile hosts.txt mnn-train ...
    mnn-launch -n 2 --dry-run python train.py -n 3          # print the command, run nothing
    mnn-launch --check                                      # preflight: versions, hosts, hello, threads
    mnn-launch --check --hostfile hosts.txt                 # ... with one hello rank on each host
    mnn-launch --hostfile hosts.txt --max-restarts 3 mnn-train ... --checkpoint-every-steps 50

mnn-launch reads its own options up to the command, as mpiexec, torchrun and
horovodrun do: everything from the first word that is not one of its options
(or after ``--``, which is accepted too) is the command, ``-n 3`` above being
the script's. mpirun's ``-np N`` and ``-H host:slots,...``, and torchrun's
``--nproc-per-node N`` (N ranks on each host, or on this machine), are accepted.

Which launcher. Inside a SLURM allocation (``SLURM_JOB_ID`` set) ranks are started
with ``srun -n N``, N defaulting to ``SLURM_NTASKS``. Elsewhere the ``mpiexec`` of
the MPI library mpi4py is linked against is used: the one beside the Python
executable (where the ``mpich`` wheel and a virtual environment put it), then the
one beside the ``mpicc`` mpi4py was built with, then the first on ``PATH``; each
is accepted only when ``mpiexec --version`` names the same MPI family (MPICH and
its derivatives, or Open MPI) as ``MPI.Get_library_version()``. An ``mpiexec`` of
another MPI starts N separate one-process jobs in which every rank believes it
is rank 0, so a mismatch first on ``PATH`` is reported on stderr. Without
mpi4py or any ``mpiexec`` the command runs as one process, and mnn-launch says so.

Hosts. ``--hosts a:2,b:2`` or ``--hostfile FILE``, where FILE holds one host per
line in either format (``#`` starts a comment; a host without a count has 1 slot;
a host listed twice has the slots of both lines)::

    node1:4            # MPICH: host:slots
    node2 slots=4      # Open MPI: host slots=N (max_slots=M is accepted and ignored)

They are passed as ``-hosts a:2,b:2`` to MPICH's hydra and ``--host a:2,b:2`` to
Open MPI; ``-n`` defaults to the total of the slots.

Other hosts. The launcher reaches hosts other than this machine with ssh (or
``--ssh PROGRAM``) and would wait forever for one that does not answer. So
before anything starts, every such host must answer ``ssh HOST true`` within
``--start-timeout`` seconds (default 120), all at once; mnn-launch names each one
that did not, starts nothing and exits with status 2. The launcher's own ssh
gets ``-o BatchMode=yes -o ConnectTimeout=S`` too (HYDRA_LAUNCHER_EXTRA_ARGS for
MPICH, PRTE_MCA_plm_ssh_args for Open MPI, unless set), so that it never waits
for a password nobody can type; ``--dry-run`` shows these as the launcher
environment.

Start-up. A host may answer ssh and still never start its ranks (its remote
shell hangs, its MPI daemon never calls back), and a rank stopped before MPI
starts leaves the others waiting in MPI's start-up: neither launcher has a
deadline for that. So every rank must get through MPI's start-up and a first
collective within ``--start-timeout`` seconds too; otherwise mnn-launch stops
every process of the job (remote shells included), names the ranks that did
not start and where they were to run, and exits with status 2. Each rank
reports its start-up to mnn-launch: in a directory named in MNN_START_DIR when
every rank runs on this machine, else over TCP to a port that mnn-launch opens
only while the job starts (MNN_START_ADDR), on the address this machine reaches
the first other host from: the hosts must be able to connect to it, as they
must to the launcher's own port. mnn-train reports, as does any program that
takes its communicator from mnn.distributed.get_communicator; other programs
are not bounded. A signal while the job starts is held until its ranks can
take it; if they cannot within 5 s, or a second signal comes a second later,
mnn-launch stops the job at once (exit status 130).

Environment. OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS are set to
``max(1, cores per host // ranks per host)`` unless already set (other hosts are
assumed to have as many cores as this one; under SLURM, ``SLURM_CPUS_PER_TASK``
or ``SLURM_CPUS_ON_NODE`` decide), so that ranks do not fight over cores with
BLAS threads. The whole environment reaches the ranks: hydra and srun pass it on
by themselves, and mnn-launch adds ``-genv`` for the variables it sets; Open MPI
is given ``-x NAME`` for those and for PATH, LD_LIBRARY_PATH, PYTHONPATH and
VIRTUAL_ENV. Every rank also gets torchrun's RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE, so that scripts written for torchrun find them: the ranks start
through a small script of mnn-launch's that sets them from the launcher's own
names and then becomes the command (``--dry-run`` shows it). When mnn-launch's stderr is a terminal it also sets MNN_PROGRESS=bar
(unless set), so that rank 0 draws a progress bar although its own stderr is the
launcher's pipe.

Signals. SIGINT (Ctrl-C), SIGTERM and SIGHUP (a closed terminal or ssh session,
passed on as SIGTERM) reach every rank, and mnn-launch exits with the job's exit
status (128 + N after signal N; 130 when mnn-train stops after an interrupt).
The launcher runs in a process group of its own, so that the terminal's signals
reach mnn-launch alone, and mnn-launch passes each on: MPICH's launcher gets
the first and forwards it to every rank (a second one would make it abort the
job); Open MPI's would abort the job (exit status 1, the ranks' last output
lost), so there mnn-launch gives the first to the ranks on this machine itself,
or, when every rank runs on another host, to the launcher as SIGUSR1, which it
forwards to every rank unchanged and mnn-train takes as a request to stop.
The second goes the same way, a third to the launcher. The
launcher's output passes through mnn-launch: output that nobody reads any more
(``mnn-launch ... | head``) is dropped, and the job runs on. No job outlives
mnn-launch: if it dies, even by SIGKILL, its launcher is stopped (Linux), and
with it the ranks. Open MPI refuses to run as root unless told: as root
mnn-launch adds ``--allow-run-as-root`` (as horovodrun does).

A rank that dies. When a rank is killed or crashes, the launcher ends the job, and
mnn-launch names the rank in one line after the job's output: its host, its process
and the signal (``mnn-launch: rank 1 on node2 (process 12345) was killed by signal 9
(SIGKILL); the launcher ended the job``). MPICH's launcher names only the process and
host; Open MPI's often blames a rank that lost its connection to the dead one, naming
only the dead one's host and no signal (mnn-launch then names the rank on that host, if
one). mnn-launch knows each rank's process from its start-up report. MPICH's
launcher ends a host's other ranks with SIGKILL too and may name one of those: with
several ranks on the host, the line names them all (``one of ranks 0, 1 on node2``).

Restarts. With ``--max-restarts N`` (torchrun's name), a job that fails in a way a
restart can fix (a rank killed or crashed, a stall, a host lost: any exit but 0,
2 for a bad job, 130 after Ctrl-C or SIGTERM, or an error mnn-train reported
itself, as a run that diverged) is started again, up to N times, with one line
saying why and on how many ranks. Before each restart the hostfile is read again
and every other host is asked ``ssh HOST true`` again (at most 15 s); those that
do not answer are left out, and the ranks shrink by their slots. With fewer than
``--min-ranks M`` left (torchrun's ``--nnodes MIN:MAX``), the job ends with its
failure's status. Every start gets MNN_RESTART_COUNT (0, 1, ...; torchrun's
TORCHELASTIC_RESTART_COUNT) and MNN_MAX_RESTARTS; mnn-train, restarted, continues
from its output's newest checkpoint (``--checkpoint-every-steps K`` keeps what a
failure loses under K steps) and ends with the model of an uninterrupted run.

Check. ``--check`` reports versions, the launcher, whether the hosts resolve and
answer ssh, and the threads per rank, and starts a hello job: two ranks on this
machine, or with ``--hosts``/``--hostfile`` one rank on each host (two on a lone
host), saying per host whether its rank answered, only started (MPI could not
connect it), or never started (ssh, the host name, or Python missing there at
the same path), and naming a host that runs another NumPy or mnn than this
machine (mnn-train refuses such ranks). The hello gets ``--start-timeout``
seconds; then it is stopped, with every process it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, Mapping

from mnn.distributed.launch import (
    DEFAULT_START_TIMEOUT_S,
    JobEnd,
    MpiSetup,
    STOP_SIGNALS,
    LaunchSettings,
    build_command,
    detect_mpi,
    format_plan,
    parse_hostfile,
    parse_hosts,
    require_answers,
    run_check,
    run_plan,
)
from mnn.distributed.launch.restarts import RestartPolicy, new_launch_id, run_restarting
from mnn.scripts.arguments import at_least, positive

__all__ = ["build_parser", "parse_args", "launch_settings", "main"]

_EXIT_INTERRUPTED = 130
# More ranks than any job of a NumPy trainer: a typo, refused before the plan lists a host per rank.
_MAX_RANKS = 10**6


def build_parser() -> argparse.ArgumentParser:
    """The mnn-launch argument parser of its own options (:func:`parse_args` finds where the
    command begins)."""
    title, usage_block, rest = _help_parts()
    parser = argparse.ArgumentParser(
        prog="mnn-launch",
        usage="mnn-launch [-n N | -np N | --nproc-per-node N] [--hostfile FILE | --hosts H:S,... | -H H:S,...] "
              "[--mpiexec PATH] [--ssh PROGRAM] [--start-timeout S] [--max-restarts N] [--min-ranks M] "
              "[--dry-run] [--check] [--] COMMAND ...",
        # The module docstring: its title and examples first, the rest after the options.
        description=f"{title}\n\n{usage_block}",
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ranks = parser.add_mutually_exclusive_group()
    ranks.add_argument("-n", "-np", "--ranks", type=positive(int, at_most=_MAX_RANKS, unit="ranks"), metavar="N",
                       help="number of ranks (default: SLURM_NTASKS inside SLURM, else the total slots "
                            "of --hosts/--hostfile; required otherwise)")
    ranks.add_argument("--nproc-per-node", type=positive(int, at_most=_MAX_RANKS, unit="ranks"), metavar="N",
                       help="N ranks on each host of --hosts/--hostfile, or on this machine (torchrun's option)")
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("--hostfile", metavar="FILE", help="hosts, one per line: 'host:slots' or 'host slots=N'")
    hosts.add_argument("--hosts", "-H", metavar="H:S,...", help="comma-separated hosts with slots, e.g. a:2,b:2")
    parser.add_argument("--mpiexec", metavar="PATH",
                        help="use this mpiexec (also inside SLURM) instead of the one found for mpi4py")
    parser.add_argument("--ssh", metavar="PROGRAM",
                        help="remote shell for the hosts other than this machine (default: ssh)")
    parser.add_argument("--start-timeout", type=positive(float, unit="seconds"), default=DEFAULT_START_TIMEOUT_S,
                        metavar="S",
                        help="seconds each other host has to answer ssh before the job starts, every rank to "
                             "get through MPI's start-up and a first collective (else the job is stopped), and "
                             f"--check's hello to finish (default: {DEFAULT_START_TIMEOUT_S:g})")
    parser.add_argument("--max-restarts", type=at_least(0, unit="restarts"),
                        default=0, metavar="N",
                        help="restart the job up to N times when it fails in a way a restart can fix (a rank "
                             "killed or crashed, a stall, a host lost), on the hosts that still answer; "
                             "mnn-train continues from its newest checkpoint (as torchrun's --max-restarts; "
                             "default: 0)")
    parser.add_argument("--min-ranks", type=positive(int, at_most=_MAX_RANKS, unit="ranks"), default=1, metavar="M",
                        help="with --max-restarts: restart only while at least M ranks' hosts answer "
                             "(as the MIN of torchrun's --nnodes MIN:MAX; default: 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command and the environment variables it sets, run nothing")
    parser.add_argument("--check", action="store_true",
                        help="preflight: versions, hosts, a hello (one rank per host of --hosts/--hostfile, "
                             "else 2 ranks here), threads; 'OK ...' or 'FIX: ...' per line, exit status 1 if "
                             "anything needs fixing")
    return parser


def _help_parts() -> tuple[str, str, str]:
    """The module docstring as the help: its title, its examples, and the rest."""
    title, _, examples, rest = __doc__.split("\n\n", 3)
    return title, f"examples:\n{examples}", rest.replace("::\n", ":\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse mnn-launch's arguments: its own options, up to the first word that is none of
    them (or up to ``--``); from there on, the command (``args.command``), as mpiexec and
    torchrun read theirs. ``--nproc-per-node`` is turned into ``ranks`` or the hosts' slots.

    :func:`launch_settings` makes the job of the result.
    """
    parser = build_parser()
    argv = list(argv)
    split = _command_start(parser, argv)
    own, command = argv[:split], argv[split:]
    if command[:1] == ["--"]:
        command = command[1:]
    args = parser.parse_args(own)
    args.command = command
    return args


def _command_start(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """The index in ``argv`` of the command's first word (or of ``--``): the first word that
    is neither one of the parser's options nor the value such an option takes."""
    takes_value = {option for action in parser._actions if action.nargs != 0
                   for option in action.option_strings}
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--" or not word.startswith("-") or word == "-":
            return index
        name = word.split("=", 1)[0]
        index += 2 if name in takes_value and "=" not in word else 1
    return len(argv)


def launch_settings(args: argparse.Namespace) -> LaunchSettings:
    """The job that :func:`parse_args`'s ``args`` ask for, with ``--hosts`` or ``--hostfile`` read
    into ``(host, slots)`` pairs. Raises ValueError for a bad host list."""
    if args.hostfile is not None:
        hosts = parse_hostfile(args.hostfile)
    else:
        hosts = parse_hosts(args.hosts) if args.hosts is not None else None
    ranks = args.ranks
    if args.nproc_per_node is not None:  # torchrun's: so many on each host
        if hosts is None:
            ranks = args.nproc_per_node
        else:
            hosts = [(host, args.nproc_per_node) for host, _ in hosts]
    return LaunchSettings(command=args.command, ranks=ranks, hosts=hosts, mpiexec=args.mpiexec, ssh=args.ssh,
                          start_timeout=args.start_timeout)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run mnn-launch with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    The console script ``mnn-launch`` (and ``python -m mnn.scripts.launch``) exits with it.
    Once a job has run, SIGINT, SIGTERM and SIGHUP are left ignored in this process.
    """
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ if env is None else env)
    _reopen_closed_streams()
    # Until the job runs (and passes signals on), a signal ends mnn-launch with one line.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS
                    if signal.getsignal(signum) is not signal.SIG_IGN}
    ran = False
    try:
        args = parse_args(argv)
        settings = launch_settings(args)
        mpi = detect_mpi(env, mpiexec=settings.mpiexec)
        if args.check:
            lines, ok = run_check(settings, env, mpi)
            return 0 if _say("\n".join(lines)) and ok else 1
        plan = build_command(settings, env, mpi, terminal=sys.stderr.isatty())
        for warning in plan.warnings:
            print(f"mnn-launch: warning: {warning}", file=sys.stderr, flush=True)
        if args.dry_run:
            return 0 if _say(format_plan(plan)) else 1
        ran = True
        policy = RestartPolicy(args.max_restarts, args.min_ranks, args.hostfile)
        return run_restarting(settings, policy, env, _start_job(mpi), parse_hostfile, new_launch_id())
    except ValueError as error:
        print(f"mnn-launch: error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("mnn-launch: interrupted before the job started", file=sys.stderr, flush=True)
        return _EXIT_INTERRUPTED
    finally:
        # Once a job has run, a stop signal is a late copy of the one that ended it (two Ctrl-C
        # 0.2 s apart, the job done in between). Ignored, not handled: while the interpreter
        # shuts down, Python puts the default action back in place of a handler of ours, and
        # that copy would kill mnn-launch (exit -2) after the job ended well.
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if ran else handler)


def _start_job(mpi: MpiSetup) -> Callable[[LaunchSettings, dict[str, str], bool], tuple[int, JobEnd]]:
    """One start of the job, for :func:`run_restarting`: its plan (the first's warnings are
    printed before), and for the first the hosts' answers to ssh (a restart has asked them)."""
    def start(settings: LaunchSettings, env: dict[str, str], first: bool) -> tuple[int, JobEnd]:
        plan = build_command(settings, env, mpi, terminal=sys.stderr.isatty())
        if first and plan.launcher == "mpiexec":
            require_answers(settings.hosts, settings.ssh, settings.start_timeout, env)
        return plan.ranks, run_plan(plan, env, settings.start_timeout)
    return start


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _say(text: str) -> bool:
    """Print ``text`` on stdout; whether it could be written. A reader that went away
    (``| head -1``) is no error; a stdout that cannot take it (a full disk) is one line on stderr."""
    try:
        print(text, flush=True)
    except OSError as error:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # where the rest of what was buffered goes
        os.close(devnull)
        if not isinstance(error, BrokenPipeError):
            print(f"mnn-launch: error: cannot write to stdout: {error.strerror or error}", file=sys.stderr,
                  flush=True)
            return False
    return True


def _reopen_closed_streams() -> None:
    """Put /dev/null where stdin, stdout or stderr was closed (``<&-``, ``2>&-``). Otherwise the
    job's pipes take those numbers (the launcher reads its own output as its input: a hang under
    Open MPI, SIGPIPE under MPICH) and sys.stderr is None (an AttributeError before the job starts)."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if devnull != fd:  # the lowest free number, so fd itself unless a lower one was closed
                os.dup2(devnull, fd)
                os.close(devnull)
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


if __name__ == "__main__":
    sys.exit(main())
