"""Tests for mnn-launch: command construction as pure functions, then real launches under mpiexec."""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnn.distributed.launch import (
    PROGRESS_ENV,
    THREAD_VARIABLES,
    MpiSetup,
    build_command,
    build_hello_command,
    detect_mpi,
    find_mpiexec,
    format_plan,
    parse_hostfile,
    parse_hosts,
)
from mnn.scripts.launch import main, parse_args

MPICH = MpiSetup("4.1", "MPICH Version: 5.0.2", "mpich", "/opt/mpich/bin/mpiexec")
OPENMPI = MpiSetup("4.1", "Open MPI v5.0.3", "openmpi", "/opt/openmpi/bin/mpiexec")
NO_MPI = MpiSetup(None, "mpi4py is not importable (No module named 'mpi4py')", None, None)
COMMAND = ["mnn-train", "--epochs", "2"]
BIN = Path(sys.executable).parent
HAVE_MPI = (BIN / "mpiexec").exists()
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py's mpiexec beside the Python executable")


def without_thread_variables(env):
    """``env`` as a user who set no thread counts and no progress style would have it (make test sets them)."""
    return {name: value for name, value in env.items() if name not in (*THREAD_VARIABLES, PROGRESS_ENV)}


def plan_for(argv, env=None, mpi=MPICH, cores=8, terminal=False):
    return build_command(parse_args(argv), {} if env is None else env, mpi, cores=cores, terminal=terminal)


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
                         "-genv", "OPENBLAS_NUM_THREADS", "4", "-genv", "MKL_NUM_THREADS", "4", *COMMAND]
    assert plan.warnings == []


def test_local_openmpi_command_exports_environment():
    plan = plan_for(["-n", "2", "--", *COMMAND], env={"PATH": "/usr/bin", "VIRTUAL_ENV": "/venv"}, mpi=OPENMPI)
    assert plan.argv == ["/opt/openmpi/bin/mpiexec", "-n", "2", "-x", "OMP_NUM_THREADS",
                         "-x", "OPENBLAS_NUM_THREADS", "-x", "MKL_NUM_THREADS", "-x", "PATH",
                         "-x", "VIRTUAL_ENV", *COMMAND]


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
    assert plan.argv == ["srun", "-n", "6", *COMMAND]
    assert plan.threads_per_rank == 5 and plan.env_updates["OMP_NUM_THREADS"] == "5"  # 16 cpus // 3 per node
    assert plan_for(["-n", "2", "--", *COMMAND], env=env).argv == ["srun", "-n", "2", *COMMAND]
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


def test_usage_errors():
    with pytest.raises(ValueError, match="no command to run"):
        plan_for(["-n", "2"])
    with pytest.raises(ValueError, match="pass -n N"):
        plan_for(["--", *COMMAND])
    with pytest.raises(SystemExit):
        parse_args(["-n", "0", "--", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--hosts", "a:1", "--hostfile", "f", "--", "x"])
    mismatch = MpiSetup("4.1", "MPICH", "mpich", None, error="the only mpiexec found belongs to another MPI")
    with pytest.raises(ValueError, match="belongs to another MPI"):
        plan_for(["-n", "2", "--", *COMMAND], mpi=mismatch)


def test_format_plan_and_dry_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    code = main(["-n", "2", "--dry-run", "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                env={**without_thread_variables(os.environ), "MKL_NUM_THREADS": "1"})
    out = capsys.readouterr().out
    assert code == 0 and not marker.exists()
    environment, command = out.strip().splitlines()
    assert environment.startswith("environment: OMP_NUM_THREADS=") and "MKL" not in environment
    assert PROGRESS_ENV not in environment  # captured stderr is no terminal
    assert command.startswith("command: ") and f"{sys.executable} -c " in command
    plan = plan_for(["-n", "1", "--", "echo", "a b"], env={name: "1" for name in THREAD_VARIABLES})
    assert format_plan(plan) == ("environment: (nothing: the thread variables are already set)\n"
                                 "command: /opt/mpich/bin/mpiexec -n 1 echo 'a b'")


def test_terminal_adds_progress_bar_to_the_plan():
    """On a terminal the plan sets MNN_PROGRESS=bar like the thread variables: shown by --dry-run, passed on."""
    mpich = plan_for(["-n", "2", "--", *COMMAND], terminal=True)
    assert mpich.env_updates[PROGRESS_ENV] == "bar"
    assert ["-genv", PROGRESS_ENV, "bar"] == mpich.argv[-len(COMMAND) - 3:-len(COMMAND)]
    assert f"{PROGRESS_ENV}=bar" in format_plan(mpich).splitlines()[0]
    openmpi = plan_for(["-n", "2", "--", *COMMAND], env={"PATH": "/usr/bin"}, mpi=OPENMPI, terminal=True)
    assert openmpi.env_updates[PROGRESS_ENV] == "bar"
    assert openmpi.argv[-len(COMMAND) - 2:-len(COMMAND)] == ["-x", PROGRESS_ENV]
    slurm = plan_for(["--", *COMMAND], env={"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2"}, terminal=True)
    assert slurm.env_updates[PROGRESS_ENV] == "bar"  # srun passes the whole environment on


def test_user_progress_choice_is_kept_and_no_terminal_adds_nothing():
    chosen = {PROGRESS_ENV: "lines"}
    mpich = plan_for(["-n", "2", "--", *COMMAND], env=chosen, terminal=True)
    assert PROGRESS_ENV not in mpich.env_updates and PROGRESS_ENV not in mpich.argv
    openmpi = plan_for(["-n", "2", "--", *COMMAND], env=chosen, mpi=OPENMPI, terminal=True)
    assert PROGRESS_ENV not in openmpi.env_updates
    assert openmpi.argv[-len(COMMAND) - 2:-len(COMMAND)] == ["-x", PROGRESS_ENV]  # forwarded with its value
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


def test_main_reports_usage_errors(capsys):
    assert main(["-n", "2"]) == 2
    assert "mnn-launch: error: no command to run" in capsys.readouterr().err


def test_help_explains_formats_and_examples(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for expected in ("host slots=N", "host:slots", "mnn-launch -n 4 -- mnn-train", "--dry-run", "--check",
                     "SLURM_NTASKS", "OMP_NUM_THREADS", "Ctrl-C" if "Ctrl-C" in text else "SIGINT"):
        assert expected in text


# ------------------------------------------------------------------ the --check hello
def hello_plan(argv, mpi=MPICH):
    return build_hello_command(parse_args([*argv, "--check"]), {}, mpi, cores=8)


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


def check_lines(launcher, hosts):
    result = subprocess.run([*launcher_command(), "--mpiexec", str(launcher), "--hosts", hosts, "--check"],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout.splitlines()


@needs_mpi
def test_check_reports_each_host(tmp_path):
    """No remote hosts exist where the tests run, so a scripted launcher stands in for ranks on node1..3:
    in the first job every rank answers; in the second, ssh cannot reach node2, so the launcher gives up
    after node1's rank started and before node3's did."""
    hosts = "node1.invalid:8,node2.invalid:8,node3.invalid:8"
    answering = write_scripted_launcher(tmp_path / "answering" / "mpiexec", (
        "for rank, host in enumerate(['n1', 'n2', 'n3']):\n"
        "    print(f'started rank={rank} host={host};hello rank={rank} size=3 host={host};')\n"))
    code, lines = check_lines(answering, hosts)
    assert json.loads(Path(f"{answering}.args").read_text())[:4] == [
        "-n", "3", "-hosts", "node1.invalid:1,node2.invalid:1,node3.invalid:1"]
    assert "OK host node1.invalid: rank 0 answered from n1" in lines
    assert "OK host node3.invalid: rank 2 answered from n3" in lines
    assert code == 1  # the .invalid names do not resolve here
    stopping = write_scripted_launcher(tmp_path / "stopping" / "mpiexec", (
        "print('started rank=0 host=n1;', flush=True)\n"
        "print('ssh: Could not resolve hostname node2.invalid: Name or service not known', file=sys.stderr)\n"
        "sys.exit(255)\n"))
    code, lines = check_lines(stopping, hosts)
    fixes = [line for line in lines if line.startswith("FIX: ")]
    assert code == 1
    assert any(line.startswith("FIX: 3-rank hello failed with exit status 255") for line in fixes), lines
    assert any(line.startswith("FIX: rank 0 started on node1.invalid (n1) but could not join the job while no "
                               "rank started on node2.invalid, node3.invalid") for line in fixes), lines
    assert any(line.startswith("FIX: no rank started on node2.invalid (ssh: Could not resolve hostname "
                               "node2.invalid: Name or service not known): check ssh/hostname") for line in fixes)
    assert any(line.startswith("FIX: no rank started on node3.invalid: the launcher stopped at node2.invalid first")
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
    fake = write_fake_mpiexec(tmp_path / "openmpi" / "bin",
                              "mpiexec (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/")
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    setup = detect_mpi(env)
    assert setup.family == "mpich" and setup.mpiexec == str(BIN / "mpiexec")
    assert len(setup.warnings) == 1
    warning = setup.warnings[0]
    assert str(fake) in warning and "Open MPI" in warning and "rank 0 of 1" in warning
    # With nothing beside Python, the foreign one is all there is: refuse rather than start N rank-0 copies.
    lonely = detect_mpi(env, python_dir=tmp_path / "empty")
    assert lonely.mpiexec is None and "belongs to another MPI" in lonely.error


@needs_mpi
def test_same_family_mpiexec_on_path_is_not_reported(tmp_path):
    fake = write_fake_mpiexec(tmp_path / "bin", "HYDRA build details:\n    Version: 4.2.0")
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
        "if sys.argv[1:] == ['--version']:\n    print('mpiexec (Open MPI) 5.0.3'); sys.exit(0)\n"
        "args = sys.argv[1:]\nranks = int(args[args.index('-n') + 1])\n"
        "command = args[args.index('-c') - 1:]\n"
        "sys.exit(max(subprocess.run(command).returncode for _ in range(ranks)))\n")
    fake.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "999"}
    hosts = "localhost:2,no-such-host.invalid:2"
    result = subprocess.run([*launcher_command(), "--mpiexec", str(fake), "--hosts", hosts, "--check"],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    fixes = [line for line in result.stdout.splitlines() if line.startswith("FIX: ")]
    assert any("is Open MPI but mpi4py uses MPICH" in line for line in fixes), result.stdout
    assert any("every process says it is rank 0 of 1" in line for line in fixes), result.stdout
    assert any("'no-such-host.invalid' does not resolve" in line for line in fixes), result.stdout
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
