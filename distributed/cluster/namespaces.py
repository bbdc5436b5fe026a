"""A cluster of N hosts on one machine: network namespaces, a bridge, an sshd on each host.

The layout of a cluster named ``c``::

    namespace mnnc-c-head   eth0 10.77.0.2   runs the user's command (mnn-launch)
    namespace mnnc-c-node1  eth0 10.77.0.11  sshd on 10.77.0.11:22, host name node1
    namespace mnnc-c-node2  eth0 10.77.0.12  ...
    namespace mnnc-c-switch a bridge; one veth pair to each namespace above

Each veth pair is created with both ends inside the cluster's namespaces, so the
machine's own namespace never sees an interface of the cluster; the addresses
exist only inside them, and no namespace has a default route. Names resolve
through a hosts file (``/etc/netns/NS/hosts``, which ``ip netns exec`` mounts
over ``/etc/hosts`` for the processes of namespace NS), never through DNS.

Every host runs Debian's sshd with a host key and a user key made for the
cluster; in every namespace ``/etc/ssh`` is a folder of the cluster's (again
mounted by ``ip netns exec``) whose ``ssh_config`` names that user key and a
known_hosts file that holds the cluster's host key, so a plain ``ssh node2``
works there with strict host key checking and never touches the machine's or
the user's keys (a ``~/.ssh`` of the user is hidden in the cluster).

Links are limited with a token bucket (``tc qdisc ... tbf``) on both ends of
every host's link, which emulates a link's bandwidth; latency is not emulated
(this kernel's ``tc`` has no ``netem``).

A cluster made by a process (the tests, ``mnn-cluster run``) belongs to it:
:meth:`Cluster.up` first removes every cluster whose owner is gone (a killed
run), and :meth:`Cluster.down` removes every namespace, link, process and file
of its own. A cluster made by ``mnn-cluster up`` is kept until ``mnn-cluster
down`` removes it.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["Cluster", "ClusterError", "cluster_support", "remove_leftovers", "list_clusters"]

PREFIX = "mnnc"
STATE_ROOT = Path("/run/mnn-cluster")
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
#: The cluster's subnet: it exists only inside the cluster's namespaces.
SUBNET = "10.77.0"
HEAD = "head"
SWITCH = "switch"
_HEAD_ADDRESS = f"{SUBNET}.2"
_SSH_PORT = 22
_KEPT = "kept"
_UP_TIMEOUT_S = 20.0
_TOOLS = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux", "sshd": "openssh-server",
          "ssh": "openssh-client", "ssh-keygen": "openssh-client"}
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
# In a namespace of the cluster: the host's name and boot id, the user's ~/.ssh hidden, then the command.
_ENTER = ('hostname "$1" && mount --bind "$2" ' + _BOOT_ID + ' || exit 125; '
          'if [ -d "$3" ]; then mount --bind "$4" "$3" || exit 125; fi; shift 4; exec "$@"')


class ClusterError(RuntimeError):
    """The cluster cannot be brought up, or a command in it failed."""


def cluster_support() -> str | None:
    """None where a cluster can be made here, else why not (one line)."""
    if os.geteuid() != 0:
        return "a cluster of network namespaces needs root"
    missing = [f"{tool} ({package})" for tool, package in _TOOLS.items() if _which(tool) is None]
    if missing:
        return "missing: " + ", ".join(missing) + " (make setup-cluster installs them)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    result = subprocess.run([_which("ip"), "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"ip netns add fails here: {result.stderr.strip()}"
    subprocess.run([_which("ip"), "netns", "del", probe], capture_output=True)
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + _SYSTEM_PATH)


def _tool(tool: str) -> str:
    found = _which(tool)
    if found is None:
        raise ClusterError(f"{tool} not found: install Debian's {_TOOLS.get(tool, tool)} (make setup-cluster)")
    return found


def _run(argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass
class Cluster:
    """N hosts ``node1`` ... ``nodeN`` and a head, each a network namespace (module docstring).

    ``slots``: ranks per host in :attr:`hostfile`; ``rate``: the bandwidth of
    every host's link as ``tc`` writes it (``"1gbit"``, ``"100mbit"``), None
    for no limit; ``kept``: the cluster outlives the process that made it
    (``mnn-cluster up``).
    """

    hosts: int
    slots: int = 1
    rate: str | None = None
    name: str = field(default_factory=lambda: f"{os.getpid():x}{secrets.token_hex(2)}")
    kept: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.hosts, int) or not 1 <= self.hosts <= 200:
            raise ValueError(f"hosts: expected 1 to 200, got {self.hosts!r}")
        if not self.name.isalnum() or len(self.name) > 12:
            raise ValueError(f"name: expected up to 12 letters and digits, got {self.name!r}")

    # -- names and places -------------------------------------------------------------

    @property
    def host_names(self) -> list[str]:
        return [f"node{index}" for index in range(1, self.hosts + 1)]

    def namespace(self, host: str) -> str:
        return f"{PREFIX}-{self.name}-{host}"

    def address(self, host: str) -> str:
        return _HEAD_ADDRESS if host == HEAD else f"{SUBNET}.{10 + self._index(host)}"

    def _index(self, host: str) -> int:
        if host not in self.host_names:
            raise ValueError(f"no host {host!r} in cluster {self.name} (hosts: {', '.join(self.host_names)}, {HEAD})")
        return int(host[len("node"):])

    @property
    def state(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def hostfile(self) -> Path:
        """``node1:slots`` per line: for ``mnn-launch --hostfile`` in the head."""
        return self.state / "hostfile"

    @property
    def host_list(self) -> str:
        """``node1:S,node2:S,...``: for ``mnn-launch --hosts``."""
        return ",".join(f"{host}:{self.slots}" for host in self.host_names)

    def _namespaces(self) -> list[str]:
        return [self.namespace(host) for host in (HEAD, *self.host_names, SWITCH)]

    # -- up and down ------------------------------------------------------------------

    def up(self) -> Cluster:
        """Make the namespaces, links, keys and sshds; return once every sshd listens.
        Removes clusters left by killed runs first. On failure nothing of this cluster is left."""
        problem = cluster_support()
        if problem:
            raise ClusterError(problem)
        remove_leftovers()
        if self.state.exists():
            raise ClusterError(f"a cluster named {self.name} exists already ({self.state})")
        try:
            self._make_state()
            self._make_keys()
            self._make_namespaces()
            self._make_links()
            for host in self.host_names:
                self.start_sshd(host)
            self._wait_for_sshds()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process in the cluster's namespaces, remove the namespaces (their links go
        with them), the cluster's files in /etc/netns and its state folder. Never raises."""
        _remove_by_name(self.name)

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc_info) -> None:
        self.down()

    def _make_state(self) -> None:
        """The state folder, with its owner in it from the first moment another process can see it
        (made aside, then renamed), so that a cluster coming up is never taken for a leftover."""
        owner = _KEPT if self.kept else f"{os.getpid()} {_start_time(os.getpid())}"
        description = {"hosts": self.hosts, "slots": self.slots, "rate": self.rate, "owner": owner}
        aside = STATE_ROOT / f".{self.name}"
        aside.mkdir(parents=True, mode=0o700)
        (aside / "cluster.json").write_text(json.dumps(description) + "\n")
        aside.rename(self.state)

    def _make_keys(self) -> None:
        keygen = _tool("ssh-keygen")
        for key in ("host_key", "user_key"):
            _run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"mnn cluster {self.name}",
                  "-f", str(self.state / key)])
        host_key = (self.state / "host_key.pub").read_text().split()[:2]
        known = [f"{host},{self.address(host)} {' '.join(host_key)}" for host in (*self.host_names, HEAD)]
        (self.state / "known_hosts").write_text("\n".join(known) + "\n")
        shutil.copy(self.state / "user_key.pub", self.state / "authorized_keys")
        user = pwd.getpwuid(os.geteuid()).pw_name
        (self.state / "ssh_config").write_text(
            "# The cluster's own keys; nothing of the machine's or the user's.\n"
            f"Host *\n  User {user}\n  IdentityFile {self.state / 'user_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.state / 'known_hosts'}\n"
            f"  GlobalKnownHostsFile {self.state / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n")
        (self.state / "empty").mkdir()
        for host in (HEAD, *self.host_names):
            (self.state / f"boot_id-{host}").write_text(str(uuid.uuid4()) + "\n")
        self.hostfile.write_text("".join(f"{host}:{self.slots}\n" for host in self.host_names))

    def _make_namespaces(self) -> None:
        ip = _tool("ip")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{self.address(host)} {host}\n" for host in (HEAD, *self.host_names))
        for namespace in self._namespaces():
            _run([ip, "netns", "add", namespace])
            _run([ip, "-n", namespace, "link", "set", "lo", "up"])
            etc = NETNS_ETC / namespace
            (etc / "ssh").mkdir(parents=True)
            (etc / "hosts").write_text(hosts_file)
            shutil.copy(self.state / "ssh_config", etc / "ssh" / "ssh_config")

    def _make_links(self) -> None:
        ip, switch = _tool("ip"), self.namespace(SWITCH)
        _run([ip, "-n", switch, "link", "add", "br0", "type", "bridge"])
        _run([ip, "-n", switch, "link", "set", "br0", "up"])
        for host in (HEAD, *self.host_names):
            namespace, port = self.namespace(host), f"to-{host}"
            # Both ends are made inside the cluster's namespaces, never in the machine's own.
            _run([ip, "link", "add", "name", "eth0", "netns", namespace, "type", "veth",
                  "peer", "name", port, "netns", switch])
            _run([ip, "-n", namespace, "addr", "add", f"{self.address(host)}/24", "dev", "eth0"])
            _run([ip, "-n", namespace, "link", "set", "eth0", "up"])
            _run([ip, "-n", switch, "link", "set", port, "master", "br0", "up"])
            if self.rate and host != HEAD:
                self.limit(host, self.rate)

    def limit(self, host: str, rate: str | None) -> None:
        """Cap ``host``'s link at ``rate`` both ways (a token bucket on each end), or lift the cap."""
        tc = _tool("tc")
        for namespace, device in ((self.namespace(host), "eth0"), (self.namespace(SWITCH), f"to-{host}")):
            if rate is None:
                _run([tc, "-n", namespace, "qdisc", "del", "dev", device, "root"], check=False)
            else:
                # The bucket holds at least one offloaded segment (64 KiB), or large packets never pass.
                _run([tc, "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
                      "burst", "256kb", "latency", "50ms"])

    def start_sshd(self, host: str) -> None:
        """Start ``host``'s sshd (listening only on its address) in the background."""
        config = self.state / f"sshd-{host}.conf"
        config.write_text(
            f"ListenAddress {self.address(host)}:{_SSH_PORT}\nHostKey {self.state / 'host_key'}\n"
            f"AuthorizedKeysFile {self.state / 'authorized_keys'}\nPidFile {self.state / f'sshd-{host}.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPrintMotd no\nPrintLastLog no\nMaxStartups 100\nMaxSessions 100\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        log = open(self.state / f"sshd-{host}.log", "ab")
        with log:
            self.popen(host, [_tool("sshd"), "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                       stdin=subprocess.DEVNULL, start_new_session=True)

    def stop_sshd(self, host: str) -> None:
        """Stop ``host``'s sshd (sessions it started go on, as on a real host)."""
        pid_file = self.state / f"sshd-{host}.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        _stop_processes([pid])
        pid_file.unlink(missing_ok=True)

    def _wait_for_sshds(self) -> None:
        deadline = time.monotonic() + _UP_TIMEOUT_S
        waiting = list(self.host_names)
        while waiting:
            waiting = [host for host in waiting if not self.listens(host)]
            if waiting and time.monotonic() > deadline:
                logs = {host: (self.state / f"sshd-{host}.log").read_text(errors="replace").strip()
                        for host in waiting}
                raise ClusterError("sshd did not start on " + "; ".join(f"{host}: {log or 'no output'}"
                                                                       for host, log in logs.items()))
            time.sleep(0.05)

    def listens(self, host: str) -> bool:
        """Whether ``host``'s sshd accepts connections (tried from the head)."""
        probe = (f"import socket\ntry:\n socket.create_connection(('{self.address(host)}', {_SSH_PORT}), 1).close()\n"
                 "except OSError:\n raise SystemExit(1)\n")
        return self.run(HEAD, ["python3", "-c", probe], check=False).returncode == 0

    # -- commands in the cluster ------------------------------------------------------

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` on ``host`` (or the head): in its namespace, with its
        host name, the cluster's /etc/hosts and ssh configuration, and the user's ~/.ssh hidden."""
        if host != HEAD:
            self._index(host)
        home_ssh = os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".ssh")
        return [_tool("ip"), "netns", "exec", self.namespace(host), _tool("unshare"), "--uts", "--",
                "sh", "-c", _ENTER, "sh", host, str(self.state / f"boot_id-{host}"), home_ssh,
                str(self.state / "empty"), *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host``; keyword arguments as :class:`subprocess.Popen`'s.
        The process id is that of the command itself (each step before it execs)."""
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def run(self, host: str, argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` to its end, its output captured as text."""
        result = subprocess.run(self.command(host, argv), capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise ClusterError(f"on {host}: {' '.join(argv)} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def pids(self, host: str) -> list[int]:
        """Every process in ``host``'s namespace (its sshd included)."""
        return _namespace_pids(self.namespace(host))

    def job_pids(self, host: str) -> list[int]:
        """The processes in ``host``'s namespace other than its sshd listener: what a job left."""
        sshd = self._sshd_pid(host)
        return [pid for pid in self.pids(host) if pid != sshd]

    def _sshd_pid(self, host: str) -> int | None:
        try:
            return int((self.state / f"sshd-{host}.pid").read_text())
        except (OSError, ValueError):
            return None

    # -- faults -----------------------------------------------------------------------

    def set_link(self, host: str, up: bool) -> None:
        """Bring ``host``'s link down (as if its cable were pulled) or up again."""
        _run([_tool("ip"), "-n", self.namespace(host), "link", "set", "eth0", "up" if up else "down"])

    def freeze(self, host: str, frozen: bool = True) -> None:
        """Stop (SIGSTOP) or continue (SIGCONT) every process of ``host``: a host that hangs."""
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGSTOP if frozen else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def traffic(self, host: str) -> tuple[int, int]:
        """Bytes received and sent on ``host``'s link so far."""
        result = _run([_tool("ip"), "-n", self.namespace(host), "-j", "-s", "link", "show", "eth0"])
        stats = json.loads(result.stdout)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def bind(self, host: str, source: str | os.PathLike, target: str | os.PathLike) -> None:
        """Mount ``source`` over ``target`` for what ``host``'s sshd starts from now on (its
        sessions), as if ``host`` had another file there: another daemon, another library.
        Only in the sshd's mount namespace, which ``ip netns exec`` made a slave of the
        machine's, so nothing else sees it; it goes with the sshd (:meth:`stop_sshd`, :meth:`down`)."""
        pid = self._sshd_pid(host)
        if pid is None:
            raise ClusterError(f"{host}'s sshd is not running: start it first (start_sshd)")
        _run([_tool("nsenter"), "-t", str(pid), "-m", "mount", "--bind", str(source), str(target)])


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _namespace_pids(namespace: str) -> list[int]:
    if not (NETNS_RUN / namespace).exists():
        return []
    result = _run([_tool("ip"), "netns", "pids", namespace], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _stop_processes(pids: Iterable[int], grace: float = 2.0) -> None:
    """SIGTERM (after SIGCONT, for frozen ones), then SIGKILL what is left after ``grace`` seconds."""
    pids = [pid for pid in pids if pid != os.getpid()]
    for signum in (signal.SIGCONT, signal.SIGTERM):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def list_clusters() -> dict[str, dict]:
    """Every cluster on this machine: {name: its description, with ``alive``: whether its owner
    runs (or it is kept)}, found by its namespaces and its state folder."""
    names = set()
    if NETNS_RUN.is_dir():
        names |= {entry.name.split("-")[1] for entry in NETNS_RUN.iterdir()
                  if entry.name.startswith(PREFIX + "-") and entry.name.count("-") >= 2}
    if STATE_ROOT.is_dir():
        names |= {entry.name for entry in STATE_ROOT.iterdir() if not entry.name.startswith(".")}
    clusters = {}
    for name in sorted(names):
        try:
            description = json.loads((STATE_ROOT / name / "cluster.json").read_text())
        except (OSError, ValueError):
            description = {"owner": None}
        owner = description.get("owner")
        if owner == _KEPT:
            alive = True
        elif owner:
            pid, started = owner.split(" ", 1)
            alive = _start_time(int(pid)) == started
        else:
            alive = False
        clusters[name] = {**description, "alive": alive}
    return clusters


def remove_leftovers() -> list[str]:
    """Remove every cluster whose owner is gone (a run killed before it brought its cluster down);
    the names of those removed."""
    removed = []
    for name, description in list_clusters().items():
        if not description["alive"]:
            _remove_by_name(name)
            removed.append(name)
    return removed


def _remove_by_name(name: str) -> None:
    """Everything of cluster ``name``, whatever its size: its namespaces, their files, its state."""
    namespaces = set()
    for folder in (NETNS_RUN, NETNS_ETC):
        if folder.is_dir():
            namespaces |= {entry.name for entry in folder.iterdir() if entry.name.startswith(f"{PREFIX}-{name}-")}
    for namespace in namespaces:
        _stop_processes(_namespace_pids(namespace))
    for namespace in namespaces:
        if (NETNS_RUN / namespace).exists():
            _run([_tool("ip"), "netns", "del", namespace], check=False)
        shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
    shutil.rmtree(STATE_ROOT / name, ignore_errors=True)
