"""Run a command as one rank of a job, with torchrun's variables set: mnn-launch starts every
rank as ``python rank_variables.py COMMAND ...``.

torchrun gives each worker ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE``, and scripts written for it read them. MPI's launchers name
the same numbers otherwise, and per rank, which no launcher option can copy into
other names:

==================  ===============  ============================  =========================
torchrun            MPICH (hydra)    Open MPI                      SLURM (srun)
==================  ===============  ============================  =========================
RANK                PMI_RANK         OMPI_COMM_WORLD_RANK          SLURM_PROCID
WORLD_SIZE          PMI_SIZE         OMPI_COMM_WORLD_SIZE          SLURM_NTASKS
LOCAL_RANK          MPI_LOCALRANKID  OMPI_COMM_WORLD_LOCAL_RANK    SLURM_LOCALID
LOCAL_WORLD_SIZE    MPI_LOCALNRANKS  OMPI_COMM_WORLD_LOCAL_SIZE    SLURM_TASKS_PER_NODE
==================  ===============  ============================  =========================

So this script, run by the launcher in each rank's place, sets the four from the
first launcher's names it finds, then replaces itself with the command
(``os.execvp``): the rank keeps this process's id, its signals and its
connections to the launcher. It is run by path with ``python -I`` and imports
only the standard library, so that it costs a rank a few milliseconds, not
mnn's imports. A number the launcher did not give is left unset.
"""
import os
import re
import sys

_NAMES = {
    "RANK": ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"),
    "WORLD_SIZE": ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"),
    "LOCAL_RANK": ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"),
    "LOCAL_WORLD_SIZE": ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"),
}
_EXIT_NOT_FOUND = 127


def torchrun_variables(env):
    """torchrun's four variables, as far as the launcher's variables in ``env`` give them."""
    found = {}
    for name, sources in _NAMES.items():
        value = next((env[source] for source in sources if env.get(source, "").isdigit()), None)
        if value is not None:
            found[name] = value
    if "LOCAL_WORLD_SIZE" not in found:
        tasks = _slurm_tasks_here(env)
        if tasks is not None:
            found["LOCAL_WORLD_SIZE"] = str(tasks)
    return found


def _slurm_tasks_here(env):
    """The tasks on this node from SLURM_TASKS_PER_NODE ("2(x3),1": 2 on each of the first
    three nodes, 1 on the fourth) and SLURM_NODEID; None without them."""
    node = env.get("SLURM_NODEID", "")
    counts = []
    for part in env.get("SLURM_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[int(node)] if node.isdigit() and int(node) < len(counts) else None


def main(argv):
    if not argv:
        print("rank_variables.py: no command to run", file=sys.stderr)
        return 2
    os.environ.update(torchrun_variables(os.environ))
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        print(f"mnn-launch: cannot run {argv[0]!r} on this rank: {error.strerror or error}", file=sys.stderr)
        return _EXIT_NOT_FOUND


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
