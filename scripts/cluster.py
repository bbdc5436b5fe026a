"""mnn-cluster: a cluster of hosts on this machine, to rehearse a job across hosts before a real one.

    sudo mnn-cluster run --hosts 3 --slots 2 --rate 1gbit -- \\
        mnn-launch --hostfile {hostfile} -- mnn-train --config examples/digits.toml

brings up 3 hosts (``node1`` ... ``node3``, 2 slots each) and a head, runs the
command in the head, and brings everything down again, also after a failure or
Ctrl-C; its exit status is the command's. The command finds the programs of
mnn-cluster's own Python environment first on PATH (sudo resets PATH). ``{hostfile}`` and ``{hosts}`` in the
command become the cluster's hostfile (``node1:2`` per line) and its host list
(``node1:2,node2:2,node3:2``); the head's environment has them too, as
MNN_CLUSTER_HOSTFILE and MNN_CLUSTER_HOSTS.

Each host is a network namespace with its own host name and an sshd on its own
address; mnn-launch reaches them over real ssh, with keys made for the cluster,
and MPI's ranks on different hosts talk TCP through links that ``--rate`` caps
(a token bucket on both ends; latency is not emulated). Nothing of it touches
the machine's own network: the addresses exist only inside the cluster's
namespaces, and no namespace has a route out. See ``mnn.distributed.cluster``.

A cluster to come back to: ``mnn-cluster up --name demo --hosts 2``, then
``mnn-cluster run --name demo -- COMMAND`` as often as needed (``--on node1``
runs it on a host instead of the head), ``mnn-cluster list`` and ``mnn-cluster
down demo``. A cluster whose ``run`` was killed is removed by the next
``mnn-cluster`` (or ``mnn-cluster down --all``).

Needs root (network namespaces), iproute2 and openssh-server (``make
setup-cluster`` installs what is missing). Exit status: the command's for
``run``; 2 when the cluster cannot be made here or the arguments are wrong.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys

from mnn.distributed.cluster import Cluster, ClusterError, cluster_support, remove_leftovers
from mnn.distributed.cluster.namespaces import HEAD, list_clusters
from mnn.distributed.launch.process import STOP_SIGNALS
from mnn.scripts.arguments import positive

__all__ = ["main", "build_parser"]

_EXIT_USAGE = 2
_DEFAULT_HOSTS = 2
_RATE = re.compile(r"^[0-9]+(\.[0-9]+)?[kmg]?bit$")


def _rate(text: str) -> str:
    if not _RATE.match(text.lower()):
        raise argparse.ArgumentTypeError(f"expected a rate such as 1gbit, 100mbit or 500kbit, got {text!r}")
    return text.lower()


def _name(text: str) -> str:
    if not (text.isalnum() and text.isascii() and len(text) <= 12):
        raise argparse.ArgumentTypeError(f"expected up to 12 letters and digits, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnn-cluster", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A cluster of hosts on this machine (network namespaces with their own sshd), to rehearse "
                    "a job across hosts.",
        epilog="example:\n  sudo mnn-cluster run --hosts 3 --slots 2 --rate 1gbit -- \\\n"
               "      mnn-launch --hostfile {hostfile} -- mnn-train --config examples/digits.toml")
    commands = parser.add_subparsers(dest="action", required=True, metavar="{run,up,down,list}")
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--hosts", type=positive(int, at_most=200), metavar="N",
                       help="hosts node1 ... nodeN besides the head (default 2)")
    shape.add_argument("--slots", type=positive(int), metavar="S",
                       help="ranks per host in the cluster's hostfile (default 1)")
    shape.add_argument("--rate", type=_rate, metavar="RATE",
                       help="cap every host's link at RATE both ways, as tc writes it: 1gbit, 100mbit "
                            "(default: no cap)")
    run = commands.add_parser(
        "run", parents=[shape], help="run a command in the head of a new cluster (or of --name's)",
        description="Bring up a cluster, run COMMAND in its head, bring the cluster down; exit with COMMAND's "
                    "status. With --name, run COMMAND in that cluster (made by 'up') and leave it up. "
                    "{hostfile} and {hosts} in COMMAND become the cluster's hostfile and host list.")
    run.add_argument("--name", type=_name, help="run in this cluster (made by mnn-cluster up)")
    run.add_argument("--on", default=HEAD, metavar="HOST", help="where to run COMMAND: head (default) or nodeK")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the program to run and its arguments")
    up = commands.add_parser("up", parents=[shape], help="bring up a cluster that stays until 'down'",
                             description="Bring up a cluster that stays until mnn-cluster down NAME.")
    up.add_argument("--name", type=_name, required=True, help="the cluster's name: letters and digits, at most 12")
    down = commands.add_parser("down", help="bring a cluster down", description="Bring a cluster down.")
    down.add_argument("name", nargs="?", type=_name, help="the cluster made by mnn-cluster up")
    down.add_argument("--all", action="store_true", help="every cluster on this machine")
    commands.add_parser("list", help="the clusters on this machine", description="The clusters on this machine.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action == "list":
        return _list()
    problem = cluster_support()
    if problem:
        print(f"mnn-cluster: {problem}", file=sys.stderr)
        return _EXIT_USAGE
    try:
        if args.action == "up":
            return _up(args)
        if args.action == "down":
            return _down(parser, args)
        return _run(parser, args)
    except ClusterError as error:
        print(f"mnn-cluster: {error}", file=sys.stderr)
        return _EXIT_USAGE


def _list() -> int:
    clusters = list_clusters()
    for name, description in clusters.items():
        kept = description.get("owner") == "kept"
        state = "kept" if kept else "running" if description["alive"] else "left by a killed run"
        rate = description.get("rate") or "no cap"
        print(f"{name}: {description.get('hosts', '?')} hosts x {description.get('slots', '?')} slots, {rate}, "
              f"{state}")
    if not clusters:
        print("no cluster on this machine")
    return 0


def _up(args: argparse.Namespace) -> int:
    cluster = Cluster(args.hosts or _DEFAULT_HOSTS, slots=args.slots or 1, rate=args.rate, name=args.name,
                      kept=True).up()
    print(f"cluster {cluster.name} is up: head and {', '.join(cluster.host_names)} ({cluster.slots} slots each"
          f"{', links capped at ' + cluster.rate if cluster.rate else ''}); hostfile {cluster.hostfile}\n"
          f"run a command in its head: mnn-cluster run --name {cluster.name} -- COMMAND; "
          f"bring it down: mnn-cluster down {cluster.name}")
    return 0


def _down(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.all == bool(args.name):
        parser.error("down: name one cluster, or pass --all")
    names = list(list_clusters()) if args.all else [args.name]
    for name in names:
        found = _existing(name)
        if found is None:
            print(f"mnn-cluster: no cluster named {name} (mnn-cluster list shows them)", file=sys.stderr)
            return _EXIT_USAGE
        found.down()
        print(f"cluster {name} is down")
    return 0


def _existing(name: str) -> Cluster | None:
    description = list_clusters().get(name)
    if description is None:
        return None
    return Cluster(description.get("hosts") or 1, slots=description.get("slots") or 1,
                   rate=description.get("rate"), name=name, kept=description.get("owner") == "kept")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run: no command: put it after '--', e.g. mnn-cluster run -- mnn-launch --check "
                     "--hostfile {hostfile}")
    if args.name:
        given = [f"--{option}" for option in ("hosts", "slots", "rate") if getattr(args, option) is not None]
        if given:
            parser.error(f"run: {', '.join(given)} shape a new cluster; cluster {args.name} has its own shape")
        cluster = _existing(args.name)
        if cluster is None:
            parser.error(f"run: no cluster named {args.name} (mnn-cluster up --name {args.name} makes it)")
        return _run_in(cluster, args.on, command)
    remove_leftovers()
    cluster = Cluster(args.hosts or _DEFAULT_HOSTS, slots=args.slots or 1, rate=args.rate)
    signals = _Signals()
    try:
        cluster.up()
        print(f"mnn-cluster: cluster {cluster.name} is up: head and {', '.join(cluster.host_names)}"
              f"{', links capped at ' + cluster.rate if cluster.rate else ''}", file=sys.stderr, flush=True)
        return _run_in(cluster, args.on, command, signals)
    finally:
        cluster.down()
        signals.restore()
        print(f"mnn-cluster: cluster {cluster.name} is down", file=sys.stderr, flush=True)


class _Signals:
    """SIGINT, SIGTERM and SIGHUP while a cluster is up: held until the command runs, then passed on
    to it, so that the cluster always comes down. (Handlers, not SIG_IGN: an ignored signal would stay
    ignored in the command.) Ctrl-C in a terminal reaches the command too; the copy we pass on within
    the same second counts once for mnn-launch and mnn-train."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self.process: subprocess.Popen | None = None
        self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.process is None:
            self.held.append(signum)
        elif self.process.poll() is None:
            self.process.send_signal(signum)

    def pass_on_to(self, process: subprocess.Popen) -> None:
        self.process = process
        for signum in self.held[:1]:
            process.send_signal(signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _run_in(cluster: Cluster, host: str, command: list[str], signals: _Signals | None = None) -> int:
    """Run ``command`` on ``host`` of ``cluster`` to its end, passing signals on to it."""
    command = [word.replace("{hostfile}", str(cluster.hostfile)).replace("{hosts}", cluster.host_list)
               for word in command]
    # This environment's programs first (sudo resets PATH): mnn-launch, mnn-train, mpiexec.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
    env = {**os.environ, "PATH": path, "MNN_CLUSTER_HOSTFILE": str(cluster.hostfile),
           "MNN_CLUSTER_HOSTS": cluster.host_list}
    own = signals is None
    signals = _Signals() if own else signals
    try:
        try:
            process = cluster.popen(host, command, env=env)
        except ValueError as error:
            raise ClusterError(str(error)) from None
        signals.pass_on_to(process)
        return _exit_status(process.wait())
    finally:
        if own:
            signals.restore()


def _exit_status(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
