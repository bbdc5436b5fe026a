"""Finding MPI for mnn-launch: mpi4py's library, its family, and the ``mpiexec`` that belongs to it.

:func:`detect_mpi` never raises: what it found, and what is wrong, comes back
as an :class:`MpiSetup`. mnn-bench uses :func:`find_mpiexec` to start its runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from mnn.distributed.environment import install_hint

__all__ = ["MpiSetup", "mpi_family", "family_name", "detect_mpi", "find_mpiexec"]

_FAMILY_NAMES = {"mpich": "MPICH", "openmpi": "Open MPI"}
_VERSION_TIMEOUT_S = 10.0
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


def mpi_family(text: str) -> str | None:
    """``"mpich"``, ``"openmpi"`` or None from a library version or ``mpiexec --version`` text."""
    lowered = text.lower()
    if any(mark in lowered for mark in ("open mpi", "openrte", "open-rte", "prrte")):
        return "openmpi"
    if any(mark in lowered for mark in ("mpich", "hydra", "intel(r) mpi", "mvapich")):
        return "mpich"
    return None


def family_name(family: str | None) -> str:
    """The name of a family from :func:`mpi_family`, for messages."""
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
            warnings.append(f"--mpiexec {chosen} is {family_name(chosen_family)} but mpi4py uses {version}: "
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
                f"the mpiexec first on PATH, {on_path}, is {family_name(path_family)}, but mpi4py is linked "
                f"against {version}: ranks it starts would each believe they are rank 0 of 1. mnn-launch uses "
                f"{chosen}; to run mpiexec by hand call that one, or put {Path(chosen).parent} first on PATH "
                "(e.g. activate the virtual environment)")
    if chosen is None and candidates:
        wrong = ", ".join(f"{path} ({family_name(families[path])})" for path in families)
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
                                          f"({setup.library}); {install_hint('mpi')}")
    return setup.mpiexec

