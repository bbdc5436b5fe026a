"""mnn-launch ``--check``: preflight lines, each ``OK ...`` or ``FIX: ...``, on versions,
the launcher, the hosts (do they resolve, do the other machines answer ssh), a hello job
across them and the threads per rank.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import socket
import sys
from dataclasses import replace
from typing import Mapping

from mnn.distributed.launch.hosts import local_host_names, remote_hosts, usable_cores
from mnn.distributed.launch.mpi import MpiSetup, family_name
from mnn.distributed.environment import DISTRIBUTION, THREAD_VARIABLES, install_hint
from mnn.distributed.launch.plan import LaunchPlan, build_command
from mnn.distributed.launch.process import run_with_timeout
from mnn.distributed.launch.remote import check_remote_hosts, find_ssh
from mnn.distributed.launch.settings import LaunchSettings

__all__ = ["run_check", "build_hello_command"]

# A hello rank says "started" before MPI is initialised, with the rank the launcher
# gave it, so that a host whose rank ran but never joined the job (blocked ports)
# is told apart from a host where nothing ran (ssh, name); initialisation waits
# for every rank. Output of the ranks may reach us interleaved within a line,
# hence the ';' after each line. It also says which NumPy and mnn it finds, as mnn-train's
# ranks compare them (mnn.distributed.training.ranks): a host with other versions is refused.
_HELLO_CODE = ("import importlib.metadata, os, socket\n"
               "launcher_rank = next((os.environ[name] for name in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK', "
               "'SLURM_PROCID') if name in os.environ), '?')\n"
               "print(f'started rank={launcher_rank} host={socket.gethostname()};', flush=True)\n"
               "try:\n    import numpy\n    numpy_version = numpy.__version__\nexcept ImportError:\n"
               "    numpy_version = 'none'\n"
               f"try:\n    mnn_version = importlib.metadata.version({DISTRIBUTION!r})\n"
               "except importlib.metadata.PackageNotFoundError:\n    mnn_version = 'none'\n"
               "print(f'versions rank={launcher_rank} numpy={numpy_version} mnn={mnn_version};', flush=True)\n"
               "from mpi4py import MPI\nworld = MPI.COMM_WORLD\n"
               "print(f'hello rank={world.Get_rank()} size={world.Get_size()} host={socket.gethostname()};', "
               "flush=True)\n")


def run_check(settings: LaunchSettings, env: Mapping[str, str], mpi: MpiSetup,
              cores: int | None = None) -> tuple[list[str], bool]:
    """Preflight lines, each ``"OK ..."`` or ``"FIX: ..."``, and whether all are OK: for the
    hosts, launcher, ssh and start timeout of ``settings`` (its command and ranks are --check's own)."""
    import numpy

    cores = usable_cores() if cores is None else cores
    in_slurm = bool(env.get("SLURM_JOB_ID")) and not settings.mpiexec
    lines = [f"OK Python {platform.python_version()} ({sys.executable})", f"OK NumPy {numpy.__version__}"]
    if mpi.mpi4py_version is None:
        lines.append(f"FIX: {mpi.library}: {install_hint('mpi')} (mpi4py with MPICH from PyPI), or on a cluster "
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
        lines.append(f"OK mpiexec: {mpi.mpiexec} ({family_name(mpi.launcher_family)})")
    elif mpi.mpi4py_version is not None:
        lines.append(f"FIX: {mpi.error or 'no mpiexec beside ' + sys.executable + ' or on PATH'}")
    lines += [f"FIX: {warning}" for warning in mpi.warnings]

    if settings.hosts:
        lines += _check_hosts(settings.hosts)
    ssh_lines, answered = ([], set()) if in_slurm else _check_ssh(settings, env)
    lines += ssh_lines
    # A host that does not answer ssh would only keep the hello waiting until its time is up.
    hello_ready = mpi.mpi4py_version is not None and (in_slurm or mpi.mpiexec is not None) \
        and all(line.startswith("OK") for line in ssh_lines)
    if hello_ready:
        lines += _check_hello(settings, env, mpi, cores, answered)
    lines.append(_check_threads(settings, env, mpi, cores))
    return lines, all(line.startswith("OK") for line in lines)


def _hello_hosts(hosts: list[tuple[str, int]] | None) -> list[tuple[str, int]] | None:
    """One slot on each host, so that every host must start a rank; two on a lone host, so that ranks talk."""
    if not hosts:
        return None
    return [(host, 1) for host, _ in hosts] if len(hosts) > 1 else [(hosts[0][0], 2)]


def build_hello_command(settings: LaunchSettings, env: Mapping[str, str], mpi: MpiSetup,
                        cores: int | None = None, as_root: bool | None = None) -> LaunchPlan:
    """The plan of ``--check``'s hello job: :func:`build_command` for a short Python program.

    With hosts in ``settings`` it runs one rank on each of them (two on a single
    host), so that ``-n`` is the number of hosts whatever their slots; without
    hosts, two ranks here. Rank ``i`` lands on the ``i``-th host: MPICH and
    Open MPI fill hosts in the order given.
    """
    hosts = _hello_hosts(settings.hosts)
    ranks = 2 if hosts is None else sum(slots for _, slots in hosts)
    hello = replace(settings, hosts=hosts, ranks=ranks, command=(sys.executable, "-c", _HELLO_CODE))
    return build_command(hello, env, mpi, cores, as_root=as_root)


def _check_hello(settings: LaunchSettings, env: Mapping[str, str], mpi: MpiSetup, cores: int,
                 answered: set[str]) -> list[str]:
    try:
        plan = build_hello_command(settings, env, mpi, cores)
    except ValueError as error:
        return [f"FIX: hello cannot start: {error}"]
    name = f"{plan.ranks}-rank hello"
    try:
        returncode, out, err = run_with_timeout(plan.argv, {**env, **plan.env_updates, **plan.launcher_env},
                                                settings.start_timeout, plan.family)
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
    hosts = _hello_hosts(settings.hosts)
    lines = []
    if returncode is None:
        # With hosts, the lines per host below say what to check.
        advice = "" if hosts else ": check that no firewall blocks MPI's ports on this machine"
        lines.append(f"FIX: {name} did not finish in {settings.start_timeout:g} s "
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
    local_names = local_host_names()
    launcher_errors = {host: [line.strip() for line in err.splitlines()
                              if re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w.-])", line)]
                       for host, _ in hosts if host not in local_names}
    blamed = [host for host, errors in launcher_errors.items() if errors]
    host_ranks, first_rank = {}, 0
    for host, slots in hosts:
        host_ranks[host] = [str(rank) for rank in range(first_rank, first_rank + slots)]
        first_rank += slots
    lines += _version_differences(out, host_ranks)
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
            if host in answered:
                lines.append(f"FIX: no rank started on {host}{cause} although it answers ssh: check that "
                             f"{sys.executable} and its MPI exist there at the same path, and that no firewall "
                             f"blocks connections from {host} to this machine")
            else:
                lines.append(f"FIX: no rank started on {host}{cause}: check ssh/hostname: 'ssh {host} true' must "
                             f"work without a password from here, {host} must name the machine you mean, and "
                             f"{sys.executable} must exist there with mpi4py")
    return lines


def _version_differences(out: str, host_ranks: dict[str, list[str]]) -> list[str]:
    """A line for each host whose hello ranks found other versions of NumPy or mnn than this
    machine has (hosts whose ranks did not say are left to the lines about starting)."""
    import numpy

    here = {"numpy": numpy.__version__, "mnn": _installed_version(DISTRIBUTION)}
    found = {rank: {"numpy": numpy_version, "mnn": mnn_version}
             for rank, numpy_version, mnn_version in re.findall(r"versions rank=(\d+) numpy=(\S+) mnn=([^\s;]+);", out)}
    lines = []
    for host, ranks in host_ranks.items():
        theirs = next((found[rank] for rank in ranks if rank in found), here)
        differences = [f"{name} {theirs[name]} (this machine: {here[name]})" for name in here
                       if theirs[name] != here[name]]
        if differences:
            lines.append(f"FIX: host {host} runs {', '.join(differences)}: mnn-train refuses ranks that run other "
                         "versions than rank 0; install the same versions on every host")
    return lines


def _installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _check_ssh(settings: LaunchSettings, env: Mapping[str, str]) -> tuple[list[str], set[str]]:
    """Whether every host other than this machine answers ``ssh HOST true`` in time: the
    lines, and the hosts that answered."""
    remote = remote_hosts(settings.hosts)
    if not remote:
        return [], set()
    try:
        ssh = find_ssh(settings.ssh, env)
        answers = check_remote_hosts(remote, ssh, settings.start_timeout, env)
    except ValueError as error:
        return [f"FIX: {error}"], set()
    failed = {host: problem for host, problem in answers.items() if problem}
    answered = [host for host in answers if host not in failed]
    lines = [f"OK ssh answers from {', '.join(answered)}"] if answered else []
    lines += [f"FIX: host {host} does not answer '{ssh} {host} true' ({problem}): check that it is up and its name "
              f"right, and that 'ssh {host} true' runs from here without asking for a password"
              for host, problem in failed.items()]
    if failed:
        lines.append("FIX: hello not started: it would wait for the hosts above; run --check again once they answer")
    return lines, set(answered)


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


def _check_threads(settings: LaunchSettings, env: Mapping[str, str], mpi: MpiSetup, cores: int) -> str:
    job = replace(settings, command=("true",), ranks=settings.ranks or (None if settings.hosts else 2))
    try:
        plan = build_command(job, env, mpi, cores)
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

