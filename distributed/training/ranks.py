"""The ranks of a job: do they run the same thing, and how many share each host's cores.

At start-up every rank tells the others a few facts (:func:`gather_facts`,
one small allgather): its host, the CPUs it may use, its BLAS threads, and a
fingerprint of what it runs (a hash of mnn's source files, the versions of
Python, NumPy and mnn, and its resolved job). :func:`disagreements` names
the ranks whose fingerprint differs from rank 0's: ranks started from
different installs, or with a different job file on another host, would
otherwise train different things or hang in mismatched collectives. Once the
data is loaded, :func:`data_disagreements` does the same for what each rank
read (its sizes, a digest of its scaling, a text's characters and digest): one
job file can name a file whose copies differ from host to host, and ranks with
different numbers of samples would run different numbers of steps.

:func:`limit_blas_threads` keeps BLAS from oversubscribing a host: plain
``mpiexec -n 2 mnn-train`` on 2 cores with a BLAS that starts one thread per
core runs 4 busy threads on 2 cores, which measured 36x slower (112 s against
3.1 s for the digits job). When the user set no thread variable, each rank is
limited to its share of the host's cores; when they did and it oversubscribes,
rank 0 says how to fix it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import socket
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from mnn.text import fingerprint_difference
from mnn.distributed.comm import Communicator
from mnn.distributed.environment import DISTRIBUTION, THREAD_VARIABLES

__all__ = ["RankFacts", "gather_facts", "disagreements", "data_disagreements",
           "limit_blas_threads"]

# The packages whose source is part of the fingerprint (the folders they install from).
_SOURCE_PACKAGES = ("mnn", "mnn.distributed", "mnn.scripts")


@dataclass(frozen=True)
class RankFacts:
    """What a rank tells the others at start-up."""

    host: str
    cpus: tuple[int, ...]
    blas_threads: int
    threads_set_by_user: bool
    versions: dict[str, str]
    code: str
    job: dict[str, Any]


def gather_facts(comm: Communicator, job: dict[str, Any]) -> list[RankFacts]:
    """Every rank's facts, in rank order (collective)."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        cpus = tuple(range(os.cpu_count() or 1))
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    try:
        mnn_version = version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that is not installed
        mnn_version = "not installed"
    mine = RankFacts(host=socket.gethostname(), cpus=cpus, blas_threads=max(blas, default=1),
                     threads_set_by_user=any(name in os.environ for name in THREAD_VARIABLES),
                     versions={"python": platform.python_version(), "numpy": np.__version__, "mnn": mnn_version},
                     code=_source_hash(), job=job)
    return comm.allgather(mine)


def _source_hash() -> str:
    """A hash of mnn's installed source files, so that two installs of one version but
    different code are told apart."""
    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations or ():
            for path in sorted(Path(folder).rglob("*.py")):
                digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def disagreements(facts: list[RankFacts]) -> list[str]:
    """One line per rank that runs something else than rank 0: which versions, code or
    job settings differ. Empty when all agree."""
    reference = facts[0]
    lines = []
    for rank, theirs in enumerate(facts[1:], start=1):
        differences = [f"{name} {value} (rank 0: {reference.versions.get(name)})"
                       for name, value in theirs.versions.items() if value != reference.versions.get(name)]
        if theirs.code != reference.code and not differences:
            differences.append(f"mnn's source files differ (hash {theirs.code}, rank 0: {reference.code})")
        differences += [f"{key} = {theirs.job.get(key)!r} (rank 0: {reference.job.get(key)!r})"
                        for key in sorted(set(theirs.job) | set(reference.job))
                        if theirs.job.get(key) != reference.job.get(key)]
        if differences:
            lines.append(f"rank {rank} on {theirs.host}: " + "; ".join(differences))
    return lines


def data_disagreements(comm: Communicator, data: dict[str, Any]) -> list[str]:
    """One line per rank whose ``data`` (what it read, by name: sizes, digests, and a text's
    :attr:`~mnn.text.TextDataset.fingerprint` as ``"text"``) differs from rank 0's, naming
    the rank, its host and each difference (collective: one small allgather)."""
    gathered = comm.allgather((socket.gethostname(), data))
    reference = gathered[0][1]
    lines = []
    for rank, (host, theirs) in enumerate(gathered[1:], start=1):
        differences = []
        for name in [*reference, *(name for name in theirs if name not in reference)]:
            mine, rank0 = theirs.get(name), reference.get(name)
            if mine == rank0:
                continue
            if name == "text" and mine is not None and rank0 is not None:
                differences.append("its text differs from rank 0's: "
                                   + fingerprint_difference(rank0, mine, reference_is="rank 0's"))
            else:
                differences.append(f"{name} {mine} (rank 0: {rank0})")
        if differences:
            lines.append(f"rank {rank} on {host}: " + "; ".join(differences))
    return lines


def limit_blas_threads(facts: list[RankFacts], rank: int) -> str | None:
    """Keep this rank's BLAS within its share of the host's cores; return a note for rank 0
    (from rank 0's own host: every host is alike in the usual job) or None.

    The share is the CPUs the ranks on this host may use, together, divided by
    the number of those ranks (at least 1, at most this rank's own CPUs).
    """
    mine = facts[rank]
    neighbours = [theirs for theirs in facts if theirs.host == mine.host]
    cpus = set().union(*(theirs.cpus for theirs in neighbours))
    share = max(1, min(len(mine.cpus), len(cpus) // len(neighbours)))
    if mine.blas_threads <= share:
        return None
    sharing = f"{len(neighbours)} rank{'s' if len(neighbours) > 1 else ''} share the {len(cpus)} cores of {mine.host}"
    if mine.threads_set_by_user:
        return (f"{sharing}, but BLAS runs {mine.blas_threads} threads in each (set by "
                f"{'/'.join(THREAD_VARIABLES)}): that oversubscribes the cores and can run many times "
                f"slower; set OMP_NUM_THREADS={share} (or use mnn-launch, which does)")
    threadpool_limits(limits=share, user_api="blas")
    return (f"{sharing}: BLAS limited to {share} thread{'s' if share > 1 else ''} per rank instead of "
            f"{mine.blas_threads} (set OMP_NUM_THREADS to choose)")
