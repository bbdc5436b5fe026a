"""mnn-bench: time one training step of the MLP 784-256-10, mnn beside PyTorch.

A step is forward + backward + SGD update with ``CrossEntropyLossLayer``, in
float32, on random data, with one BLAS thread per process. One JSON line is
printed per measurement (keys ``impl``, ``ranks``, ``batch_per_rank``,
``ms_per_step``, ``samples_per_s``, ...), and one ``compare`` line per batch
size with the throughput ratio when PyTorch is importable. The two
implementations are timed in alternating rounds within one run, so a noisy
machine slows both alike; each figure is the median over rounds.

Usage::

    mnn-bench                                   # one process: batch 64, 256, 1024
    mnn-bench --batch 256 --rounds 9
    mpiexec -n 2 mnn-bench --batch 256,1024     # data parallel; batch is per rank
    mnn-bench --scaling 1,2 --batch 1024        # launches itself on 1, 2, 1, 2, ... ranks

Under mpiexec each step is split into compute, communication and waiting
(``compute_ms``, ``comm_ms``, ``wait_ms``; waiting includes the time a rank
waits for a slower one). ``sync_ms`` is the gradient synchronisation alone and
``allreduce_ms`` one plain MPI Allreduce of the same number of bytes, timed
alike (see ``_sync_and_allreduce_ms``). ``peak_rss_mb`` is the largest peak
resident memory over the ranks, and PyTorch runs as DistributedDataParallel
over gloo (``impl`` "torch-ddp").
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from mnn import CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.distributed.comm import get_communicator

__all__ = ["main", "build_mnn_step", "build_torch_step", "measure"]

LAYERS = (784, 256, 10)


def _random_batch(batch_size, rank):
    rng = np.random.default_rng(1000 + rank)
    inputs = rng.standard_normal((batch_size, LAYERS[0])).astype(np.float32)
    labels = rng.integers(0, LAYERS[-1], batch_size)
    return inputs, labels


def build_mnn_step(batch_size, comm, overlap=True):
    """A function running one mnn training step, and the DataParallel (or None)."""
    rng = np.random.default_rng(0)
    net = SequentialLayers([LinearLayer(LAYERS[0], LAYERS[1], rng=rng), ReluLayer(),
                            LinearLayer(LAYERS[1], LAYERS[2], rng=rng), CrossEntropyLossLayer()])
    inputs, labels = _random_batch(batch_size, comm.rank)
    if comm.size == 1:
        def step():
            net.zero_grads()
            net(inputs, labels)
            net.backward()
            net.step(0.01)
        return step, None

    from mnn.distributed.data_parallel import DataParallel

    parallel = DataParallel(net, comm=comm, overlap=overlap)

    def step():  # DataParallel.step clears the gradients itself
        parallel(inputs, labels)
        parallel.backward(global_batch_size=comm.size * batch_size)
        parallel.step(0.01)
    return step, parallel


def build_torch_step(batch_size, comm):
    """A function running one PyTorch step (DDP over gloo on several ranks), or None."""
    try:
        import torch
        import torch.distributed as torch_dist
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(LAYERS[0], LAYERS[1]), torch.nn.ReLU(),
                                torch.nn.Linear(LAYERS[1], LAYERS[2]))
    if comm.size > 1:
        if not torch_dist.is_initialized():
            address = None
            if comm.rank == 0:
                with socket.socket() as probe:
                    probe.bind(("", 0))
                    address = (socket.gethostname(), probe.getsockname()[1])
            host, port = comm.broadcast_object(address)
            same_host = len(set(comm.allgather(socket.gethostname()))) == 1
            host = "127.0.0.1" if same_host else host
            torch_dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}",
                                          rank=comm.rank, world_size=comm.size)
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    inputs, labels = (torch.from_numpy(array) for array in _random_batch(batch_size, comm.rank))

    def step():
        optimizer.zero_grad()
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
    return step


def _time_steps(step, n_steps, comm):
    comm.barrier()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    comm.barrier()
    return (time.perf_counter() - start) * 1e3 / n_steps


def _sync_and_allreduce_ms(batch_size, comm, repeats=300):
    """Gradient synchronisation beside one plain Allreduce of the same bytes.

    Both are timed in the same state, interleaved: right after a forward and
    backward (so caches hold what training leaves there) and after a barrier,
    either ``DataParallel.synchronize()`` (built with ``overlap=False``, so
    every reduction happens inside the timed call; for this model, whose
    gradients fit one bucket, training does the same) or one in-place
    ``comm.allreduce`` of a float32 buffer as large as all the gradients, just
    written like the gradients were. Returns the medians in ms and the median
    of the ratios of adjacent pairs.
    """
    step, parallel = build_mnn_step(batch_size, comm, overlap=False)
    inputs, labels = _random_batch(batch_size, comm.rank)
    n_floats = sum(grad.size for _, _, grad in parallel.net.named_params())
    buffer = np.empty(n_floats, dtype=np.float32)
    sync, allreduce = [], []
    for _ in range(repeats):
        for times in (sync, allreduce):
            parallel(inputs, labels)
            parallel.backward(global_batch_size=comm.size * batch_size)
            if times is allreduce:
                buffer.fill(1.0)
            comm.barrier()
            start = time.perf_counter()
            if times is sync:
                parallel.synchronize()
            else:
                comm.allreduce(buffer)
            times.append(time.perf_counter() - start)
            parallel.step(0.01)
    # The ratio of each adjacent pair cancels slow drifts of a shared machine.
    ratio = statistics.median(mine / plain for mine, plain in zip(sync, allreduce))
    return statistics.median(sync) * 1e3, statistics.median(allreduce) * 1e3, ratio, n_floats


def _peak_rss_mb(comm):
    # ru_maxrss is in KiB on Linux.
    return max(comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measure(batch_size, comm, rounds=5, target_ms=300.0, with_torch=True):
    """Alternate mnn and PyTorch steps; return one result dict per implementation."""
    steps = {"mnn": build_mnn_step(batch_size, comm)}
    torch_step = build_torch_step(batch_size, comm) if with_torch else None
    if torch_step is not None:
        steps["torch" if comm.size == 1 else "torch-ddp"] = (torch_step, None)

    # Enough steps per round for about target_ms of work, the same on all ranks.
    mnn_step, parallel = steps["mnn"]
    for _ in range(3):
        mnn_step()
    probe_ms = _time_steps(mnn_step, 3, comm)
    n_steps = max(5, int(target_ms / max(probe_ms, 1e-3)))
    n_steps = comm.broadcast_object(n_steps)

    times = {impl: [] for impl in steps}
    # DataParallel.timings accumulates seconds under compute_s, comm_s, wait_s.
    breakdown = {"compute": [], "comm": [], "wait": []}
    for impl, (step, _) in steps.items():
        step()
    for _ in range(rounds):
        for impl, (step, _) in steps.items():
            if impl == "mnn" and parallel is not None:
                parallel.reset_timings()
            times[impl].append(_time_steps(step, n_steps, comm))
            if impl == "mnn" and parallel is not None:
                for key, values in breakdown.items():
                    values.append(parallel.timings[f"{key}_s"] * 1e3 / n_steps)

    results = []
    for impl, samples in times.items():
        ms = statistics.median(samples)
        result = {"impl": impl, "ranks": comm.size, "batch_per_rank": batch_size,
                  "ms_per_step": round(ms, 4),
                  "samples_per_s": round(comm.size * batch_size / ms * 1e3, 1),
                  "steps_per_round": n_steps, "rounds": rounds}
        if comm.size > 1 and impl == "mnn":
            result.update({f"{key}_ms": round(statistics.median(values), 4)
                           for key, values in breakdown.items()})
            sync_ms, allreduce_ms, ratio, n_floats = _sync_and_allreduce_ms(batch_size, comm)
            result.update({"grad_mb": round(n_floats * 4 / 2**20, 3), "sync_ms": round(sync_ms, 4),
                           "allreduce_ms": round(allreduce_ms, 4), "sync_vs_allreduce": round(ratio, 3)})
        results.append(result)
    peak = _peak_rss_mb(comm)
    for result in results:
        result["peak_rss_mb"] = round(peak, 1)
    return results


def _parse_ints(text):
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(kind):
    """An argparse type: a number of ``kind`` greater than zero."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _parser():
    parser = argparse.ArgumentParser(
        prog="mnn-bench", description=__doc__.split("\n\n")[0],
        epilog="Run under 'mpiexec -n N' for the data-parallel figures; see the README for the tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=_parse_ints, default=[64, 256, 1024],
                        help="per-rank batch sizes, comma-separated (default 64,256,1024)")
    parser.add_argument("--rounds", type=_positive(int), default=5, help="alternating rounds per batch size (default 5)")
    parser.add_argument("--target-ms", type=_positive(float), default=300.0,
                        help="approximate length of one timed round in ms (default 300)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--scaling", type=_parse_ints, metavar="N,N,...",
                        help="run this benchmark under mpiexec for each rank count and print weak-scaling efficiency")
    parser.add_argument("--repeats", type=_positive(int), default=3,
                        help="with --scaling: turns over the rank counts; the speedup is their median (default 3)")
    return parser


def _run_scaling(args):
    """Launch the benchmark on each rank count; summarise weak scaling against the first.

    The rank counts take turns ``--repeats`` times (1, 2, 1, 2, ...), so a
    machine that slows down for a while slows each count alike; the speedup is
    the median over the turns. Returns the exit status: that of the first run
    that failed, else 0.
    """
    from mnn.distributed.launch import find_mpiexec

    base = [sys.executable, "-m", "mnn.scripts.bench", "--batch", ",".join(map(str, args.batch)),
            "--rounds", str(args.rounds), "--target-ms", str(args.target_ms)]
    if args.no_torch:
        base.append("--no-torch")
    mpiexec = find_mpiexec() if max(args.scaling) > 1 else None
    throughput = {}  # (ranks, batch) -> samples/s of each turn
    for _ in range(args.repeats):
        for ranks in args.scaling:
            command = base if ranks == 1 else [mpiexec, "-n", str(ranks), *base]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"mnn-bench: the run on {ranks} rank(s) failed (exit {run.returncode}):\n{run.stderr}",
                      file=sys.stderr, flush=True)
                return run.returncode
            for line in run.stdout.splitlines():
                print(line, flush=True)
                record = json.loads(line) if line.startswith("{") else {}
                if record.get("impl") == "mnn":
                    throughput.setdefault((ranks, record["batch_per_rank"]), []).append(record["samples_per_s"])
    first = args.scaling[0]
    for (ranks, batch), samples in sorted(throughput.items()):
        reference = throughput[(first, batch)]
        if ranks != first:
            speedup = statistics.median(mine / theirs for mine, theirs in zip(samples, reference))
            print(json.dumps({"compare": f"mnn {ranks} ranks / {first} rank(s)", "batch_per_rank": batch,
                              "speedup": round(speedup, 3), "repeats": len(samples),
                              "weak_scaling_efficiency": round(speedup * first / ranks, 3)}), flush=True)
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.scaling:
        try:
            return _run_scaling(args)
        except RuntimeError as error:  # no mpiexec to launch the runs with
            print(f"mnn-bench: --scaling needs MPI: {error}", file=sys.stderr, flush=True)
            return 2
    comm = get_communicator()
    with threadpool_limits(limits=1):
        if comm.rank == 0:
            blas = [(info["internal_api"], info.get("architecture"), info["num_threads"])
                    for info in threadpool_info()]
            print(json.dumps({"machine": socket.gethostname(), "cores": os.cpu_count(), "blas": blas,
                              "numpy": np.__version__}), flush=True)
        for batch_size in args.batch:
            results = measure(batch_size, comm, rounds=args.rounds, target_ms=args.target_ms,
                              with_torch=not args.no_torch)
            if comm.rank != 0:
                continue
            for result in results:
                print(json.dumps(result), flush=True)
            if len(results) == 2:
                mnn_result, torch_result = results
                print(json.dumps({"compare": f"mnn / {torch_result['impl']}", "ranks": comm.size,
                                  "batch_per_rank": batch_size,
                                  "throughput_ratio": round(mnn_result["samples_per_s"]
                                                            / torch_result["samples_per_s"], 3)}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
