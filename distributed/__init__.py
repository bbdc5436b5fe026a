"""mnn.distributed: everything that knows about ranks.

Communicators (``comm``), the world-size-independent batch sampler
(``sampler``) and the ``DataParallel`` wrapper (``data_parallel``) are
re-exported here; the trainer, checkpoints, job configuration and launcher
live in their own modules (``mnn.distributed.trainer`` and so on). Importing
this package never imports mpi4py: ``get_communicator()`` does, when needed.
"""

from mnn.distributed.comm import (
    Communicator,
    MPICommunicator,
    RankFailure,
    Request,
    SingleProcessCommunicator,
    check_all,
    get_communicator,
    run_all,
    stop_all_on_error,
)
from mnn.distributed.data_parallel import DEFAULT_BUCKET_BYTES, DataParallel, GradientBucket
from mnn.distributed.sampler import GlobalBatchSampler, ShardedBatch, shard_sizes

__all__ = [
    "Communicator", "MPICommunicator", "SingleProcessCommunicator", "Request", "RankFailure",
    "get_communicator", "check_all", "run_all", "stop_all_on_error",
    "DataParallel", "GradientBucket", "DEFAULT_BUCKET_BYTES",
    "GlobalBatchSampler", "ShardedBatch", "shard_sizes",
]
