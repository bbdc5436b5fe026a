"""Hosts of an mnn-launch job: ``--hosts`` and hostfiles read into ``[(host, slots), ...]``,
how ranks fill them, and what is known of this machine (its names, its usable cores).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

__all__ = ["parse_hostfile", "parse_hosts", "usable_cores", "local_host_names", "is_local_host", "remote_hosts",
           "place_ranks"]

_HOST_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HOSTFILE_FORMATS = "expected 'host', 'host:slots' (MPICH) or 'host slots=N' (Open MPI)"
# More slots than any host has: a typo, refused before Python turns thousands of digits into an int.
_MAX_SLOTS = 10**6
# Read no further: a hostfile of a million hosts is 16 MB, and --hostfile /dev/zero would never end.
_MAX_HOSTFILE_BYTES = 16 << 20


def parse_hostfile(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read a hostfile in MPICH (``host:slots``) or Open MPI (``host slots=N``) format.

    Returns ``[(host, slots), ...]`` in order of first appearance; repeated hosts
    add up their slots. Raises ValueError naming the file and line otherwise.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_HOSTFILE_BYTES + 1)
    except OSError as error:
        raise ValueError(f"hostfile {path} cannot be read: {error.strerror or error}") from None
    if len(data) > _MAX_HOSTFILE_BYTES:
        raise ValueError(f"hostfile {path} is larger than {_MAX_HOSTFILE_BYTES >> 20} MiB, which no hostfile is "
                         "(is it the right file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"hostfile {path} is not UTF-8 text: byte {error.start} is "
                         f"0x{error.object[error.start]:02x} ({error.reason}); "
                         f"{_HOSTFILE_FORMATS}, one per line") from None
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
    if slots is not None and len(slots.lstrip("0")) > len(str(_MAX_SLOTS)):
        raise ValueError(f"{where}: slots must be at most {_MAX_SLOTS:,}, got a number of {len(slots)} digits")
    slots = 1 if slots is None else int(slots)
    if slots < 1:
        raise ValueError(f"{where}: slots must be at least 1, got {slots}")
    if slots > _MAX_SLOTS:
        raise ValueError(f"{where}: slots must be at most {_MAX_SLOTS:,}, got {slots:,}")
    return host, slots


def _merge_hosts(entries: list[tuple[str, int]]) -> list[tuple[str, int]]:
    merged: dict[str, int] = {}
    for host, slots in entries:
        merged[host] = merged.get(host, 0) + slots
    return list(merged.items())


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def local_host_names() -> set[str]:
    """Names under which this machine may appear in a host list."""
    hostname = socket.gethostname()
    return {"localhost", "127.0.0.1", "::1", hostname, hostname.split(".")[0]}


def is_local_host(host: str) -> bool:
    """Whether ``host`` is this machine: one of its names, or a name or address that resolves to
    an address of this machine's name or to 127.0.0.1/::1 (as MPICH's and Open MPI's launchers,
    which start ranks on such hosts without ssh). Other loopback addresses (127.0.0.2) count as
    other hosts, as they do for the launchers.
    """
    if host in local_host_names():
        return True
    try:
        addresses = _addresses(host)
        local = _addresses(socket.gethostname()) | {"127.0.0.1", "::1"}
    except (OSError, UnicodeError):
        return False
    return bool(addresses & local)


def _addresses(host: str) -> set[str]:
    return {info[4][0] for info in socket.getaddrinfo(host, None)}


def remote_hosts(hosts: list[tuple[str, int]] | None) -> list[str]:
    """The hosts of ``hosts`` that are not this machine: the launcher reaches them with ssh."""
    return [host for host, _ in hosts or [] if not is_local_host(host)]


def place_ranks(hosts: list[tuple[str, int]], ranks: int) -> dict[str, int]:
    """Ranks per host when hosts are filled slot by slot, wrapping around if ranks exceed the slots."""
    placed = {host: 0 for host, _ in hosts}
    remaining = ranks
    while remaining > 0:
        for host, slots in hosts:
            taken = min(slots, remaining)
            placed[host] += taken
            remaining -= taken
    return placed

