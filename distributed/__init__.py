"""mnn.distributed: everything that knows about ranks, in five parts.

- this folder, the data-parallel core: communicators (``comm``), the global batch
  sampler (``sampler``), the ``DataParallel`` wrapper (``data_parallel``) and its ring
  all-reduce (``ring``), the timeline of a step (``timeline``), the stall watchdog
  (``watchdog``) and the environment variables a launcher sets (``environment``).
  The core imports only the layer library ``mnn``.
- ``training/``: the mnn-train service (the loop, its job file, checkpoints, reports).
  It imports the core and ``mnn``.
- ``launch/``: what mnn-launch does (hosts, MPI, the job's command, its processes).
  It imports nothing of mnn but the core's ``environment``, so it starts without NumPy.
- ``cluster/``: a cluster of hosts on one machine (network namespaces with their own
  sshd), to rehearse and test jobs across hosts. The standard library only.
- ``experiments/``: benchmarks, scaling runs, the cost model and their reports. They
  import all of the above.

Imports point one way, ``experiments -> training -> core -> mnn`` and
``launch -> environment``, and ``cluster`` imports nothing of mnn; ``tests/test_imports.py`` keeps it so.

The core's public names are importable from here, loaded on first use (PEP 562),
so that importing a subpackage (the launcher) does not load NumPy. Importing this
package never imports mpi4py: ``get_communicator()`` does, when needed.
"""
from mnn.lazy import lazy_names

_SOURCES = {
    **dict.fromkeys(["Communicator", "MPICommunicator", "SingleProcessCommunicator", "Request",
                     "RankFailure", "get_communicator", "check_all", "run_all", "stop_all_on_error"],
                    "mnn.distributed.comm"),
    **dict.fromkeys(["DataParallel", "GradientBucket", "DEFAULT_BUCKET_BYTES"], "mnn.distributed.data_parallel"),
    **dict.fromkeys(["GlobalBatchSampler", "ShardedBatch", "shard_sizes"], "mnn.distributed.sampler"),
}

__all__ = list(_SOURCES)

__getattr__, __dir__ = lazy_names(__name__, _SOURCES, globals())
