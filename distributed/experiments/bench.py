"""What ``mnn-bench`` measures: training steps of mnn and of PyTorch, timed in alternating rounds.

A benchmark is a set of step functions, one per implementation, each running
one whole training step (forward, backward, update) on a batch it holds; mnn's
step, of the MLP as of the GPT, is made by :func:`build_step`. :func:`measure`
times them in alternating rounds with the timed loop of
:mod:`mnn.distributed.experiments.timing`, so that a machine that slows down
for a while slows every implementation alike, and gives one result dict per
implementation: the median over rounds and its spread. This module holds that
loop, the step builder and the benchmark of the MLP 784-256-10; the GPT's
steps are in :mod:`mnn.distributed.experiments.gpt_bench`. Usage::

    from mnn.distributed.experiments.bench import measure, mlp_steps
    from mnn.distributed.comm import get_communicator
    comm = get_communicator()
    results = measure(mlp_steps(256, comm), comm, batch_size=256)

PyTorch is a reference, never a dependency: builders of PyTorch steps import
it lazily and return None without it. On several ranks PyTorch runs as
DistributedDataParallel over gloo (:func:`torch_process_group`).
"""
from __future__ import annotations

import itertools
import resource
import socket
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np

from mnn import CrossEntropyLossLayer, LinearLayer, ReluLayer, SequentialLayers
from mnn.optim import SGD, Optimizer
from mnn.distributed.comm import Communicator
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.experiments.timing import Spread, agree_on_count, time_calls

__all__ = ["MLP_LAYERS", "Step", "measure", "build_step", "mlp_steps", "build_mlp_step", "build_torch_mlp_step",
           "evaluation_steps", "mlp_evaluation_steps", "sync_and_allreduce_ms", "torch_process_group", "peak_rss_mb",
           "wait_for_idle_cpus", "has_torch", "torch_dtype", "copy_to_torch", "torch_training_step",
           "torch_no_grad_loss"]

#: The widths of the MLP that ``mnn-bench`` times by default.
MLP_LAYERS = (784, 256, 10)

#: One implementation's step: the function running one training step, and the
#: DataParallel whose ``timings`` split it (None on one process and for PyTorch).
Step = tuple[Callable[[], None], DataParallel | None]


# ------------------------------------------------------------------ timing
def measure(steps: dict[str, Step], comm: Communicator, batch_size: int, rounds: int = 5,
            target_ms: float = 300.0) -> list[dict[str, Any]]:
    """Time ``steps`` (implementation name -> :data:`Step`) in alternating rounds.

    1. Warm up the first implementation and time a few of its steps, to choose
       how many steps a round takes (about ``target_ms`` of its work; the same
       on every rank: :func:`~mnn.distributed.experiments.timing.agree_on_count`).
    2. Run one untimed step of each, then ``rounds`` rounds of each in turn,
       each round timed between barriers.
    3. Per implementation: the median ms per step over the rounds, with the
       fastest and slowest round and every round's figure (``round_ms``), and
       samples/s over all ranks. A step run
       through a DataParallel is split into ``compute_ms``, ``comm_ms`` and
       ``wait_ms`` (communication that backward did not hide, and waiting for
       a slower rank), medians too, and ``wait_ms_min`` of the round that
       waited least.

    Collective: every rank calls it with the same implementations.
    """
    first_step = next(iter(steps.values()))[0]
    n_steps = agree_on_count(first_step, comm, target_ms * 1e-3, minimum=5)

    times: dict[str, list[float]] = {impl: [] for impl in steps}
    # DataParallel.timings accumulates seconds under compute_s, comm_s, wait_s.
    breakdowns = {impl: {"compute": [], "comm": [], "wait": []} for impl, (_, parallel) in steps.items()
                  if parallel is not None}
    for step, _ in steps.values():
        step()
    for _ in range(rounds):
        for impl, (step, parallel) in steps.items():
            if parallel is not None:
                parallel.reset_timings()
            times[impl].append(time_calls(step, n_steps, comm) * 1e3)
            if parallel is not None:
                for key, values in breakdowns[impl].items():
                    values.append(parallel.timings[f"{key}_s"] * 1e3 / n_steps)

    results = []
    for impl, samples in times.items():
        ms = Spread.of(samples)
        result = {"impl": impl, "ranks": comm.size, "batch_per_rank": batch_size,
                  "ms_per_step": round(ms.median, 4), "ms_min": round(ms.minimum, 4),
                  "ms_max": round(ms.maximum, 4),
                  "samples_per_s": round(comm.size * batch_size / ms.median * 1e3, 1),
                  "steps_per_round": n_steps, "rounds": rounds}
        for key, values in breakdowns.get(impl, {}).items():
            result[f"{key}_ms"] = round(statistics.median(values), 4)
        if impl in breakdowns:
            # The round with the least waiting comes closest to the all-reduce alone, without
            # the time a rank waits for one that the shared machine slowed down.
            result["wait_ms_min"] = round(min(breakdowns[impl]["wait"]), 4)
        result["round_ms"] = [round(value, 3) for value in samples]
        results.append(result)
    return results


def wait_for_idle_cpus(min_idle: float = 0.95, timeout_s: float = 600.0, sample_s: float = 1.0) -> bool:
    """Return once the machine's CPUs, all together, were at least ``min_idle`` idle over
    ``sample_s`` seconds: True then, False after ``timeout_s`` or where Linux's
    /proc/stat is missing. On a shared machine, a benchmark started so measures
    itself rather than what others run beside it."""
    def idle_and_total() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle and iowait, of all states

    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            idle_before, total_before = idle_and_total()
            time.sleep(sample_s)
            idle_after, total_after = idle_and_total()
            if idle_after - idle_before >= min_idle * max(total_after - total_before, 1):
                return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def peak_rss_mb(comm: Communicator) -> float:
    """The largest peak resident memory over the ranks, in MB (collective)."""
    # ru_maxrss is in KiB on Linux.
    return max(comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def torch_process_group(comm: Communicator) -> None:
    """Join every rank to one gloo process group of PyTorch, unless already in one (collective).

    Rank 0 picks a free port and tells the others; ranks that share a host meet
    on 127.0.0.1.
    """
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        return
    address = None
    if comm.rank == 0:
        with socket.socket() as probe:
            probe.bind(("", 0))
            address = (socket.gethostname(), probe.getsockname()[1])
    host, port = comm.broadcast_object(address)
    same_host = len(set(comm.allgather(socket.gethostname()))) == 1
    host = "127.0.0.1" if same_host else host
    torch_dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=comm.rank,
                                  world_size=comm.size)


def torch_dtype(dtype: Any) -> Any:
    """PyTorch's dtype for a net's NumPy ``dtype`` (float32 or float64)."""
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def copy_to_torch(target: Any, *arrays: np.ndarray) -> None:
    """Copy ``arrays`` (their concatenation, for several) into the PyTorch tensor ``target``
    of the same shape, in place; under ``torch.no_grad()`` for a parameter."""
    import torch

    source = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    assert tuple(target.shape) == source.shape, (target.shape, source.shape)
    target.copy_(torch.from_numpy(np.ascontiguousarray(source)))


def torch_training_step(model: Any, optimizer: Callable[[Any], Any], inputs: np.ndarray, targets: np.ndarray,
                        comm: Communicator) -> Callable[[], None]:
    """A PyTorch training step of ``model`` (``model(inputs, targets)`` is the loss) on this
    rank's batch, one thread: DistributedDataParallel over gloo on several ranks, and the
    optimizer that ``optimizer(parameters)`` makes."""
    import torch

    torch.set_num_threads(1)
    if comm.size > 1:
        torch_process_group(comm)
        model = torch.nn.parallel.DistributedDataParallel(model)
    torch_optimizer = optimizer(model.parameters())
    torch_inputs, torch_targets = torch.from_numpy(inputs), torch.from_numpy(targets)

    def step() -> None:
        torch_optimizer.zero_grad()
        model(torch_inputs, torch_targets).backward()
        torch_optimizer.step()
    return step


def torch_no_grad_loss(model: Any, inputs: np.ndarray, targets: np.ndarray) -> Callable[[], Any]:
    """The loss ``model(inputs, targets)`` under ``torch.no_grad()``, one thread: PyTorch's
    evaluation forward for :func:`evaluation_steps`."""
    import torch

    torch.set_num_threads(1)
    torch_inputs, torch_targets = torch.from_numpy(inputs), torch.from_numpy(targets)

    def forward() -> Any:
        with torch.no_grad():
            return model(torch_inputs, torch_targets)
    return forward


# ------------------------------------------------------------------ the MLP 784-256-10
def _random_batch(batch_size: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + rank)
    inputs = rng.standard_normal((batch_size, MLP_LAYERS[0])).astype(np.float32)
    labels = rng.integers(0, MLP_LAYERS[-1], batch_size)
    return inputs, labels


def build_step(net: SequentialLayers, optimizer: Optimizer, batches: Sequence[tuple[np.ndarray, np.ndarray]],
               global_batch_size: int, comm: Communicator, parallel: bool | None = None,
               **parallel_options: Any) -> Step:
    """One training step of ``net`` (forward, backward, ``optimizer``'s update) and the
    DataParallel that runs it, or None: the step of every benchmark here, MLP or GPT.

    Each call takes the next of this rank's ``batches`` (inputs, labels), round
    and round. ``parallel`` (default: whether ``comm`` has several ranks) runs
    the step through a DataParallel built with ``parallel_options``, whose
    ``timings`` split the step; without it the step is the plain loop a
    single-process user writes.
    """
    batch_cycle = itertools.cycle(batches)
    if not (comm.size > 1 if parallel is None else parallel):
        def step() -> None:
            inputs, labels = next(batch_cycle)
            net.zero_grads()
            net(inputs, labels)
            net.backward()
            optimizer.step()
        return step, None

    data_parallel = DataParallel(net, optimizer, comm, **parallel_options)

    def parallel_step() -> None:  # DataParallel.step clears the gradients itself
        inputs, labels = next(batch_cycle)
        data_parallel(inputs, labels)
        data_parallel.backward(global_batch_size=global_batch_size)
        data_parallel.step()
    return parallel_step, data_parallel


def _mlp() -> SequentialLayers:
    """The benchmark's MLP in mnn, its weights drawn from seed 0."""
    rng = np.random.default_rng(0)
    return SequentialLayers([LinearLayer(MLP_LAYERS[0], MLP_LAYERS[1], rng=rng), ReluLayer(),
                             LinearLayer(MLP_LAYERS[1], MLP_LAYERS[2], rng=rng), CrossEntropyLossLayer()])


def build_mlp_step(batch_size: int, comm: Communicator, overlap: bool = True) -> Step:
    """One mnn SGD step of the MLP on ``batch_size`` random samples per rank, and the
    DataParallel (or None on one process)."""
    net = _mlp()
    return build_step(net, SGD(net, lr=0.01), [_random_batch(batch_size, comm.rank)], comm.size * batch_size,
                      comm, overlap=overlap)


def build_torch_mlp_step(batch_size: int, comm: Communicator) -> Callable[[], None] | None:
    """The same step in PyTorch (DDP over gloo on several ranks), or None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(MLP_LAYERS[0], MLP_LAYERS[1]), torch.nn.ReLU(),
                                torch.nn.Linear(MLP_LAYERS[1], MLP_LAYERS[2]))
    if comm.size > 1:
        torch_process_group(comm)
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    inputs, labels = (torch.from_numpy(array) for array in _random_batch(batch_size, comm.rank))

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
    return step


def mlp_steps(batch_size: int, comm: Communicator, with_torch: bool = True) -> dict[str, Step]:
    """The MLP's steps: "mnn", and "torch" (one process) or "torch-ddp" when PyTorch is there."""
    steps = {"mnn": build_mlp_step(batch_size, comm)}
    torch_step = build_torch_mlp_step(batch_size, comm) if with_torch else None
    if torch_step is not None:
        steps["torch" if comm.size == 1 else "torch-ddp"] = (torch_step, None)
    return steps


def evaluation_steps(build: Callable[[], SequentialLayers], inputs: Any, labels: np.ndarray,
                     torch_loss: Callable[[SequentialLayers], Callable[[], Any]] | None = None) -> dict[str, Step]:
    """The forward of an evaluation, the batch's mean loss, three ways (one process):

    * "mnn-training-forward": a net of ``build()`` in training mode, whose forward
      keeps what backward needs (what evaluation cost before it was inference);
    * "mnn": another in evaluation mode (``set_training(False)``, as
      ``net.evaluating()`` sets it), whose forward keeps nothing;
    * "torch-no-grad": ``torch_loss(net)``, a function computing the same loss in
      PyTorch from ``net``'s weights under ``torch.no_grad()``, when given.
    """
    training, inference = build(), build()
    inference.set_training(False)
    steps = {"mnn-training-forward": (lambda: training(inputs, labels), None),
             "mnn": (lambda: inference(inputs, labels), None)}
    if torch_loss is not None:
        steps["torch-no-grad"] = (torch_loss(inference), None)
    return steps


def mlp_evaluation_steps(batch_size: int, with_torch: bool = True) -> dict[str, Step]:
    """:func:`evaluation_steps` of the MLP on ``batch_size`` random samples; PyTorch's
    ``Sequential`` holds the mnn net's weights."""
    inputs, labels = _random_batch(batch_size, 0)

    def torch_loss(net: SequentialLayers) -> Callable[[], Any]:
        import torch

        torch.set_num_threads(1)
        linears = [torch.nn.Linear(*layer.params["w"].shape[::-1]) for layer in net.layers[::2]]
        with torch.no_grad():
            for module, layer in zip(linears, net.layers[::2]):
                module.weight.copy_(torch.from_numpy(layer.params["w"]))
                module.bias.copy_(torch.from_numpy(layer.params["b"]))
        model = torch.nn.Sequential(linears[0], torch.nn.ReLU(), linears[1])
        torch_inputs, torch_labels = torch.from_numpy(inputs), torch.from_numpy(labels)

        def forward() -> Any:
            with torch.no_grad():
                return torch.nn.functional.cross_entropy(model(torch_inputs), torch_labels)
        return forward
    return evaluation_steps(_mlp, inputs, labels, torch_loss if with_torch and has_torch() else None)


def has_torch() -> bool:
    """Whether PyTorch, the reference, can be imported here."""
    try:
        import torch  # noqa: F401 -- only to know whether the reference can run
    except ImportError:
        return False
    return True


def sync_and_allreduce_ms(batch_size: int, comm: Communicator, repeats: int = 300) -> dict[str, float]:
    """The MLP's gradient synchronisation beside one plain Allreduce of the same bytes.

    Both are timed in the same state, interleaved: right after a forward and
    backward (so caches hold what training leaves there) and after a barrier,
    either ``DataParallel.synchronize()`` (built with ``overlap=False``, so
    every reduction happens inside the timed call; for this model, whose
    gradients fit one bucket, training does the same) or one in-place
    ``comm.allreduce`` of a float32 buffer as large as all the gradients, just
    written like the gradients were. Returns the medians in ms (``sync_ms``,
    ``allreduce_ms``), the median of the ratios of adjacent pairs
    (``sync_vs_allreduce``) and the gradient's size (``grad_mb``).
    """
    _, parallel = build_mlp_step(batch_size, comm, overlap=False)
    inputs, labels = _random_batch(batch_size, comm.rank)
    n_floats = sum(grad.size for _, _, grad in parallel.net.named_params())
    buffer = np.empty(n_floats, dtype=np.float32)

    def plain_allreduce() -> None:
        comm.allreduce(buffer)

    sync, allreduce = [], []
    for _ in range(repeats):
        for times in (sync, allreduce):
            parallel(inputs, labels)
            parallel.backward(global_batch_size=comm.size * batch_size)
            if times is allreduce:
                buffer.fill(1.0)
            times.append(time_calls(parallel.synchronize if times is sync else plain_allreduce, 1, comm,
                                    each_after_barrier=True))
            parallel.step()
    # The ratio of each adjacent pair cancels slow drifts of a shared machine.
    ratio = statistics.median(mine / plain for mine, plain in zip(sync, allreduce))
    return {"grad_mb": round(n_floats * 4 / 2**20, 3), "sync_ms": round(statistics.median(sync) * 1e3, 4),
            "allreduce_ms": round(statistics.median(allreduce) * 1e3, 4), "sync_vs_allreduce": round(ratio, 3)}
