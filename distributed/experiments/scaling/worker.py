"""The worker of a scaling experiment: what every rank of one of ``mnn-scaling``'s child jobs runs.

The driver (:mod:`mnn.distributed.experiments.scaling.driver`) starts each
child job through the launcher's plan; every rank then runs::

    python -m mnn.distributed.experiments.scaling.worker point SPEC
    python -m mnn.distributed.experiments.scaling.worker collectives SPEC

``SPEC`` is a JSON object. ``point`` trains the MLP of the spec for a number
of steps and times it (:func:`measure_point`); ``collectives`` runs the
all-reduce micro-benchmark (:func:`mnn.distributed.experiments.collectives.run_collectives`).
Rank 0 prints the result as one JSON line after :data:`RESULT_MARKER`, which
the driver looks for in the job's output. Run by hand, the same lines
reproduce one measurement of a report (its "Child jobs" section lists them).
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from mnn.distributed.comm import Communicator, get_communicator, stop_all_on_error
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.experiments.bench import build_step
from mnn.distributed.experiments.collectives import run_collectives
from mnn.distributed.experiments.timing import agree_on_count, time_calls

__all__ = ["RESULT_MARKER", "KINDS", "measure_point", "main"]

#: Rank 0 of a child job prints its result on one line after this marker.
RESULT_MARKER = "MNN-SCALING-RESULT "
#: What a child job can measure: a training point or the all-reduce micro-benchmark.
KINDS = ("point", "collectives")


def _local_batches(spec: Mapping[str, Any], comm: Communicator, dtype: np.dtype) -> tuple[list, int]:
    """This rank's batches, cycled through by the timed steps, and the global batch size.

    Random data by default (the same on every run, different on every rank); with
    a dataset, the first ``n`` global batches of epoch 0 of the sampler, ``n`` up to 8.
    """
    layers = spec["layers"]
    sizes = spec["per_rank_batches"]
    global_batch = sum(sizes)
    if not spec.get("dataset"):
        rng = np.random.default_rng(1000 + comm.rank)
        local = sizes[comm.rank]
        inputs = rng.standard_normal((local, layers[0])).astype(dtype)
        return [(inputs, rng.integers(0, layers[-1], local))], global_batch

    from mnn.datasets import load_dataset
    from mnn.distributed.sampler import GlobalBatchSampler

    data = load_dataset(spec["dataset"])
    data.check_classes(layers[-1])
    features = int(np.prod(data.sample_shape))
    if features != layers[0]:
        raise ValueError(f"dataset {spec['dataset']} has {features} features per sample but --layers starts "
                         f"with {layers[0]}")
    if global_batch > len(data.train):
        raise ValueError(f"the global batch ({global_batch}) is larger than the {len(data.train)} training "
                         f"samples of {spec['dataset']}")
    sampler = GlobalBatchSampler(len(data.train), global_batch, rank=comm.rank, world_size=comm.size, seed=0,
                                 drop_last=True)
    batches = []
    for batch in sampler.batches(0):
        inputs, labels = data.train.batch(batch.indices, dtype=dtype)
        batches.append((inputs.reshape(len(inputs), -1), labels))
        if len(batches) == 8:
            break
    return batches, global_batch


def measure_point(spec: Mapping[str, Any], comm: Communicator) -> dict[str, Any]:
    """Train the MLP of ``spec`` for a fixed number of steps on ``comm``; time it (collective).

    Steps are forward, backward (with ``DataParallel``'s bucketed all-reduce,
    on one rank too, so that every point splits its step alike) and an SGD
    update, built by :func:`mnn.distributed.experiments.bench.build_step` and
    timed by the loop of :mod:`mnn.distributed.experiments.timing`: ``warmup``
    untimed steps, then ``spec["steps"]`` steps or, when None, as many as take
    about ``target_seconds`` (rank 0's estimate, the same on all ranks),
    between two barriers. Returns, on every rank, the step time by the slowest
    rank's clock, throughput, each rank's breakdown from ``DataParallel.timings``
    and its peak resident memory.
    """
    from threadpoolctl import threadpool_limits

    from mnn.model import build_net, mlp_description
    from mnn.optim import SGD

    dtype = np.dtype(spec["dtype"])
    with threadpool_limits(limits=spec["threads_per_rank"]):
        net = build_net(mlp_description(list(spec["layers"])), dtype=dtype, rng=0)
        # Only a choice other than MPI's is passed: the default path is DataParallel's oldest.
        options = {} if spec["allreduce"] == "mpi" else {"allreduce": spec["allreduce"],
                                                         "grad_compression": spec["grad_compression"]}
        batches, global_batch = _local_batches(spec, comm, dtype)
        step, parallel = build_step(net, SGD(net, lr=0.01, momentum=0.9), batches, global_batch, comm,
                                    parallel=True, **options)
        steps = spec["steps"]
        if steps is None:
            steps = agree_on_count(step, comm, spec["target_seconds"], minimum=5, warmup=spec["warmup"])
        else:
            for _ in range(spec["warmup"]):
                step()
        parallel.reset_timings()
        seconds_per_step = max(comm.allgather(time_calls(step, steps, comm)))  # the slowest rank's clock
    return _point_result(comm, parallel, steps, global_batch, seconds_per_step * 1e3)


def _point_result(comm: Communicator, parallel: DataParallel, steps: int, global_batch: int,
                  ms_per_step: float) -> dict[str, Any]:
    """A point's record: the step time and throughput, and each rank's breakdown and memory (collective)."""
    timings = comm.allgather(dict(parallel.timings))
    peak_mb = comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    per_rank = [{"compute_ms": t["compute_s"] * 1e3 / steps,
                 "comm_ms": (t["comm_s"] - t["wait_s"]) * 1e3 / steps,
                 "wait_ms": t["wait_s"] * 1e3 / steps,
                 "optimizer_ms": t["optimizer_s"] * 1e3 / steps} for t in timings]
    breakdown = {key: float(np.mean([rank[key] for rank in per_rank])) for key in per_rank[0]}
    breakdown["other_ms"] = max(0.0, ms_per_step - sum(breakdown.values()))
    return {"ranks": comm.size, "steps": steps, "global_batch": global_batch, "ms_per_step": ms_per_step,
            "samples_per_s": global_batch / (ms_per_step * 1e-3), **breakdown,
            "grad_bytes": int(timings[0]["reduced_bytes"] // steps) if comm.size > 1
            else int(sum(bucket.nbytes for bucket in parallel.buckets)),
            "bucket_bytes": [int(bucket.nbytes) for bucket in parallel.buckets],
            "peak_rss_mb": [round(value, 1) for value in peak_mb], "per_rank": per_rank}


def main(argv: Sequence[str]) -> int:
    """Run one rank of a child job: ``point SPEC`` or ``collectives SPEC`` (JSON); rank 0
    prints the result after :data:`RESULT_MARKER`."""
    kind, spec = argv[0], json.loads(argv[1])
    if kind not in KINDS:
        raise ValueError(f"expected one of {', '.join(KINDS)} as the kind of job, got {kind!r}")
    comm = get_communicator()
    with stop_all_on_error(comm):
        if kind == "point":
            result = measure_point(spec, comm)
        else:
            from threadpoolctl import threadpool_limits
            with threadpool_limits(limits=spec["threads_per_rank"]):
                result = {"records": run_collectives(comm, spec["sizes"], spec["allreduces"],
                                                     spec["seconds_per_size"])}
        if comm.rank == 0:
            print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
