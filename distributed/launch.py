"""mnn-launch: start a command on N MPI ranks with the launcher, hosts and threads that fit.

Usage::

    mnn-launch -n 4 -- mnn-train --dataset digits          # 4 ranks on this machine
    mnn-launch --hosts node1:2,node2:2 -- mnn-train ...     # 2 ranks on each of two hosts
    mnn-launch -n 8 --hostfile hosts.txt -- mnn-train ...
    mnn-launch -n 2 --dry-run -- mnn-train ...              # print the command, run nothing
    mnn-launch --check                                      # preflight: versions, hosts, hello, threads
    mnn-launch --check --hostfile hosts.txt                 # ... with one hello rank on each host

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

Environment. OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS are set to
``max(1, cores per host // ranks per host)`` unless already set (other hosts are
assumed to have as many cores as this one; under SLURM, ``SLURM_CPUS_PER_TASK``
or ``SLURM_CPUS_ON_NODE`` decide), so that ranks do not fight over cores with
BLAS threads. The whole environment reaches the ranks: hydra and srun pass it on
by themselves, and mnn-launch adds ``-genv`` for the variables it sets; Open MPI
is given ``-x NAME`` for those and for PATH, LD_LIBRARY_PATH, PYTHONPATH and
VIRTUAL_ENV. When mnn-launch's stderr is a terminal it also sets MNN_PROGRESS=bar
(unless set), so that rank 0 draws a progress bar although its own stderr is the
launcher's pipe. SIGINT and SIGTERM are forwarded to the launcher, so all ranks
stop, and mnn-launch exits with the job's exit status (128 + N after signal N).

Check. ``--check`` reports versions, the launcher, whether the hosts resolve and
the threads per rank, and starts a hello job: two ranks on this machine, or with
``--hosts``/``--hostfile`` one rank on each host (two on a lone host), saying per
host whether its rank answered, only started (MPI could not connect it), or
never started (ssh, the host name, or Python missing there at the same path).

Tests build commands with :func:`build_command`, a pure function of the parsed
arguments, the environment and the detected :class:`MpiSetup`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mnn.distributed.reporting import PROGRESS_ENV

__all__ = [
    "THREAD_VARIABLES",
    "PROGRESS_ENV",
    "MpiSetup",
    "LaunchPlan",
    "build_parser",
    "parse_args",
    "parse_hostfile",
    "parse_hosts",
    "mpi_family",
    "detect_mpi",
    "find_mpiexec",
    "build_command",
    "build_hello_command",
    "format_plan",
    "run_plan",
    "run_check",
    "main",
]

#: Thread-count variables of OpenMP, OpenBLAS and MKL, set per rank unless the user set them.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Open MPI hands remote ranks only the variables named with -x; these make a
# virtual environment and its libraries visible there.
_OPENMPI_FORWARDED = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", PROGRESS_ENV)
_FAMILY_NAMES = {"mpich": "MPICH", "openmpi": "Open MPI"}
_HOST_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HOSTFILE_FORMATS = "expected 'host', 'host:slots' (MPICH) or 'host slots=N' (Open MPI)"
_HELLO_TIMEOUT_S = 60.0
_VERSION_TIMEOUT_S = 10.0
# A hello rank says "started" before MPI is initialised, with the rank the launcher
# gave it, so that a host whose rank ran but never joined the job (blocked ports)
# is told apart from a host where nothing ran (ssh, name); initialisation waits
# for every rank. Output of the ranks may reach us interleaved within a line,
# hence the ';' after each line.
_HELLO_CODE = ("import os, socket\n"
               "launcher_rank = next((os.environ[name] for name in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK', "
               "'SLURM_PROCID') if name in os.environ), '?')\n"
               "print(f'started rank={launcher_rank} host={socket.gethostname()};', flush=True)\n"
               "from mpi4py import MPI\nworld = MPI.COMM_WORLD\n"
               "print(f'hello rank={world.Get_rank()} size={world.Get_size()} host={socket.gethostname()};', "
               "flush=True)\n")
# Run in a separate interpreter so that loading libmpi here never initialises MPI
# in the calling process (mnn-bench and the tests import this module).
_LIBRARY_QUERY = ("import json, mpi4py\nmpi4py.rc.initialize = False\nmpi4py.rc.finalize = False\n"
                  "from mpi4py import MPI\n"
                  "print(json.dumps({'mpi4py': mpi4py.__version__, 'library': MPI.Get_library_version(), "
                  "'config': {k: str(v) for k, v in mpi4py.get_config().items()}}))\n")


@dataclass(frozen=True)
class MpiSetup:
    """What :func:`detect_mpi` found.

    ``family`` is ``"mpich"`` (MPICH, Intel MPI, MVAPICH: hydra-style mpiexec),
    ``"openmpi"`` or None (mpi4py missing, or an MPI we do not recognise), and
    ``mpiexec_family`` that of ``mpiexec`` when it was forced with ``--mpiexec``;
    ``library`` the first line of ``MPI.Get_library_version()`` or why there is
    none; ``mpiexec`` the launcher to use, or None. ``error`` is set when an
    ``mpiexec`` exists but belongs to another MPI than mpi4py: running with it
    would be wrong, running without MPI would hide the problem, so mnn-launch
    refuses. ``warnings`` are printed on stderr.
    """

    mpi4py_version: str | None
    library: str
    family: str | None
    mpiexec: str | None
    error: str | None = None
    warnings: tuple[str, ...] = ()
    mpiexec_family: str | None = None

    @property
    def launcher_family(self) -> str | None:
        """The family whose command-line syntax ``mpiexec`` speaks (that of the library unless forced)."""
        return self.mpiexec_family or self.family


@dataclass(frozen=True)
class LaunchPlan:
    """The exact command line and the variables mnn-launch adds to the environment."""

    argv: list[str]
    env_updates: dict[str, str]
    launcher: str            # "srun", "mpiexec" or "none" (one process without MPI)
    ranks: int
    threads_per_rank: int
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    """The mnn-launch argument parser; the command follows ``--``."""
    parser = argparse.ArgumentParser(
        prog="mnn-launch",
        usage="mnn-launch [-n N] [--hostfile FILE | --hosts H:S,...] [--dry-run] [--check] -- COMMAND ...",
        description="Start COMMAND on N MPI ranks: srun inside SLURM, else the mpiexec that matches mpi4py, "
                    "with one BLAS/OpenMP thread per core per rank.",
        # The module docstring, without its title and its note for developers, is the help.
        epilog=__doc__.split("\n\n", 1)[1].split("\n\nTests build")[0].replace("::\n", ":\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--ranks", type=_positive_int, metavar="N",
                        help="number of ranks (default: SLURM_NTASKS inside SLURM, else the total slots "
                             "of --hosts/--hostfile; required otherwise)")
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("--hostfile", metavar="FILE", help="hosts, one per line: 'host:slots' or 'host slots=N'")
    hosts.add_argument("--hosts", metavar="H:S,...", help="comma-separated hosts with slots, e.g. a:2,b:2")
    parser.add_argument("--mpiexec", metavar="PATH",
                        help="use this mpiexec (also inside SLURM) instead of the one found for mpi4py")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command and the environment variables it sets, run nothing")
    parser.add_argument("--check", action="store_true",
                        help="preflight: versions, hosts, a hello (one rank per host of --hosts/--hostfile, "
                             "else 2 ranks here), threads; 'OK ...' or 'FIX: ...' per line, exit status 1 if "
                             "anything needs fixing")
    parser.add_argument("command", nargs="*", help="the program to run on every rank and its arguments")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse mnn-launch's arguments; everything after the first ``--`` is the command.

    ``hosts`` in the result is a list of ``(host, slots)`` read from ``--hosts``
    or ``--hostfile``, or None. Raises ValueError for a bad host list.
    """
    argv = list(argv)
    command = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command and command:
        parser.error(f"unexpected {' '.join(args.command)!r} before '--'")
    args.command = args.command + command
    if args.hostfile is not None:
        args.hosts = parse_hostfile(args.hostfile)
    elif args.hosts is not None:
        args.hosts = parse_hosts(args.hosts)
    return args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_hostfile(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read a hostfile in MPICH (``host:slots``) or Open MPI (``host slots=N``) format.

    Returns ``[(host, slots), ...]`` in order of first appearance; repeated hosts
    add up their slots. Raises ValueError naming the file and line otherwise.
    """
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"hostfile {path} cannot be read: {error.strerror or error}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].split()
        if tokens:
            entries.append(_parse_host_entry(tokens, f"hostfile {path} line {number}: {line.strip()!r}"))
    if not entries:
        raise ValueError(f"hostfile {path} lists no hosts: {_HOSTFILE_FORMATS}, one per line")
    return _merge_hosts(entries)


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """Parse ``--hosts a:2,b:2`` (a host without ``:slots`` has 1 slot)."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError(f"--hosts {text!r} lists no hosts: expected e.g. a:2,b:2")
    entries = []
    for item in items:
        if " " in item or not item:
            raise ValueError(f"--hosts {text!r}: bad item {item!r}: expected 'host' or 'host:slots'")
        entries.append(_parse_host_entry([item], f"--hosts {text!r}: item {item!r}"))
    return _merge_hosts(entries)


def _parse_host_entry(tokens: list[str], where: str) -> tuple[str, int]:
    match = re.fullmatch(rf"({_HOST_PATTERN})(?::(\d+))?", tokens[0])
    if match is None:
        raise ValueError(f"{where}: {_HOSTFILE_FORMATS}")
    host, slots = match.group(1), match.group(2)
    for token in tokens[1:]:
        option = re.fullmatch(r"(max_slots|slots)=(\d+)", token)
        if option is None:
            raise ValueError(f"{where}: unknown {token!r}; {_HOSTFILE_FORMATS}")
        if option.group(1) == "slots":
            if slots is not None:
                raise ValueError(f"{where}: gives the slots twice; {_HOSTFILE_FORMATS}")
            slots = option.group(2)
    slots = 1 if slots is None else int(slots)
    if slots < 1:
        raise ValueError(f"{where}: slots must be at least 1, got {slots}")
    return host, slots


def _merge_hosts(entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
    merged: dict[str, int] = {}
    for host, slots in entries:
        merged[host] = merged.get(host, 0) + slots
    return list(merged.items())


# ------------------------------------------------------------------ finding MPI
def mpi_family(text: str) -> str | None:
    """``"mpich"``, ``"openmpi"`` or None from a library version or ``mpiexec --version`` text."""
    lowered = text.lower()
    if any(mark in lowered for mark in ("open mpi", "openrte", "open-rte", "prrte")):
        return "openmpi"
    if any(mark in lowered for mark in ("mpich", "hydra", "intel(r) mpi", "mvapich")):
        return "mpich"
    return None


def _family_name(family: str | None) -> str:
    return _FAMILY_NAMES.get(family, "an unrecognised MPI")


def _mpiexec_family(path: str) -> str | None:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=_VERSION_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return mpi_family(result.stdout + result.stderr)


def _query_library(env: Mapping[str, str]) -> dict | str:
    """mpi4py's version, the MPI library version text and mpi4py's build config, or why not."""
    if "mpi4py.MPI" in sys.modules:
        import mpi4py
        from mpi4py import MPI
        return {"mpi4py": mpi4py.__version__, "library": MPI.Get_library_version(),
                "config": {key: str(value) for key, value in mpi4py.get_config().items()}}
    try:
        result = subprocess.run([sys.executable, "-c", _LIBRARY_QUERY], capture_output=True, text=True,
                                timeout=60, env={**env, "PYTHONWARNINGS": "ignore"})
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"querying mpi4py failed: {error}"
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"mpi4py is not importable ({last_line})"
    return json.loads(result.stdout.strip().splitlines()[-1])


def detect_mpi(env: Mapping[str, str] | None = None, python_dir: str | os.PathLike | None = None,
               mpiexec: str | None = None) -> MpiSetup:
    """Find mpi4py's MPI library and the ``mpiexec`` that belongs to it.

    ``env`` supplies PATH (default ``os.environ``); ``python_dir`` is where to look
    first (default: the folder of ``sys.executable``); ``mpiexec`` forces a
    launcher (a mismatch is then only a warning). Never raises.
    """
    env = os.environ if env is None else env
    python_dir = Path(sys.executable).parent if python_dir is None else Path(python_dir)
    search_path = env.get("PATH", "")
    on_path = shutil.which("mpiexec", path=search_path)
    library = _query_library(env)
    if isinstance(library, str):
        found = shutil.which(mpiexec, path=search_path) if mpiexec else None
        return MpiSetup(None, library, None, found)
    first_line = (library["library"].strip().splitlines() or ["unknown"])[0]
    version = " ".join(first_line.split())
    family = mpi_family(library["library"])
    setup = {"mpi4py_version": library["mpi4py"], "library": version, "family": family}
    warnings = []

    if mpiexec is not None:
        chosen = shutil.which(mpiexec, path=search_path)
        if chosen is None:
            return MpiSetup(**setup, mpiexec=None, error=f"--mpiexec {mpiexec}: no such executable")
        chosen_family = _mpiexec_family(chosen)
        if family and chosen_family and chosen_family != family:
            warnings.append(f"--mpiexec {chosen} is {_family_name(chosen_family)} but mpi4py uses {version}: "
                            "expect every rank to report rank 0 of 1")
        return MpiSetup(**setup, mpiexec=chosen, warnings=tuple(warnings), mpiexec_family=chosen_family)

    candidates = [python_dir / "mpiexec"]
    mpicc = library["config"].get("mpicc")
    if mpicc:
        candidates.append(Path(mpicc).parent / "mpiexec")
    candidates = [str(path) for path in candidates if path.is_file() and os.access(path, os.X_OK)]
    if on_path:
        candidates.append(on_path)
    families = {}
    chosen = None
    for candidate in dict.fromkeys(candidates):
        families[candidate] = _mpiexec_family(candidate)
        if family is None or families[candidate] is None or families[candidate] == family:
            chosen = candidate
            break

    if on_path and chosen and os.path.realpath(on_path) != os.path.realpath(chosen):
        path_family = families.get(on_path) or _mpiexec_family(on_path)
        if family and path_family and path_family != family:
            warnings.append(
                f"the mpiexec first on PATH, {on_path}, is {_family_name(path_family)}, but mpi4py is linked "
                f"against {version}: ranks it starts would each believe they are rank 0 of 1. mnn-launch uses "
                f"{chosen}; to run mpiexec by hand call that one, or put {Path(chosen).parent} first on PATH "
                "(e.g. activate the virtual environment)")
    if chosen is None and candidates:
        wrong = ", ".join(f"{path} ({_family_name(families[path])})" for path in families)
        return MpiSetup(**setup, mpiexec=None, warnings=tuple(warnings), error=(
            f"mpi4py is linked against {version}, but the only mpiexec found belongs to another MPI: {wrong}. "
            f"Install the matching one (pip install mpich for the PyPI wheel), rebuild mpi4py against the MPI "
            f"you have (pip install --no-binary mpi4py --force-reinstall mpi4py), or pass --mpiexec PATH"))
    return MpiSetup(**setup, mpiexec=chosen, warnings=tuple(warnings))


def find_mpiexec(env: Mapping[str, str] | None = None) -> str:
    """Path of the ``mpiexec`` matching mpi4py (see :func:`detect_mpi`); RuntimeError if there is none."""
    setup = detect_mpi(env)
    if setup.mpiexec is None:
        raise RuntimeError(setup.error or f"no mpiexec found beside {sys.executable} or on PATH "
                                          f"({setup.library}); pip install 'mnn[mpi]'")
    return setup.mpiexec


# ------------------------------------------------------------------ the command
def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _local_host_names() -> set[str]:
    hostname = socket.gethostname()
    return {"localhost", "127.0.0.1", "::1", hostname, hostname.split(".")[0]}


def _place_ranks(hosts: list[tuple[str, int]], ranks: int) -> dict[str, int]:
    """Ranks per host when hosts are filled slot by slot, wrapping around if ranks exceed the slots."""
    placed = {host: 0 for host, _ in hosts}
    remaining = ranks
    while remaining > 0:
        for host, slots in hosts:
            taken = min(slots, remaining)
            placed[host] += taken
            remaining -= taken
    return placed


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").split("(")[0]  # SLURM writes repeated counts as "2(x3)"
    return int(value) if value.isdigit() and int(value) > 0 else None


def build_command(args: argparse.Namespace, env: Mapping[str, str], mpi: MpiSetup,
                  cores: int | None = None, terminal: bool = False) -> LaunchPlan:
    """The command line and environment additions for ``args`` (from :func:`parse_args`).

    ``terminal`` says that mnn-launch's stderr is a terminal: the plan then sets
    ``MNN_PROGRESS=bar`` unless ``env`` has it. Pure apart from ``cores``
    (default: the cores this process may use). Raises ValueError when the
    arguments do not make a job.
    """
    cores = _usable_cores() if cores is None else cores
    command = list(args.command)
    if not command:
        raise ValueError("no command to run: put it after '--', e.g. mnn-launch -n 2 -- mnn-train")
    hosts = args.hosts
    warnings = list(mpi.warnings)
    job_id = env.get("SLURM_JOB_ID")

    if job_id and not args.mpiexec:
        if hosts is not None:
            raise ValueError(f"--hosts/--hostfile do not apply inside SLURM job {job_id}: srun places ranks on "
                             "the allocation's nodes. Leave them out, or pass --mpiexec to use mpiexec instead")
        ranks = args.ranks or _env_int(env, "SLURM_NTASKS") or _env_int(env, "SLURM_NPROCS")
        if ranks is None:
            raise ValueError(f"inside SLURM job {job_id} SLURM_NTASKS is not set: pass -n N")
        threads = _env_int(env, "SLURM_CPUS_PER_TASK")
        if threads is None:
            nodes = _env_int(env, "SLURM_JOB_NUM_NODES") or _env_int(env, "SLURM_NNODES") or 1
            per_node = -(-ranks // nodes)
            threads = max(1, (_env_int(env, "SLURM_CPUS_ON_NODE") or cores) // per_node)
        env_updates = _env_updates(env, threads, terminal)
        return LaunchPlan(["srun", "-n", str(ranks), *command], env_updates, "srun", ranks, threads, warnings)

    if mpi.mpiexec is None:
        if mpi.error:
            raise ValueError(mpi.error)
        ignored = f"; -n {args.ranks} is ignored" if args.ranks and args.ranks > 1 else ""
        warnings.append(f"no MPI ({mpi.library or 'no mpiexec found'}): running one process without MPI{ignored}")
        return LaunchPlan(command, _env_updates(env, cores, terminal), "none", 1, cores, warnings)
    if hosts is not None:
        ranks = args.ranks or sum(slots for _, slots in hosts)
        placement = _place_ranks(hosts, ranks)
        local_ranks = sum(count for host, count in placement.items() if host in _local_host_names())
        busiest = max(placement.values())
    else:
        if args.ranks is None:
            raise ValueError("how many ranks? pass -n N (or --hosts/--hostfile, whose slots give the count)")
        ranks = local_ranks = busiest = args.ranks
    threads = max(1, cores // busiest)
    env_updates = _env_updates(env, threads, terminal)

    if local_ranks > cores:
        warnings.append(f"{local_ranks} ranks on the {cores} cores of this host: ranks will share cores "
                        "(slower; results are the same)")
    argv = [mpi.mpiexec, "-n", str(ranks)]
    host_list = ",".join(f"{host}:{slots}" for host, slots in hosts) if hosts else None
    if mpi.launcher_family == "openmpi":
        if host_list:
            argv += ["--host", host_list]
        # Open MPI refuses to start more ranks than slots (cores, locally) unless told.
        slots = sum(slots for _, slots in hosts) if hosts else cores
        if ranks > slots:
            argv.append("--oversubscribe")
        exported = [name for name in (*THREAD_VARIABLES, *_OPENMPI_FORWARDED) if name in env or name in env_updates]
        for name in exported:
            argv += ["-x", name]
    else:
        if host_list:
            if mpi.launcher_family is None:
                raise ValueError(f"{mpi.mpiexec} is not MPICH or Open MPI: mnn-launch does not know how to pass "
                                 "it hosts; run it by hand")
            argv += ["-hosts", host_list]
        if mpi.launcher_family == "mpich":
            for name, value in env_updates.items():
                argv += ["-genv", name, value]
    return LaunchPlan(argv + command, env_updates, "mpiexec", ranks, threads, warnings)


def _env_updates(env: Mapping[str, str], threads: int, terminal: bool) -> dict[str, str]:
    """The thread counts, and the progress bar on a terminal, wherever the user has not chosen."""
    updates = {name: str(threads) for name in THREAD_VARIABLES if name not in env}
    if terminal and PROGRESS_ENV not in env:
        updates[PROGRESS_ENV] = "bar"
    return updates


def format_plan(plan: LaunchPlan) -> str:
    """What ``--dry-run`` prints: the variables set and the exact command, shell-quoted."""
    settings = " ".join(f"{name}={value}" for name, value in plan.env_updates.items())
    return (f"environment: {settings or '(nothing: the thread variables are already set)'}\n"
            f"command: {shlex.join(plan.argv)}")


# ------------------------------------------------------------------ running
def run_plan(plan: LaunchPlan, env: Mapping[str, str]) -> int:
    """Run the plan in the foreground, forwarding SIGINT and SIGTERM; return the exit status."""
    try:
        process = subprocess.Popen(plan.argv, env={**env, **plan.env_updates})
    except OSError as error:
        raise ValueError(f"cannot start {plan.argv[0]}: {error.strerror or error}") from None

    def forward(signum, frame):
        # Ctrl-C in a terminal already reached the launcher, which shares our
        # process group; a second SIGINT would make hydra abort without cleanup.
        if signum == signal.SIGINT and _in_terminal_foreground():
            return
        if process.poll() is None:
            process.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return returncode if returncode >= 0 else 128 - returncode


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


def _run_with_timeout(argv: list[str], env: Mapping[str, str], timeout: float) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr); on timeout the launcher is stopped."""
    process = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        # SIGTERM first: the launcher then stops its ranks; SIGKILL would orphan them.
        process.terminate()
        try:
            out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        return None, out, err


# ------------------------------------------------------------------ preflight
def run_check(args: argparse.Namespace, env: Mapping[str, str], mpi: MpiSetup,
              cores: int | None = None) -> tuple[list[str], bool]:
    """Preflight lines, each ``"OK ..."`` or ``"FIX: ..."``, and whether all are OK."""
    import numpy

    cores = _usable_cores() if cores is None else cores
    in_slurm = bool(env.get("SLURM_JOB_ID")) and not args.mpiexec
    lines = [f"OK Python {platform.python_version()} ({sys.executable})", f"OK NumPy {numpy.__version__}"]
    if mpi.mpi4py_version is None:
        lines.append(f"FIX: {mpi.library}: pip install 'mnn[mpi]' (mpi4py with MPICH from PyPI), or on a cluster "
                     "pip install mpi4py built against the cluster's MPI")
    else:
        lines.append(f"OK mpi4py {mpi.mpi4py_version}")
        library_line = f"MPI library: {mpi.library}"
        lines.append(f"OK {library_line}" if mpi.family else
                     f"FIX: {library_line} is neither MPICH nor Open MPI; mnn-launch may build a wrong command")
    if in_slurm:
        srun = shutil.which("srun", path=env.get("PATH", ""))
        lines.append(f"OK launcher: {srun} (SLURM job {env['SLURM_JOB_ID']})" if srun else
                     f"FIX: SLURM_JOB_ID={env['SLURM_JOB_ID']} is set but srun is not on PATH: load SLURM's "
                     "module, or unset SLURM_JOB_ID outside an allocation")
    elif mpi.mpiexec:
        lines.append(f"OK mpiexec: {mpi.mpiexec} ({_family_name(mpi.launcher_family)})")
    elif mpi.mpi4py_version is not None:
        lines.append(f"FIX: {mpi.error or 'no mpiexec beside ' + sys.executable + ' or on PATH'}")
    lines += [f"FIX: {warning}" for warning in mpi.warnings]

    if args.hosts:
        lines += _check_hosts(args.hosts)
    hello_ready = mpi.mpi4py_version is not None and (in_slurm or mpi.mpiexec is not None)
    if hello_ready:
        lines += _check_hello(args, env, mpi, cores)
    lines.append(_check_threads(args, env, mpi, cores))
    return lines, all(line.startswith("OK") for line in lines)


def _hello_hosts(hosts: list[tuple[str, int]] | None) -> list[tuple[str, int]] | None:
    """One slot on each host, so that every host must start a rank; two on a lone host, so that ranks talk."""
    if not hosts:
        return None
    return [(host, 1) for host, _ in hosts] if len(hosts) > 1 else [(hosts[0][0], 2)]


def build_hello_command(args: argparse.Namespace, env: Mapping[str, str], mpi: MpiSetup,
                        cores: int | None = None) -> LaunchPlan:
    """The plan of ``--check``'s hello job: :func:`build_command` for a short Python program.

    With hosts in ``args`` it runs one rank on each of them (two on a single
    host), so that ``-n`` is the number of hosts whatever their slots; without
    hosts, two ranks here. Rank ``i`` lands on the ``i``-th host: MPICH and
    Open MPI fill hosts in the order given.
    """
    hosts = _hello_hosts(args.hosts)
    ranks = 2 if hosts is None else sum(slots for _, slots in hosts)
    hello_args = argparse.Namespace(**{**vars(args), "hosts": hosts, "ranks": ranks,
                                       "command": [sys.executable, "-c", _HELLO_CODE]})
    return build_command(hello_args, env, mpi, cores)


def _check_hello(args, env, mpi, cores) -> list[str]:
    try:
        plan = build_hello_command(args, env, mpi, cores)
    except ValueError as error:
        return [f"FIX: hello cannot start: {error}"]
    name = f"{plan.ranks}-rank hello"
    try:
        returncode, out, err = _run_with_timeout(plan.argv, {**env, **plan.env_updates}, _HELLO_TIMEOUT_S)
    except OSError as error:
        return [f"FIX: {name} cannot start {plan.argv[0]}: {error.strerror or error}"]
    started = dict(re.findall(r"started rank=(\d+) host=([^\s;]+);", out))
    answers = sorted(re.findall(r"hello rank=(\d+) size=(\d+) host=([^\s;]+);", out),
                     key=lambda answer: int(answer[0]))
    hellos = {rank: host for rank, size, host in answers if size == str(plan.ranks)}
    shown = ", ".join(f"rank {rank} on {host}" for rank, _, host in answers)
    if answers and all(size == "1" for _, size, _ in answers):
        return [f"FIX: {name}: every process says it is rank 0 of 1 ({shown}): {plan.argv[0]} belongs to "
                f"another MPI than mpi4py ({mpi.library}). Use the launcher of that MPI (pass --mpiexec) or "
                "rebuild mpi4py against this one"]
    hosts = _hello_hosts(args.hosts)
    lines = []
    if returncode is None:
        # With hosts, the lines per host below say what to check.
        advice = "" if hosts else ": check that no firewall blocks MPI's ports on this machine"
        lines.append(f"FIX: {name} did not finish in {_HELLO_TIMEOUT_S:.0f} s "
                     f"({shown or 'no rank answered'}){advice}")
    elif returncode != 0:
        last = (err.strip().splitlines() or ["no error output"])[-1]
        lines.append(f"FIX: {name} failed with exit status {returncode}: {last}")
    elif len(hellos) != plan.ranks or len(answers) != plan.ranks:
        lines.append(f"FIX: {name} gave unexpected output: {out.strip()[:300]!r}")
    if hosts is None:
        return lines or [f"OK {name}: {shown}"]
    # The launcher stops the whole job at the first host it cannot reach, before
    # ranks elsewhere ran; its error lines (ssh's) name that host. Names of this
    # machine are left out: hydra puts them in every line, and no ssh goes there.
    local_names = _local_host_names()
    launcher_errors = {host: [line.strip() for line in err.splitlines()
                              if re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w.-])", line)]
                       for host, _ in hosts if host not in local_names}
    blamed = [host for host, errors in launcher_errors.items() if errors]
    host_ranks, first_rank = {}, 0
    for host, slots in hosts:
        host_ranks[host] = [str(rank) for rank in range(first_rank, first_rank + slots)]
        first_rank += slots
    silent = [host for host, ranks in host_ranks.items() if not any(rank in started for rank in ranks)]
    for host, ranks in host_ranks.items():
        which = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
        if all(rank in hellos for rank in ranks):
            lines.append(f"OK host {host}: {which} answered from {', '.join(sorted({hellos[r] for r in ranks}))}")
        elif host not in silent:
            seen = ", ".join(sorted({started[rank] for rank in ranks if rank in started}))
            if silent:  # MPI's start waits for every rank
                lines.append(f"FIX: {which} started on {host} ({seen}) but could not join the job while no rank "
                             f"started on {', '.join(silent)}; run --check again once that is fixed")
            else:
                lines.append(f"FIX: {which} started on {host} ({seen}) but never joined the job: check that no "
                             "firewall blocks MPI's ports between the hosts and that every host resolves the "
                             "others' names to addresses they can reach")
        elif blamed and host not in blamed:
            lines.append(f"FIX: no rank started on {host}: the launcher stopped at {', '.join(blamed)} first; "
                         "run --check again once that is fixed")
        else:
            cause = f" ({launcher_errors[host][0]})" if launcher_errors.get(host) else ""
            lines.append(f"FIX: no rank started on {host}{cause}: check ssh/hostname: 'ssh {host} true' must work "
                         f"without a password from here, {host} must name the machine you mean, and "
                         f"{sys.executable} must exist there with mpi4py")
    return lines


def _check_hosts(hosts: list[tuple[str, int]]) -> list[str]:
    resolved, lines = [], []
    for host, _ in hosts:
        try:
            address = socket.getaddrinfo(host, None)[0][4][0]
        except (socket.gaierror, UnicodeError) as error:
            lines.append(f"FIX: host {host!r} does not resolve ({error}): correct the name, or add it to DNS "
                         "or /etc/hosts")
        else:
            resolved.append(f"{host} ({address})")
    if resolved:
        lines.insert(0, f"OK hosts resolve: {', '.join(resolved)}")
    return lines


def _check_threads(args, env, mpi, cores) -> str:
    check_args = argparse.Namespace(**{**vars(args), "command": ["true"],
                                       "ranks": args.ranks or (None if args.hosts else 2)})
    try:
        plan = build_command(check_args, env, mpi, cores)
    except ValueError as error:
        return f"FIX: threads per rank: {error}"
    settings = []
    for name in THREAD_VARIABLES:
        if name in plan.env_updates:
            settings.append(f"{name}={plan.env_updates[name]}")
            continue
        value = env[name]
        if not value.isdigit() or int(value) < 1:
            return f"FIX: {name}={value!r} is not a positive integer: unset it and mnn-launch sets it"
        # threads_per_rank is the most that fits the busiest host; more oversubscribes it.
        if int(value) > plan.threads_per_rank:
            return (f"FIX: {name}={value} with {plan.ranks} ranks oversubscribes this host's {cores} cores: "
                    f"unset it (mnn-launch then sets {plan.threads_per_rank}) or lower it")
        settings.append(f"{name}={value} (yours)")
    return f"OK threads per rank: {', '.join(settings)} for {plan.ranks} rank(s) on {cores} core(s) per host"


# ------------------------------------------------------------------ entry point
def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run mnn-launch with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ if env is None else env)
    try:
        args = parse_args(argv)
        mpi = detect_mpi(env, mpiexec=args.mpiexec)
        if args.check:
            lines, ok = run_check(args, env, mpi)
            print("\n".join(lines), flush=True)
            return 0 if ok else 1
        plan = build_command(args, env, mpi, terminal=sys.stderr.isatty())
        for warning in plan.warnings:
            print(f"mnn-launch: warning: {warning}", file=sys.stderr, flush=True)
        if args.dry_run:
            print(format_plan(plan), flush=True)
            return 0
        return run_plan(plan, env)
    except ValueError as error:
        print(f"mnn-launch: error: {error}", file=sys.stderr, flush=True)
        return 2
