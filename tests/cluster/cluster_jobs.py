"""Running jobs in a test cluster: mnn-launch in the head, under the MPI of the Python that runs pytest."""
import os
import sys
from pathlib import Path

from processes import ENV

__all__ = ["PYTHON_BIN", "LAUNCH", "TRAIN", "CLUSTER_ENV", "launch"]

PYTHON_BIN = Path(sys.executable).parent
LAUNCH = [sys.executable, "-m", "mnn.scripts.launch"]
TRAIN = [sys.executable, "-m", "mnn.scripts.train"]
# The environment of a job in the cluster: this Python's tools first on PATH, Open MPI's
# permission to run as root (the cluster runs as root), progress as lines.
CLUSTER_ENV = {**ENV, "PATH": f"{PYTHON_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launch(cluster, args, timeout=180, env=None, check=False):
    """``mnn-launch ARGS`` in the cluster's head, to its end (a CompletedProcess with text output)."""
    return cluster.run("head", [*LAUNCH, *args], env=env or CLUSTER_ENV, timeout=timeout, check=check)
