"""Tests for mnn-launch: command construction as pure functions, then real launches under mpiexec."""

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnn.distributed.environment import PROGRESS_ENV, THREAD_VARIABLES
from mnn.distributed.launch import (
    LaunchSettings,
    MpiSetup,
    build_command,
    build_hello_command,
    detect_mpi,
    find_mpiexec,
    format_plan,
    parse_hostfile,
    parse_hosts,
    process_tree,
)
from mnn.distributed.launch.plan import as_rank
from mnn.scripts.launch import launch_settings, main, parse_args
from processes import LAUNCH, MPIEXEC, exit_status, mpiexec_family, needs_mpiexec

MPICH = MpiSetup("4.1", "MPICH Version: 5.0.2", "mpich", "/opt/mpich/bin/mpiexec")
OPENMPI = MpiSetup("4.1", "Open MPI v5.0.3", "openmpi", "/opt/openmpi/bin/mpiexec")
NO_MPI = MpiSetup(None, "mpi4py is not importable (No module named 'mpi4py')", None, None)
COMMAND = ["mnn-train", "--epochs", "2"]
RANK = as_rank(COMMAND)  # as every rank starts it: through the script that sets torchrun's variables
BIN = Path(sys.executable).parent
HAVE_MPI = MPIEXEC.exists()
needs_mpi = needs_mpiexec
# The MPI whose mpiexec these tests start: make test runs this file under MPICH and under Open MPI.
FAMILY = mpiexec_family() if HAVE_MPI else None
# Banners of an mpiexec of each family, and of one of the other family than ours.
VERSION_BANNERS = {"mpich": "HYDRA build details:\n    Version: 4.2.0",
                   "openmpi": "mpiexec (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/"}
OTHER_FAMILY = "mpich" if FAMILY == "openmpi" else "openmpi"
FAMILY_NAMES = {"mpich": "MPICH", "openmpi": "Open MPI"}


def without_thread_variables(env):
    """``env`` as a user who set no thread counts and no progress style would have it (make test sets them)."""
    return {name: value for name, value in env.items() if name not in (*THREAD_VARIABLES, PROGRESS_ENV)}


def settings_of(argv):
    """The LaunchSettings of mnn-launch's command line ``argv``."""
    return launch_settings(parse_args(argv))


def plan_for(argv, env=None, mpi=MPICH, cores=8, terminal=False, as_root=False):
    return build_command(settings_of(argv), {} if env is None else env, mpi, cores=cores, terminal=terminal,
                         as_root=as_root)


def launcher_command():
    script = BIN / "mnn-launch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mnn.scripts.launch"]


# ------------------------------------------------------------------ hosts
def test_hostfile_mpich_format(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode1:2\n\nnode2:4   # the big one\nnode3\nnode1:1\n")
    assert parse_hostfile(hostfile) == [("node1", 3), ("node2", 4), ("node3", 1)]


def test_hostfile_openmpi_format(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=2\nnode2.example.org slots=4 max_slots=8\n  # comment only\n10.0.0.7\n")
    assert parse_hostfile(hostfile) == [("node1", 2), ("node2.example.org", 4), ("10.0.0.7", 1)]


@pytest.mark.parametrize("line, problem", [
    ("node1:two", "expected 'host', 'host:slots' \\(MPICH\\) or 'host slots=N' \\(Open MPI\\)"),
    ("node1 slots=0", "slots must be at least 1, got 0"),
    ("node1:2 slots=3", "gives the slots twice"),
    ("node1 cores=4", "unknown 'cores=4'"),
    ("-node1", "expected 'host'"),
    ("node1:", "expected 'host'"),
])
def test_bad_hostfile_line_is_a_clear_error(tmp_path, line, problem):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"good:1\n{line}\n")
    with pytest.raises(ValueError, match=f"hostfile {re.escape(str(hostfile))} line 2: .*{problem}"):
        parse_hostfile(hostfile)


def test_empty_or_missing_hostfile(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no hosts"):
        parse_hostfile(empty)
    with pytest.raises(ValueError, match="cannot be read"):
        parse_hostfile(tmp_path / "absent")


def test_a_hostfile_that_is_not_utf8_is_named_with_the_byte(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_bytes(b"node1:2\nn\xffode2:2\n")
    assert main(["--hostfile", str(hostfile), "--", "mnn-train"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"mnn-launch: error: hostfile {hostfile} is not UTF-8 text: byte 9 is 0xff (invalid start "
                     "byte); expected 'host', 'host:slots' (MPICH) or 'host slots=N' (Open MPI), one per line"]


def test_hosts_option():
    assert parse_hosts("a:2,b:2") == [("a", 2), ("b", 2)]
    assert parse_hosts("a, b:3") == [("a", 1), ("b", 3)]
    with pytest.raises(ValueError, match=r"--hosts 'a:2,,b': bad item ''"):
        parse_hosts("a:2,,b")
    with pytest.raises(ValueError, match="slots must be at least 1"):
        parse_hosts("a:0")


# ------------------------------------------------------------------ commands
def test_local_mpich_command():
    plan = plan_for(["-n", "2", "--", *COMMAND])
    assert plan.launcher == "mpiexec" and plan.ranks == 2 and plan.threads_per_rank == 4
    assert plan.env_updates == {name: "4" for name in THREAD_VARIABLES}
    assert plan.argv == ["/opt/mpich/bin/mpiexec", "-n", "2", "-genv", "OMP_NUM_THREADS", "4",
                         "-genv", "OPENBLAS_NUM_THREADS", "4", "-genv", "MKL_NUM_THREADS", "4", *as_rank(COMMAND)]
    assert plan.warnings == []


def test_local_openmpi_command_exports_environment():
    plan = plan_for(["-n", "2", "--", *COMMAND], env={"PATH": "/usr/bin", "VIRTUAL_ENV": "/venv"}, mpi=OPENMPI)
    assert plan.argv == ["/opt/openmpi/bin/mpiexec", "-n", "2", "--bind-to", "none",
                         "-x", "OMP_NUM_THREADS", "-x", "OPENBLAS_NUM_THREADS", "-x", "MKL_NUM_THREADS",
                         "-x", "PATH", "-x", "VIRTUAL_ENV", *as_rank(COMMAND)]


def test_more_ranks_than_cores_warns():
    plan = plan_for(["-n", "6", "--", *COMMAND], cores=4)
    assert plan.threads_per_rank == 1
    assert any("6 ranks on the 4 cores of this host" in warning for warning in plan.warnings)
    assert "--oversubscribe" not in plan.argv
    assert "--oversubscribe" in plan_for(["-n", "6", "--", *COMMAND], mpi=OPENMPI, cores=4).argv


@pytest.mark.parametrize("content", ["a:2\nb:2\n", "a slots=2\nb slots=2\n"], ids=["mpich", "openmpi"])
def test_hostfile_commands(tmp_path, content):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    plan = plan_for(["--hostfile", str(hostfile), "--", *COMMAND])
    assert plan.ranks == 4 and plan.threads_per_rank == 4
    assert plan.argv[:5] == ["/opt/mpich/bin/mpiexec", "-n", "4", "-hosts", "a:2,b:2"]
    plan = plan_for(["--hostfile", str(hostfile), "--", *COMMAND], mpi=OPENMPI)
    assert plan.argv[:5] == ["/opt/openmpi/bin/mpiexec", "-n", "4", "--host", "a:2,b:2"]
    assert plan.warnings == []


def test_hosts_command_and_explicit_rank_count():
    plan = plan_for(["-n", "3", "--hosts", "a:2,b:2", "--", *COMMAND], cores=6)
    assert plan.argv[:5] == ["/opt/mpich/bin/mpiexec", "-n", "3", "-hosts", "a:2,b:2"]
    assert plan.threads_per_rank == 3  # a gets 2 of the 3 ranks: 6 cores // 2
    plan = plan_for(["-n", "6", "--hosts", "a:2,b:2", "--", *COMMAND], mpi=OPENMPI)
    assert "--oversubscribe" in plan.argv


def test_localhost_in_hosts_counts_toward_oversubscription():
    plan = plan_for(["--hosts", "localhost:4", "--", *COMMAND], cores=2)
    assert any("4 ranks on the 2 cores of this host" in warning for warning in plan.warnings)


def test_slurm_uses_srun_with_allocation_task_count():
    env = {"SLURM_JOB_ID": "123", "SLURM_NTASKS": "6", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "16"}
    plan = plan_for(["--", *COMMAND], env=env)
    assert plan.launcher == "srun"
    assert plan.argv == ["srun", "-n", "6", *as_rank(COMMAND)]
    assert plan.threads_per_rank == 5 and plan.env_updates["OMP_NUM_THREADS"] == "5"  # 16 cpus // 3 per node
    assert plan_for(["-n", "2", "--", *COMMAND], env=env).argv == ["srun", "-n", "2", *as_rank(COMMAND)]
    cpus_per_task = plan_for(["--", *COMMAND], env={**env, "SLURM_CPUS_PER_TASK": "4"})
    assert cpus_per_task.env_updates["MKL_NUM_THREADS"] == "4"


def test_slurm_errors_and_mpiexec_override():
    with pytest.raises(ValueError, match="SLURM_NTASKS is not set: pass -n N"):
        plan_for(["--", *COMMAND], env={"SLURM_JOB_ID": "7"})
    with pytest.raises(ValueError, match="do not apply inside SLURM job 7"):
        plan_for(["--hosts", "a:2", "--", *COMMAND], env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})
    plan = plan_for(["-n", "2", "--mpiexec", "mpiexec", "--", *COMMAND], env={"SLURM_JOB_ID": "7"})
    assert plan.launcher == "mpiexec"


def test_user_thread_settings_are_kept():
    env = {"OMP_NUM_THREADS": "3"}
    plan = plan_for(["-n", "2", "--", *COMMAND], env=env)
    assert plan.env_updates == {"OPENBLAS_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert "OMP_NUM_THREADS" not in plan.argv
    openmpi = plan_for(["-n", "2", "--", *COMMAND], env=env, mpi=OPENMPI)
    assert openmpi.argv.count("-x") == 3 and "OMP_NUM_THREADS" in openmpi.argv  # forwarded with its value


def test_without_mpi_one_process_runs_and_says_so():
    plan = plan_for(["-n", "4", "--", *COMMAND], mpi=NO_MPI, cores=8)
    assert plan.launcher == "none" and plan.argv == COMMAND and plan.ranks == 1
    assert plan.env_updates["OMP_NUM_THREADS"] == "8"
    assert any("running one process without MPI; -n 4 is ignored" in warning for warning in plan.warnings)


def test_the_settings_are_one_frozen_value_made_from_the_command_line(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a:2\nb slots=2\n")
    settings = settings_of(["--hostfile", str(hostfile), "--ssh", "rsh", "--start-timeout", "5", "--", *COMMAND])
    assert settings == LaunchSettings(command=tuple(COMMAND), hosts=(("a", 2), ("b", 2)), ssh="rsh", start_timeout=5.0)
    with pytest.raises(AttributeError):
        settings.ranks = 3  # frozen: a plan cannot change what it was asked for
    # What the plan reads and nothing else: a parsed command line is not accepted in its place.
    with pytest.raises(TypeError, match="settings: expected a LaunchSettings, got Namespace"):
        build_command(parse_args(["-n", "2", "--", *COMMAND]), {}, MPICH, cores=8)
    with pytest.raises(TypeError, match="command: expected a list of strings"):
        LaunchSettings(command="mnn-train --epochs 2")
    with pytest.raises(ValueError, match="ranks: expected a positive integer or None, got 0"):
        LaunchSettings(command=("true",), ranks=0)
    with pytest.raises(ValueError, match="start_timeout: expected a positive number of seconds, got nan"):
        LaunchSettings(command=("true",), start_timeout=float("nan"))


def test_usage_errors():
    with pytest.raises(ValueError, match="no command to run"):
        plan_for(["-n", "2"])
    with pytest.raises(ValueError, match="pass -n N"):
        plan_for(["--", *COMMAND])
    with pytest.raises(SystemExit):
        parse_args(["-n", "0", "--", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--hosts", "a:1", "--hostfile", "f", "--", "x"])
    for seconds in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parse_args(["--start-timeout", seconds, "--", "x"])
    mismatch = MpiSetup("4.1", "MPICH", "mpich", None, error="the only mpiexec found belongs to another MPI")
    with pytest.raises(ValueError, match="belongs to another MPI"):
        plan_for(["-n", "2", "--", *COMMAND], mpi=mismatch)


def test_format_plan_and_dry_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    code = main(["-n", "2", "--dry-run", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                env={**without_thread_variables(os.environ), "MKL_NUM_THREADS": "1"})
    out = capsys.readouterr().out
    assert code == 0 and not marker.exists()
    environment, command, *notes = out.strip().splitlines()
    assert environment.startswith("environment: OMP_NUM_THREADS=") and "MKL" not in environment
    assert PROGRESS_ENV not in environment  # captured stderr is no terminal
    assert command.startswith("command: ") and f"{sys.executable} -c " in command
    as_root_with_openmpi = os.geteuid() == 0 and FAMILY == "openmpi"
    assert notes == (["note: running as root: --allow-run-as-root, or Open MPI refuses to start"]
                     if as_root_with_openmpi else [])
    plan = plan_for(["-n", "1", "--", "echo", "a b"], env={name: "1" for name in THREAD_VARIABLES})
    assert format_plan(plan) == ("environment: (nothing: the thread variables are already set)\n"
                                 f"command: /opt/mpich/bin/mpiexec -n 1 {shlex.join(as_rank(['echo', 'a b']))}")


def test_open_mpi_as_root_is_allowed_and_dry_run_says_so():
    """Open MPI refuses to start as root (containers, CI) unless told; MPICH needs nothing."""
    openmpi = plan_for(["-n", "2", "--", *COMMAND], mpi=OPENMPI, as_root=True)
    assert openmpi.argv[:4] == ["/opt/openmpi/bin/mpiexec", "-n", "2", "--allow-run-as-root"]
    shown = format_plan(openmpi).splitlines()
    assert shown[1].startswith("command: /opt/openmpi/bin/mpiexec -n 2 --allow-run-as-root --bind-to none -x ")
    assert shown[2:] == ["note: running as root: --allow-run-as-root, or Open MPI refuses to start"]
    assert "--allow-run-as-root" not in plan_for(["-n", "2", "--", *COMMAND], mpi=OPENMPI).argv
    mpich = plan_for(["-n", "2", "--", *COMMAND], as_root=True)
    assert "--allow-run-as-root" not in mpich.argv and mpich.notes == []
    hello = build_hello_command(settings_of(["--check"]), {}, OPENMPI, cores=8, as_root=True)
    assert "--allow-run-as-root" in hello.argv


def test_remote_starts_are_bounded_in_the_launchers_environment():
    """With hosts other than this machine, the launcher's ssh gets BatchMode and ConnectTimeout (from
    --start-timeout), and --ssh names the remote shell: in the launcher's environment, not the ranks'."""
    argv = ["--hosts", "localhost:1,node2:1", "--start-timeout", "7.5", "--", *COMMAND]
    bounded = "-o BatchMode=yes -o ConnectTimeout=8"
    mpich = plan_for(argv)
    assert mpich.launcher_env == {"HYDRA_LAUNCHER_EXTRA_ARGS": bounded}
    assert "HYDRA_LAUNCHER_EXTRA_ARGS" not in mpich.argv and "HYDRA_LAUNCHER_EXTRA_ARGS" not in mpich.env_updates
    assert format_plan(mpich).splitlines()[1] == f"launcher environment: HYDRA_LAUNCHER_EXTRA_ARGS='{bounded}'"
    # Open MPI starts every daemon from here: through the ssh that mnn-launch checked, with these options.
    openmpi = plan_for(argv, mpi=OPENMPI)
    assert openmpi.launcher_env == {"PRTE_MCA_plm_ssh_args": bounded, "PRTE_MCA_plm_ssh_no_tree_spawn": "1"}
    assert "PRTE_MCA_plm_ssh_args" not in openmpi.argv
    with_ssh = ["--hosts", "node2:2", "--ssh", "/opt/bin/myssh", "--", *COMMAND]
    assert plan_for(with_ssh).launcher_env == {"HYDRA_LAUNCHER_EXTRA_ARGS": "-o BatchMode=yes -o ConnectTimeout=120",
                                              "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": "/opt/bin/myssh"}
    assert plan_for(with_ssh, mpi=OPENMPI).launcher_env["PRTE_MCA_plm_ssh_agent"] == "/opt/bin/myssh"
    # The user's own settings win; this machine alone needs none.
    assert plan_for(argv, env={"HYDRA_LAUNCHER_EXTRA_ARGS": "-p 2222"}).launcher_env == {}
    assert plan_for(["--hosts", "localhost:2", "--", *COMMAND]).launcher_env == {}
    assert plan_for(["-n", "2", "--", *COMMAND], mpi=OPENMPI).launcher_env == {}


def test_terminal_adds_progress_bar_to_the_plan():
    """On a terminal the plan sets MNN_PROGRESS=bar like the thread variables: shown by --dry-run, passed on."""
    mpich = plan_for(["-n", "2", "--", *COMMAND], terminal=True)
    assert mpich.env_updates[PROGRESS_ENV] == "bar"
    assert ["-genv", PROGRESS_ENV, "bar"] == mpich.argv[-len(RANK) - 3:-len(RANK)]
    assert f"{PROGRESS_ENV}=bar" in format_plan(mpich).splitlines()[0]
    openmpi = plan_for(["-n", "2", "--", *COMMAND], env={"PATH": "/usr/bin"}, mpi=OPENMPI, terminal=True)
    assert openmpi.env_updates[PROGRESS_ENV] == "bar"
    assert openmpi.argv[-len(RANK) - 2:-len(RANK)] == ["-x", PROGRESS_ENV]
    slurm = plan_for(["--", *COMMAND], env={"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2"}, terminal=True)
    assert slurm.env_updates[PROGRESS_ENV] == "bar"  # srun passes the whole environment on


def test_user_progress_choice_is_kept_and_no_terminal_adds_nothing():
    chosen = {PROGRESS_ENV: "lines"}
    mpich = plan_for(["-n", "2", "--", *COMMAND], env=chosen, terminal=True)
    assert PROGRESS_ENV not in mpich.env_updates and PROGRESS_ENV not in mpich.argv
    openmpi = plan_for(["-n", "2", "--", *COMMAND], env=chosen, mpi=OPENMPI, terminal=True)
    assert PROGRESS_ENV not in openmpi.env_updates
    assert openmpi.argv[-len(RANK) - 2:-len(RANK)] == ["-x", PROGRESS_ENV]  # forwarded with its value
    for mpi in (MPICH, OPENMPI, NO_MPI):
        plan = plan_for(["-n", "2", "--", *COMMAND], mpi=mpi)
        assert PROGRESS_ENV not in plan.env_updates and PROGRESS_ENV not in plan.argv
        assert "MNN_PROGRESS" not in format_plan(plan)


def test_dry_run_on_a_terminal_shows_the_progress_bar(tmp_path):
    """mnn-launch --dry-run with its stderr on a pseudo-terminal: the plan it prints sets MNN_PROGRESS=bar."""
    pty = pytest.importorskip("pty")
    argv = [*launcher_command(), "-n", "2", "--dry-run", "--", "true"]
    env = without_thread_variables(os.environ)
    pid, terminal = pty.fork()
    if pid == 0:
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output = b""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:  # mnn-launch exited and closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    environment = next(line for line in text.splitlines() if line.startswith("environment: "))
    assert f"{PROGRESS_ENV}=bar" in environment.split()
    command = next(line for line in text.splitlines() if line.startswith("command: "))
    if "-genv" in command:  # the MPICH of mpi4py's wheel
        assert f"-genv {PROGRESS_ENV} bar" in command


def test_dry_run_whose_reader_went_away_is_no_error():
    """``mnn-launch --dry-run ... | head -0``: a BrokenPipeError traceback and exit status 1."""
    process = subprocess.Popen([*launcher_command(), "-n", "2", "--dry-run", "--", *COMMAND],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before mnn-launch has printed anything
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_main_reports_usage_errors(capsys):
    assert main(["-n", "2"]) == 2
    assert "mnn-launch: error: no command to run" in capsys.readouterr().err


def test_help_explains_formats_and_examples(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for expected in ("host slots=N", "host:slots", "mnn-launch -n 4 mnn-train", "--dry-run", "--check",
                     "SLURM_NTASKS", "OMP_NUM_THREADS", "Ctrl-C" if "Ctrl-C" in text else "SIGINT"):
        assert expected in text
    # a short usage and the examples first, the explanations after the options
    usage, examples = text.split("\n\n")[0], text.split("options:")[0]
    for option in ("-np", "-H", "--nproc-per-node", "--mpiexec", "--ssh", "--max-restarts", "--min-ranks"):
        assert option in usage
    assert "examples:" in examples and "Which launcher" not in examples


# ------------------------------------------------------------------ the --check hello
def hello_plan(argv, mpi=MPICH):
    return build_hello_command(settings_of([*argv, "--check"]), {}, mpi, cores=8, as_root=False)


@pytest.mark.parametrize("mpi, host_option", [(MPICH, "-hosts"), (OPENMPI, "--host")], ids=["mpich", "openmpi"])
def test_hello_runs_one_rank_on_each_host(tmp_path, mpi, host_option):
    """The hello must reach every host, whatever its slots: filling slots in order would put both ranks on node1."""
    plan = hello_plan(["--hosts", "node1:16,node2:16"], mpi)
    assert plan.argv[1:5] == ["-n", "2", host_option, "node1:1,node2:1"]
    assert plan.argv[-3:-1] == [sys.executable, "-c"] and "--oversubscribe" not in plan.argv
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=4\nnode2 slots=4\nnode3 slots=4\n")
    plan = hello_plan(["-n", "12", "--hostfile", str(hostfile)], mpi)  # -n is for the job, not the hello
    assert plan.argv[1:5] == ["-n", "3", host_option, "node1:1,node2:1,node3:1"]
    lone = hello_plan(["--hosts", "node1:16"], mpi)  # two ranks, so that they must talk
    assert lone.argv[1:5] == ["-n", "2", host_option, "node1:2"]
    local = hello_plan([], mpi)
    assert local.argv[1:3] == ["-n", "2"] and host_option not in local.argv


def write_scripted_launcher(path, script):
    """An MPICH-like mpiexec that records its arguments and replays ``script`` instead of starting ranks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        "if sys.argv[1:] == ['--version']:\n    print('HYDRA build details:\\n    Version: 5.0.2'); sys.exit(0)\n"
        f"open({str(path) + '.args'!r}, 'w').write(json.dumps(sys.argv[1:]))\n" + script)
    path.chmod(0o755)
    return path


# Hosts that stand for other machines. The tests reach no other machine, and look up no name
# elsewhere either: these loopback addresses need no DNS, and the launchers (and mnn-launch)
# count every one but 127.0.0.1 as another host, to be reached with the remote shell, for
# which a stand-in that contacts nothing is given (--ssh).
OTHER_HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
# A name that cannot resolve and is never looked up: Python refuses a label of 64 characters.
UNRESOLVABLE = "no-such-host-" + "x" * 51 + ".example"


def write_remote_shell(directory, answers=True):
    """A stand-in for ssh that reaches no machine: asked ``HOST true`` (as mnn-launch asks) it
    answers at once if ``answers``; anything else (a launcher starting its daemon) it never
    answers, as a host that is down. Returns its path and a marker on the command line of the
    process that hangs."""
    marker = f"mnn-test-remote-shell-{os.getpid()}-{time.monotonic_ns()}"
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "remote-shell"
    script.write_text("#!/bin/sh\n"
                      'for last in "$@"; do :; done\n'
                      f'if [ "$last" = true ] && [ {int(answers)} = 1 ]; then exit 0; fi\n'
                      f'exec {sys.executable} -c "import time; time.sleep(1e6)" {marker}\n')
    script.chmod(0o755)
    return script, marker


def marked_processes(marker, wait=0.0):
    """Live processes whose command line or environment holds ``marker``, after waiting up to
    ``wait`` seconds for there to be none."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                command = (proc / "cmdline").read_bytes()
                if marker.encode() in command + (proc / "environ").read_bytes():
                    found.append(f"{proc.name}: {command[:120]!r}")
            except OSError:
                continue
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def check_lines(launcher, hosts, ssh):
    result = subprocess.run([*launcher_command(), "--mpiexec", str(launcher), "--hosts", hosts, "--ssh", str(ssh),
                             "--check"], capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout.splitlines()


@needs_mpi
def test_check_reports_each_host(tmp_path):
    """No remote hosts exist where the tests run, so a scripted launcher stands in for ranks on three
    hosts: in the first job every rank answers; in the second, ssh cannot reach the second host, so the
    launcher gives up after the first host's rank started and before the third's did."""
    one, two, three = OTHER_HOSTS
    hosts = f"{one}:8,{two}:8,{three}:8"
    ssh, _ = write_remote_shell(tmp_path)
    answering = write_scripted_launcher(tmp_path / "answering" / "mpiexec", (
        "for rank, host in enumerate(['n1', 'n2', 'n3']):\n"
        "    print(f'started rank={rank} host={host};hello rank={rank} size=3 host={host};')\n"))
    code, lines = check_lines(answering, hosts, ssh)
    assert json.loads(Path(f"{answering}.args").read_text())[:4] == [
        "-n", "3", "-hosts", f"{one}:1,{two}:1,{three}:1"]
    assert f"OK ssh answers from {one}, {two}, {three}" in lines
    assert f"OK host {one}: rank 0 answered from n1" in lines
    assert f"OK host {three}: rank 2 answered from n3" in lines
    stopping = write_scripted_launcher(tmp_path / "stopping" / "mpiexec", (
        "print('started rank=0 host=n1;', flush=True)\n"
        f"print('ssh: connect to host {two} port 22: Connection refused', file=sys.stderr)\n"
        "sys.exit(255)\n"))
    code, lines = check_lines(stopping, hosts, ssh)
    fixes = [line for line in lines if line.startswith("FIX: ")]
    assert code == 1
    assert any(line.startswith("FIX: 3-rank hello failed with exit status 255") for line in fixes), lines
    assert any(line.startswith(f"FIX: rank 0 started on {one} (n1) but could not join the job while no "
                               f"rank started on {two}, {three}") for line in fixes), lines
    assert any(line.startswith(f"FIX: no rank started on {two} (ssh: connect to host {two} port 22: Connection "
                               "refused)") for line in fixes), lines
    assert any(line.startswith(f"FIX: no rank started on {three}: the launcher stopped at {two} first")
               for line in fixes), lines


# ------------------------------------------------------------------ finding mpiexec
def write_fake_mpiexec(directory, banner):
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "mpiexec"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in banner.splitlines()))
    fake.chmod(0o755)
    return fake


@needs_mpi
def test_foreign_mpiexec_first_on_path_is_reported(tmp_path):
    fake = write_fake_mpiexec(tmp_path / OTHER_FAMILY / "bin", VERSION_BANNERS[OTHER_FAMILY])
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    setup = detect_mpi(env)
    assert setup.family == FAMILY and setup.mpiexec == str(BIN / "mpiexec")
    assert len(setup.warnings) == 1
    warning = setup.warnings[0]
    assert str(fake) in warning and f"is {FAMILY_NAMES[OTHER_FAMILY]}, but" in warning and "rank 0 of 1" in warning
    # With nothing beside Python, the foreign one is all there is: refuse rather than start N rank-0 copies.
    lonely = detect_mpi(env, python_dir=tmp_path / "empty")
    assert lonely.mpiexec is None and "belongs to another MPI" in lonely.error


@needs_mpi
def test_same_family_mpiexec_on_path_is_not_reported(tmp_path):
    fake = write_fake_mpiexec(tmp_path / "bin", VERSION_BANNERS[FAMILY])
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    assert detect_mpi(env).warnings == ()
    assert detect_mpi(env, python_dir=tmp_path / "empty").mpiexec == str(fake)


@needs_mpi
def test_find_mpiexec_matches_mpi4py():
    assert find_mpiexec() == str(BIN / "mpiexec")


def test_no_mpi4py_runs_one_process(tmp_path):
    blocker = tmp_path / "blocked" / "mpi4py"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('mpi4py blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*launcher_command(), "-n", "2", "--", sys.executable, "-c", "print('alone')"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alone"]
    assert "mpi4py blocked for this test" in result.stderr and "running one process without MPI" in result.stderr


# ------------------------------------------------------------------ real launches
@needs_mpi
def test_real_launch_prints_both_ranks():
    code = "from mpi4py import MPI; print(f'rank {MPI.COMM_WORLD.Get_rank()};', flush=True)"
    result = subprocess.run([*launcher_command(), "-n", "2", "--", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(re.findall(r"rank (\d+);", result.stdout)) == ["0", "1"]


@needs_mpi
def test_failing_child_fails_the_launch():
    result = subprocess.run([*launcher_command(), "-n", "2", "--", sys.executable, "-c", "import sys; sys.exit(3)"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


@needs_mpi
def test_real_check_passes():
    result = subprocess.run([*launcher_command(), "--check"], capture_output=True, text=True, timeout=180)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(line.startswith("OK ") for line in lines), lines
    assert any(re.match(r"OK 2-rank hello: rank 0 on \S+, rank 1 on \S+", line) for line in lines)
    assert any(line.startswith("OK threads per rank") for line in lines)


@needs_mpi
def test_real_check_with_two_names_of_this_machine():
    """No remote hosts exist where the tests run: localhost and this machine's name stand for two hosts
    (hydra starts both ranks here without ssh), and each must get one rank of the hello."""
    import ipaddress
    import socket
    hostname = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(hostname, None)}
    except OSError:
        pytest.skip(f"this machine's name {hostname!r} does not resolve")
    # Only a name that resolves to loopback is certain to start its rank here:
    # any other address could make the launcher try ssh to another machine.
    if not all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses):
        pytest.skip(f"this machine's name {hostname!r} resolves to {sorted(addresses)}, not only loopback")
    result = subprocess.run([*launcher_command(), "--hosts", f"localhost:4,{hostname}:4", "--check"],
                            capture_output=True, text=True, timeout=180)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(re.fullmatch(r"OK host localhost: rank 0 answered from \S+", line) for line in lines), lines
    assert any(re.fullmatch(rf"OK host {re.escape(hostname)}: rank 1 answered from \S+", line) for line in lines)


@needs_mpi
def test_check_catches_a_foreign_mpiexec_and_bad_hosts(tmp_path):
    # A launcher of "another MPI": it starts each copy as a singleton, so every rank is rank 0 of 1.
    fake = tmp_path / "bin" / "mpiexec"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        f"if sys.argv[1:] == ['--version']:\n    print({VERSION_BANNERS[OTHER_FAMILY]!r}); sys.exit(0)\n"
        "args = sys.argv[1:]\nranks = int(args[args.index('-n') + 1])\n"
        "command = args[args.index('-c') - 1:]\n"
        "sys.exit(max(subprocess.run(command).returncode for _ in range(ranks)))\n")
    fake.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "999"}
    ssh, _ = write_remote_shell(tmp_path)
    hosts = f"localhost:2,{UNRESOLVABLE}:2"
    result = subprocess.run([*launcher_command(), "--mpiexec", str(fake), "--hosts", hosts, "--ssh", str(ssh),
                             "--check"], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    fixes = [line for line in result.stdout.splitlines() if line.startswith("FIX: ")]
    assert any(f"is {FAMILY_NAMES[OTHER_FAMILY]} but mpi4py uses {FAMILY_NAMES[FAMILY]}" in line
               for line in fixes), result.stdout
    assert any("every process says it is rank 0 of 1" in line for line in fixes), result.stdout
    assert any(f"{UNRESOLVABLE!r} does not resolve" in line for line in fixes), result.stdout
    assert any("OMP_NUM_THREADS=999" in line for line in fixes), result.stdout


def start_sleeping_job(tmp_path, **popen_options):
    """mnn-launch -n 2 running ranks that record their pid and sleep."""
    code = ("import os, sys, time; from mpi4py import MPI; "
            "open(os.path.join(sys.argv[1], f'rank{MPI.COMM_WORLD.Get_rank()}.pid'), 'w').write(str(os.getpid())); "
            "time.sleep(120)")
    return [*launcher_command(), "-n", "2", "--", sys.executable, "-c", code, str(tmp_path)]


def wait_for_pids(tmp_path, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [path.read_text() for path in sorted(tmp_path.glob("rank*.pid"))]
        if len(pids) == 2 and all(pids):
            return [int(pid) for pid in pids]
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


def assert_gone(pids, timeout=30):
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]]
        time.sleep(0.1)
    for pid in alive:  # do not leave processes behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"ranks {alive} survived"


@needs_mpi
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="watches ranks through /proc")
def test_sigterm_is_forwarded_to_all_ranks(tmp_path):
    process = subprocess.Popen(start_sleeping_job(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pids = wait_for_pids(tmp_path)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert_gone(pids)


@needs_mpi
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="watches ranks through /proc")
def test_ctrl_c_in_a_terminal_stops_all_ranks(tmp_path):
    pty = pytest.importorskip("pty")
    argv = start_sleeping_job(tmp_path)
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own with the pseudo-terminal as its terminal
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    output = b""
    try:
        ranks = wait_for_pids(tmp_path)
        os.write(terminal, b"\x03")  # the terminal turns this into SIGINT for the foreground group
        deadline = time.monotonic() + 60
        finished, status = 0, 0
        while not finished and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    output += os.read(terminal, 4096)  # keep draining, so nobody blocks on a full terminal
                except OSError:  # every writer has closed the terminal
                    time.sleep(0.1)
            finished, status = os.waitpid(pid, os.WNOHANG)
        if not finished:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            pytest.fail(f"mnn-launch did not stop after Ctrl-C: {output.decode(errors='replace')}")
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) != 0
    assert_gone(ranks)


# ------------------------------------------------------------------ faults: no hang, no orphan
def without_root_permission(env):
    """``env`` without Open MPI's variables that allow root (make test sets them for its own mpiexec calls)."""
    return {name: value for name, value in env.items()
            if name not in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")}


@needs_mpi
@pytest.mark.skipif(os.geteuid() != 0 or FAMILY != "openmpi", reason="Open MPI's refusal of root, as root")
def test_mnn_launch_runs_open_mpi_as_root():
    """In a container or CI job root is the only user: the job and --check run without OMPI_ALLOW_RUN_AS_ROOT."""
    env = without_root_permission(os.environ)
    code = "from mpi4py import MPI; print(f'rank {MPI.COMM_WORLD.Get_rank()};', flush=True)"
    result = subprocess.run([*launcher_command(), "-n", "2", "--", sys.executable, "-c", code],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(re.findall(r"rank (\d+);", result.stdout)) == ["0", "1"]
    check = subprocess.run([*launcher_command(), "--check"], env=env, capture_output=True, text=True, timeout=180)
    assert check.returncode == 0, check.stdout + check.stderr
    assert any(re.match(r"OK 2-rank hello: rank 0 on \S+, rank 1 on \S+", line) for line in check.stdout.splitlines())


@needs_mpi
@pytest.mark.parametrize("silent_hosts", [1, 2], ids=["2-ranks", "3-ranks"])
@pytest.mark.slow
def test_a_host_that_does_not_answer_is_named_and_nothing_starts(tmp_path, silent_hosts):
    """Without the ssh check the launcher waits for such a host forever, printing nothing."""
    ssh, marker = write_remote_shell(tmp_path, answers=False)
    silent = OTHER_HOSTS[:silent_hosts]
    ran = tmp_path / "ran"
    started = time.monotonic()
    result = subprocess.run([*launcher_command(), "--hosts", ",".join(["localhost:1", *silent]), "--ssh", str(ssh),
                             "--start-timeout", "2", "--", sys.executable, "-c", f"open({str(ran)!r}, 'w')"],
                            capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnn-launch: error: the job was not started: "), lines
    for host in silent:
        assert f"{host}: no answer within 2 s" in lines[0]
    assert f"'ssh {silent[0]} true'" in lines[0]
    assert not ran.exists() and elapsed < 15
    assert marked_processes(marker, wait=5) == []


@needs_mpi
@pytest.mark.slow
def test_check_names_a_host_that_does_not_answer_and_leaves_nothing(tmp_path):
    ssh, marker = write_remote_shell(tmp_path, answers=False)
    host = OTHER_HOSTS[0]
    result = subprocess.run([*launcher_command(), "--hosts", f"localhost:1,{host}:1", "--ssh", str(ssh),
                             "--start-timeout", "2", "--check"], capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert any(line.startswith(f"FIX: host {host} does not answer '{ssh} {host} true' (no answer within 2 s)")
               for line in lines), lines
    assert any(line.startswith("FIX: hello not started") for line in lines), lines
    assert marked_processes(marker, wait=5) == []


@needs_mpi
@pytest.mark.slow
def test_check_stops_a_hello_that_hangs_and_leaves_nothing(tmp_path):
    """The host answers ssh, but the launcher's daemon there never starts: --check gives up after
    --start-timeout and stops everything the launcher started (hydra used to leave its ssh running)."""
    ssh, marker = write_remote_shell(tmp_path, answers=True)
    host = OTHER_HOSTS[0]
    env = {**os.environ, "MNN_TEST_MARK": marker}  # every process of the hello inherits it
    started = time.monotonic()
    result = subprocess.run([*launcher_command(), "--hosts", f"localhost:1,{host}:1", "--ssh", str(ssh),
                             "--start-timeout", "3", "--check"], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    lines = result.stdout.splitlines()
    assert result.returncode == 1
    assert f"OK ssh answers from {host}" in lines
    assert any(line.startswith("FIX: 2-rank hello did not finish in 3 s") for line in lines), lines
    assert any(line.startswith(f"FIX: no rank started on {host} although it answers ssh") for line in lines), lines
    assert elapsed < 30
    assert marked_processes(marker, wait=5) == []


@needs_mpi
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("ranks", [2, 3])
def test_sigkill_of_mnn_launch_stops_the_job(tmp_path, ranks):
    """No job outlives its launcher: mnn-launch SIGKILLed, the launcher and every rank go within seconds."""
    marker = f"mnn-test-job-{os.getpid()}-{time.monotonic_ns()}"
    code = ("import os, sys, time\n"
            "rank = next(os.environ[name] for name in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK') if name in os.environ)\n"
            "open(os.path.join(sys.argv[1], f'rank{rank}.pid'), 'w').write(str(os.getpid()))\n"
            "while True:\n    time.sleep(0.1)\n")
    process = subprocess.Popen([*launcher_command(), "-n", str(ranks), "--", sys.executable, "-c", code,
                                str(tmp_path)], env={**os.environ, "MNN_TEST_MARK": marker},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < ranks and time.monotonic() < deadline:
            time.sleep(0.1)
        job = process_tree(process.pid)
        assert len(list(tmp_path.glob("rank*.pid"))) == ranks and len(job) > ranks  # the launcher and the ranks
        process.kill()
        process.wait()
        left = marked_processes(marker, wait=10)
    finally:
        for pid in job if process.returncode is not None else ():
            try:
                os.kill(pid, signal.SIGKILL)  # do not leave processes behind, then fail
            except (ProcessLookupError, PermissionError):
                pass
    assert left == []


def test_after_an_interrupt_only_open_mpis_noise_is_dropped_from_its_stderr(capfd):
    """prterun's notice that a rank exited 130, and its complaint about a rank gone, follow
    mnn-train's one line after an interrupt: the copier of prterun's stderr drops them, however
    they are cut into reads, and keeps everything else."""
    from mnn.distributed.launch.launcher_output import start_output_copier, tell_interrupted, wait_for_copier
    rule = b"-" * 74
    notice = (rule + b"\nprterun detected that one or more processes exited with non-zero status,\nthus causing the "
              b"job to be terminated. The first process to do so was:\n\n   Process name: [prterun-vm-1@1,0]\n"
              b"   Exit code:    %d\n" + rule + b"\n")
    before = b"epoch 1/30 step 5/23 | loss 2.5960\n"
    after = (b"mnn-train: interrupted at epoch 1/30 step 6/23; continue with --resume\n"
             b"[vm:12435] PMIX ERROR: PMIX_ERR_UNREACH in file pmix_server.c at line 3146\n"
             b"[warn] Epoll MOD(4) on fd 20 failed. Old events were 6; read change was 2 (del); write change was 0 "
             b"(none); close change was 0 (none): Bad file descriptor\n"
             + notice % 130 + rule + b"\nAnother notice\n" + rule + b"\n" + notice % 2 + notice % 130
             + b"last words")
    read_fd, write_fd = os.pipe()
    stdout_read, stdout_write = os.pipe()
    copier = start_output_copier(stdout_read, read_fd, drop_noise=True)
    os.close(read_fd)
    os.close(stdout_read)
    os.write(stdout_write, b"the ranks' stdout\n")
    os.close(stdout_write)
    os.write(write_fd, before)
    time.sleep(0.2)
    tell_interrupted(copier)
    time.sleep(0.2)
    for start in range(0, len(after), 7):
        os.write(write_fd, after[start:start + 7])
    os.close(write_fd)
    wait_for_copier(copier)
    out, err = capfd.readouterr()
    assert out == "the ranks' stdout\n"
    assert err.encode() == (before + b"mnn-train: interrupted at epoch 1/30 step 6/23; continue with --resume\n"
                   + rule + b"\nAnother notice\n" + rule + b"\n" + notice % 2 + b"last words")


# ------------------------------------------------------------------ trial, round 3: odd input, one line each
@pytest.mark.parametrize("ranks", ["99999999999999999999", "1000001", "9" * 5000])
def test_a_rank_count_no_machine_runs_is_one_line(capsys, ranks):
    """-n beyond any job (and beyond Python's index size) was an OverflowError traceback from the
    start-up watch's list of rank hosts; thousands of digits echoed them all back."""
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main(["-n", ranks, "--dry-run", "--", "true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("mnn-launch: error: argument -n/-np/--ranks: expected at most 1,000,000 ranks, got ")
    assert len(err[-1]) < 200 and "Traceback" not in "\n".join(err)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_hostfile_with_no_end_is_refused_not_read_forever(tmp_path):
    """--hostfile /dev/zero read without bound: all the memory there was, then a MemoryError traceback."""
    with pytest.raises(ValueError, match=r"hostfile /dev/zero is larger than 16 MiB, which no hostfile is"):
        parse_hostfile("/dev/zero")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1:2\n" * 100_000)  # large, but a hostfile
    assert parse_hostfile(hostfile) == [("node1", 200_000)]


def test_a_remote_shell_killed_by_a_signal_is_named_by_the_signal(tmp_path):
    """A remote shell that died of a signal was reported as 'exit status -11'."""
    from mnn.distributed.launch.remote import check_remote_hosts
    shell = tmp_path / "remote-shell"
    shell.write_text("#!/bin/sh\nkill -SEGV $$\n")
    shell.chmod(0o755)
    answers = check_remote_hosts(["127.0.0.2"], str(shell), 30, os.environ)
    assert answers == {"127.0.0.2": "ssh was killed by signal 11 (SIGSEGV)"}


@needs_mpi
@pytest.mark.parametrize("closed", [0, 2], ids=["stdin", "stderr"])
def test_a_closed_stdin_or_stderr_does_not_stop_the_job(tmp_path, closed):
    """Started with `<&-` or `2>&-`: the job's pipes took the free numbers, so a closed stdin made
    the launcher read its own output (MPICH: SIGPIPE, exit 141; Open MPI: a hang), and a closed
    stderr left sys.stderr None (an AttributeError before anything started, exit 1, no word)."""
    code = ("import os, sys; from mpi4py import MPI; rank = MPI.COMM_WORLD.Get_rank(); "
            "print(f'rank {rank} says hello', flush=True); open(os.path.join(sys.argv[1], f'rank{rank}'), 'w').close()")
    result = subprocess.run([*launcher_command(), "-n", "2", "--", sys.executable, "-c", code, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                            preexec_fn=lambda: os.close(closed))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("says hello") == 2  # (hydra may interleave the two lines)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rank0", "rank1"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("option", ["--dry-run", "--check"])
def test_a_stdout_that_cannot_be_written_is_one_line(option):
    """--dry-run or --check into a full disk: an OSError traceback (only a gone reader was handled)."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([*launcher_command(), "-n", "2", option, "--", "true"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=180)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "mnn-launch: error: cannot write to stdout: No space left on device"
    assert "Traceback" not in result.stderr


# --- where mnn-launch's options end and the command begins -------------------------------------

@pytest.mark.parametrize("argv, ranks, command", [
    (["-n", "2", "mnn-train", "--config", "job.toml"], 2, ["mnn-train", "--config", "job.toml"]),
    (["-n", "2", "--dry-run", "python", "script.py", "-n", "3"], 2, ["python", "script.py", "-n", "3"]),
    (["-np", "3", "--", "mnn-train"], 3, ["mnn-train"]),
    (["--ranks=4", "--start-timeout", "5", "python", "s.py", "--", "x"], 4, ["python", "s.py", "--", "x"]),
    (["--nproc-per-node", "3", "mnn-train", "-n", "1"], 3, ["mnn-train", "-n", "1"]),
])
def test_the_command_begins_at_the_first_word_that_is_not_an_option_of_mnn_launch(argv, ranks, command):
    """As mpiexec, torchrun and horovodrun read theirs: the command's own options stay its own."""
    settings = settings_of(argv)
    assert (settings.ranks, list(settings.command)) == (ranks, command)


def test_mpirun_and_torchrun_host_options_are_accepted():
    assert settings_of(["-H", "a:2,b:2", "mnn-train"]).hosts == (("a", 2), ("b", 2))
    per_node = settings_of(["--hosts", "a:2,b:1", "--nproc-per-node", "4", "mnn-train"])
    assert (per_node.hosts, per_node.ranks) == ((("a", 4), ("b", 4)), None)


def test_ranks_given_twice_is_a_usage_error(capsys):
    assert exit_status(main, ["-n", "2", "--nproc-per-node", "2", "mnn-train"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


# --- torchrun's variables on every rank ------------------------------------------------------

def test_torchrun_variables_come_from_each_launchers_names():
    from mnn.distributed.launch.rank_variables import torchrun_variables
    wanted = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert torchrun_variables({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}) \
        == wanted
    assert torchrun_variables({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                               "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == wanted
    # srun: 2 tasks on each of the first two nodes, 3 on the third; this is the third
    assert torchrun_variables({"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1",
                               "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x2),3"}) == \
        {"RANK": "5", "WORLD_SIZE": "7", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3"}
    assert torchrun_variables({}) == {}


@needs_mpiexec
def test_every_rank_finds_torchruns_variables_and_keeps_its_process(tmp_path):
    code = ("import os, sys; from mnn.distributed.comm import get_communicator; c = get_communicator(); "
            "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(' '.join(os.environ[name] for name in "
            "('WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')) + f' {c.rank} ' + "
            "open(f'/proc/{os.getppid()}/cmdline', 'rb').read().replace(bytes(1), b' ').decode())")
    result = subprocess.run([*LAUNCH, "-n", "2", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        world, local, local_world, mpi_rank, *parent = (tmp_path / str(rank)).read_text().split()
        assert (world, local, local_world, mpi_rank) == ("2", str(rank), "2", str(rank))
        assert parent[:3] != as_rank([])  # the script became the rank: no process of it in between
