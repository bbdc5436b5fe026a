"""mnn.distributed.cluster: a cluster of hosts on one machine, to rehearse and test jobs across hosts.

Each host is a Linux network namespace with a host name of its own and an sshd
that listens only on that namespace's address; the hosts and a head (where
mnn-launch runs) are linked through a bridge in a namespace of its own, and the
links can be slowed with ``tc``. Everything the cluster makes lives inside the
namespaces it creates: the machine's own network namespace gets no interface,
address or route, and no namespace has a default route, so nothing leaves.

- ``namespaces``: :class:`Cluster` (bring up, run a command on a host, bring down,
  the faults a test needs) and :func:`remove_leftovers`.

It imports nothing of mnn: it needs root, Debian's iproute2 and openssh-server,
and the standard library. The command line is ``mnn-cluster`` (``mnn.scripts.cluster``).
"""

from mnn.distributed.cluster.namespaces import Cluster, ClusterError, cluster_support, remove_leftovers

__all__ = ["Cluster", "ClusterError", "cluster_support", "remove_leftovers"]
