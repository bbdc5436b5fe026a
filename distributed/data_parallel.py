r"""DataParallel: train one ``SequentialLayers`` replica per rank as if on one process.

Every rank holds the whole net and runs it on its shard of each global batch.
With shard sizes :math:`b_r` summing to :math:`B`, each rank's local gradient
:math:`g_r` is the mean over its :math:`b_r` samples, so the gradient of the
global batch mean is

.. math::
    g = \frac{1}{B} \sum_i \nabla \ell_i = \sum_r \frac{b_r}{B}\, g_r. \tag{1}

Each rank weights its loss by :math:`b_r / B` before backward (the loss layer
multiplies its gradient by that number, ``net.backward(scale=...)``, so no
pass over the gradients is needed) and the ranks sum the gradients with one
all-reduce: exact for uneven shards, and a rank with an empty shard adds zeros.

Gradients live in a few large contiguous *buckets* (one series per dtype):
each layer's ``grads`` arrays are views into a bucket, so a bucket is reduced
without packing copies. Buckets are filled in reverse layer order, the order
in which backward finishes them, and a bucket's non-blocking all-reduce starts
as soon as its last layer's backward is done, while earlier layers still
compute. The bucket holding the first layer is done only when backward is, so
it is reduced with one blocking all-reduce. ``step()`` finishes the
reductions and runs the optimizer.

The all-reduce is MPI's (``allreduce="mpi"``, the default: the library picks
its algorithm by message size) or mnn's own ring (``allreduce="ring"``,
:mod:`~mnn.distributed.ring`: bandwidth-optimal, and the only one that can
send float16, ``grad_compression="fp16"``). The ring is built from blocking
point-to-point messages, so with it every bucket is reduced in
``synchronize()``, after backward: it does not overlap backward, and suits
nets whose gradient sits in one bucket anyway, or links where bandwidth,
not overlap, decides. Both sum exactly what Eq. (1) and (2) say, in another
order of the additions; with float16 on the wire each partial sum is rounded
to float16 on its way (relative error at most :math:`2^{-11}` per hop; see
the ring's Eq. 5), so Eq. (1) and (2) then hold to that precision.

Layers whose forward depends on the whole batch (``BatchNormLayer``) get a
batch reduction from the wrapper (``net.set_batch_reduction``): a blocking
all-reduce sum of a few float64 numbers per channel, so that their statistics
are those of the global batch, as one process computes them. It runs on a
duplicate of the communicator (made at its first use, by every rank at the same
forward), so it never matches the gradient buckets' non-blocking all-reduces
still in flight while backward runs, nor the ring's messages; and it is MPI's
Allreduce whatever ``allreduce`` says: a handful of numbers is a latency, which
the ring would multiply by 2(N - 1), and statistics must not be sent in float16.
It is exact for uneven shards because each rank's backward starts from the
gradient of the global loss (the weight :math:`b_r / B` of Eq. (1)). A rank with
an empty shard takes its part with zeros (``net.forward_no_samples()``,
``net.backward_no_samples()``). Evaluation forwards reduce nothing: they use
the running statistics, which are equal on every rank.

A :class:`~mnn.distributed.timeline.Timeline` (``timeline=``) receives a span
for each forward, backward, bucket all-reduce, wait and optimizer step.

Gradient accumulation over micro-batches (``no_sync``) stays exact. With
micro-batches :math:`j = 1, 2, \dots` of global sizes :math:`B_j` and local
sizes :math:`b_{rj}`, and :math:`W_j = B_1 + \dots + B_j`, each rank keeps
:math:`R_r^{(j)} = \frac{1}{W_j} \sum_{i \le j} b_{ri}\, g_{ri}` in its buckets:

.. math::
    R_r^{(j)} = \frac{W_{j-1}}{W_j} R_r^{(j-1)} + \frac{b_{rj}}{W_j}\, g_{rj}. \tag{2}

The second term is backward with the loss weighted by :math:`b_{rj} / W_j`;
the first is one pass over the buckets, needed only from the second
micro-batch on. After the last one, :math:`\sum_r R_r` is the gradient of the
mean loss over all :math:`W` samples, as Eq. (1) with :math:`B = W`.

Usage (on every rank)::

    dp = DataParallel(net, SGD(net, lr=0.1), comm=get_communicator())
    for batch in sampler.batches(epoch):
        loss = dp(x[batch.indices], y[batch.indices])
        dp.backward(global_batch_size=batch.global_batch_size)
        dp.step()

Accumulating ``k`` micro-batches, communicating once::

    for micro in micro_batches[:-1]:
        with dp.no_sync():
            dp(x[micro.indices], y[micro.indices]); dp.backward(micro.global_batch_size)
    dp(x[last.indices], y[last.indices]); dp.backward(last.global_batch_size)
    dp.step()
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import numpy as np

from mnn.distributed.comm import Communicator, Request, get_communicator
from mnn.distributed.ring import COMPRESSIONS, RingAllreduce
from mnn.distributed.timeline import Timeline
from mnn.checks import check_choice, is_int

__all__ = ["DataParallel", "GradientBucket", "DEFAULT_BUCKET_BYTES", "ALLREDUCE_ALGORITHMS"]

# Large enough that per-message latency does not dominate, small enough that a
# net of several such layers gets several buckets to overlap with backward.
# (The digits/MNIST MLPs have under 1 MB of gradients: one bucket by default.)
DEFAULT_BUCKET_BYTES = 2 * 2**20
#: Values of ``allreduce``: MPI's Allreduce/Iallreduce, or mnn's ring (distributed/ring.py).
ALLREDUCE_ALGORITHMS = ("mpi", "ring")

_TIMING_KEYS = ("compute_s", "comm_s", "wait_s", "optimizer_s", "steps", "reduced_bytes")


class GradientBucket:
    """One contiguous gradient buffer and the parameters whose gradients are views into it.

    ``names`` are in the order of the buffer; ``ready_after`` is the index of
    the layer whose backward completes the bucket (its lowest layer index).
    """

    def __init__(self, dtype: np.dtype, names: list[str], shapes: list[tuple[int, ...]],
                 ready_after: int):
        self.dtype = np.dtype(dtype)
        self.names = list(names)
        self.ready_after = ready_after
        sizes = [int(np.prod(shape)) for shape in shapes]
        self.buffer = np.zeros(sum(sizes), dtype=self.dtype)
        offsets = np.cumsum([0] + sizes)
        self.views = {name: self.buffer[start:end].reshape(shape)
                      for name, shape, start, end in zip(names, shapes, offsets[:-1], offsets[1:])}

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def __repr__(self) -> str:
        return (f"GradientBucket({self.dtype}, {self.nbytes} bytes, ready after layer "
                f"{self.ready_after}, {self.names})")


def _plan_buckets(net: Any, bucket_bytes: int) -> list[GradientBucket]:
    """Group gradients into buckets per dtype, walking layers from last to first.

    A layer's gradients of one dtype never straddle two buckets (the bucket can
    only start after the whole layer is done anyway); a layer larger than
    ``bucket_bytes`` gets a bucket of its own.
    """
    # A parameter named "3.Residual.0.LinearLayer.w" belongs to layer 3 of the
    # net, whose backward (and with it the hook) is done once layer 3 is done.
    per_layer: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name, _, grad in net.named_params():
        per_layer.setdefault(int(name.split(".", 1)[0]), []).append((name, grad))

    buckets: list[GradientBucket] = []
    open_buckets: dict[np.dtype, dict[str, Any]] = {}

    def close(dtype: np.dtype) -> None:
        plan = open_buckets.pop(dtype)
        buckets.append(GradientBucket(dtype, plan["names"], plan["shapes"], plan["ready_after"]))

    for index in sorted(per_layer, reverse=True):
        by_dtype: dict[np.dtype, list[tuple[str, np.ndarray]]] = {}
        for name, grad in per_layer[index]:
            by_dtype.setdefault(grad.dtype, []).append((name, grad))
        for dtype, entries in by_dtype.items():
            layer_bytes = sum(grad.nbytes for _, grad in entries)
            plan = open_buckets.get(dtype)
            if plan is not None and plan["nbytes"] + layer_bytes > bucket_bytes:
                close(dtype)
                plan = None
            if plan is None:
                plan = open_buckets[dtype] = {"names": [], "shapes": [], "nbytes": 0}
            plan["names"] += [name for name, _ in entries]
            plan["shapes"] += [grad.shape for _, grad in entries]
            plan["nbytes"] += layer_bytes
            plan["ready_after"] = index
    for dtype in list(open_buckets):
        close(dtype)
    # Start order must be the same on every rank: by readiness, then dtype name.
    buckets.sort(key=lambda bucket: (-bucket.ready_after, bucket.dtype.str))
    return buckets


class _BatchStatisticsSum:
    """``reduce(array)`` for layers with batch statistics: the sum of ``array`` over the
    ranks, in place, with a blocking all-reduce on a duplicate of ``comm``. The duplicate
    is made at the first call, which every rank reaches in the same forward, so a net
    without such layers never costs a communicator."""

    def __init__(self, comm: Communicator):
        self._comm = comm
        self._duplicate: Communicator | None = None

    def __call__(self, array: np.ndarray) -> np.ndarray:
        if self._duplicate is None:
            self._duplicate = self._comm.duplicate()
        return self._duplicate.allreduce(_contiguous(array))


def _contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` itself when C-contiguous, else a copy; keeps 0-d arrays 0-d
    (``np.ascontiguousarray`` would make them 1-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _describe_params(net: Any) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(param.shape), param.dtype.name) for name, param, _ in net.named_params()]


def _first_difference(reference: list, other: list) -> str:
    """Say how ``other``'s parameter list differs from ``reference``'s (rank 0's)."""
    reference_by_name = {name: (shape, dtype) for name, shape, dtype in reference}
    other_by_name = {name: (shape, dtype) for name, shape, dtype in other}
    for name, shape, dtype in reference:
        if name not in other_by_name:
            return f"parameter {name!r} is missing (rank 0 has it with shape {shape}, dtype {dtype})"
        if other_by_name[name] != (shape, dtype):
            got_shape, got_dtype = other_by_name[name]
            return (f"parameter {name!r} has shape {got_shape}, dtype {got_dtype}; "
                    f"rank 0 has shape {shape}, dtype {dtype}")
    extra = sorted(set(other_by_name) - set(reference_by_name))
    if extra:
        return f"parameter {extra[0]!r} exists only there, not on rank 0"
    return "parameters are listed in a different order than on rank 0"


class DataParallel:
    """Data-parallel training of ``net`` over the ranks of ``comm``.

    ``net``: a ``SequentialLayers`` whose last layer is a loss; cast it
    (``net.astype``) before wrapping, since the wrapper moves its gradients into
    buckets. ``optimizer``: an mnn optimizer over ``net``, or ``None`` for
    ``net.step(lr)``. ``comm``: anything ``get_communicator`` accepts.
    ``bucket_bytes``: the largest bucket, unless one layer alone is larger.
    ``overlap=False`` reduces every bucket with blocking calls after backward (for comparison).
    ``allreduce``: "mpi" or "ring" (blocking, after backward: no overlap).
    ``grad_compression``: "none", or "fp16" for float16 on the wire; only with
    the ring (MPI has no portable float16 sum, so MPI would have to add in
    float16; the ring adds in the gradients' dtype). ``timeline``: a
    :class:`~mnn.distributed.timeline.Timeline` to record spans into, or None.

    Construction is collective. It checks that every rank has the same parameter
    names, shapes and dtypes (``ValueError`` on every rank otherwise), broadcasts
    rank 0's parameters and optimizer state, and clears the gradients.
    """

    def __init__(self, net: Any, optimizer: Any = None, comm: Any = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True, allreduce: str = "mpi",
                 grad_compression: str = "none", timeline: Timeline | None = None):
        if not hasattr(net, "named_params") or not hasattr(net, "rebind_grads"):
            raise TypeError(f"DataParallel: expected a SequentialLayers, got {type(net).__name__}")
        if not (is_int(bucket_bytes) and bucket_bytes >= 1):
            raise ValueError(f"DataParallel: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        if optimizer is not None and getattr(optimizer, "net", net) is not net:
            raise ValueError("DataParallel: the optimizer was built for another net")
        check_choice("allreduce", allreduce, ALLREDUCE_ALGORITHMS)
        check_choice("grad_compression", grad_compression, COMPRESSIONS)
        if grad_compression != "none" and allreduce != "ring":
            raise ValueError(f"grad_compression: {grad_compression} needs allreduce='ring' "
                             f"(MPI's Allreduce has no portable float16 sum), got allreduce={allreduce!r}")
        self.net = net
        self.optimizer = optimizer
        self.comm: Communicator = get_communicator(comm)
        self.bucket_bytes = int(bucket_bytes)
        self.overlap = bool(overlap)
        self.allreduce = allreduce
        self.grad_compression = grad_compression
        # Disabled or absent, there is nothing to feed: every hook checks this one attribute.
        self._timeline = timeline if timeline is not None and timeline.enabled else None

        self._check_same_params_everywhere()
        self.broadcast_state()
        net.zero_grads()
        self.buckets = _plan_buckets(net, self.bucket_bytes)
        net.rebind_grads({name: view for bucket in self.buckets for name, view in bucket.views.items()})
        self._bound_grads = {name: grad for name, _, grad in net.named_params()}
        assert all(self._bound_grads[name] is view for bucket in self.buckets
                   for name, view in bucket.views.items()), "rebind_grads did not bind the bucket views"
        # A bucket completed by a layer other than the first is all-reduced with a
        # non-blocking call from the backward hook, overlapping the layers still
        # to compute. The bucket of the first layer is complete only when backward
        # ends: nothing is left to overlap with, so synchronize() reduces it with
        # a plain blocking call (less work than starting one and waiting on it).
        # MPI matches collectives by their order on every rank, and a blocking
        # call never matches a non-blocking one: every rank therefore makes the
        # same calls in the same order (an empty shard's rank, whose backward
        # does not run, starts its non-blocking ones in synchronize()).
        # The ring is blocking, so it reduces every bucket there.
        self._overlapped = [bucket for bucket in self.buckets
                            if self.overlap and allreduce == "mpi" and bucket.ready_after > 0]
        self._blocking = [(bucket, self._blocking_reduction(bucket))
                          for bucket in self.buckets if bucket not in self._overlapped]
        self._buckets_ready_after: dict[int, list[GradientBucket]] = {}
        for bucket in self._overlapped:
            self._buckets_ready_after.setdefault(bucket.ready_after, []).append(bucket)
        self._timeline_tracks = self._name_timeline_tracks()
        # One process needs no reduction: its batch is the global batch.
        net.set_batch_reduction(_BatchStatisticsSum(self.comm) if self.comm.size > 1 else None)

        self._sync = True
        self._forward_count: int | None = None
        self._reset_window()
        self.timings: dict[str, float] = {}
        self.reset_timings()

    # -- construction helpers -----------------------------------------------------

    def _check_same_params_everywhere(self) -> None:
        """Raise the same ValueError on every rank unless all ranks hold the same parameters."""
        mine = {"params": _describe_params(self.net),
                "optimizer": None if self.optimizer is None else type(self.optimizer).__name__}
        everyone = self.comm.allgather(mine)
        reference = everyone[0]
        problems = []
        for rank, theirs in enumerate(everyone[1:], start=1):
            if theirs["params"] != reference["params"]:
                problems.append(f"rank {rank}: {_first_difference(reference['params'], theirs['params'])}")
            if theirs["optimizer"] != reference["optimizer"]:
                problems.append(f"rank {rank}: optimizer {theirs['optimizer']}, "
                                f"rank 0 has {reference['optimizer']}")
        if problems:
            raise ValueError("DataParallel: the ranks do not hold the same model:\n  "
                             + "\n  ".join(problems))

    def _blocking_reduction(self, bucket: GradientBucket) -> Callable[[np.ndarray], np.ndarray]:
        """The blocking in-place sum over the ranks that synchronize() applies to ``bucket``'s buffer."""
        if self.allreduce == "ring":
            return RingAllreduce(self.comm, bucket.buffer.size, bucket.dtype, self.grad_compression).allreduce
        return self.comm.allreduce

    def _name_timeline_tracks(self) -> dict[GradientBucket, tuple[int, dict[str, Any]]]:
        """Each bucket's track on the timeline (after the step track) and the args of its spans."""
        if self._timeline is None:
            return {}
        tracks = {}
        for index, bucket in enumerate(self.buckets, start=1):
            self._timeline.name_track(index, f"all-reduce bucket {index - 1}")
            tracks[bucket] = (index, {"bucket": index - 1, "bytes": bucket.nbytes, "algorithm": self.allreduce,
                                      "compression": self.grad_compression})
        return tracks

    def broadcast_state(self) -> None:
        """Copy rank 0's parameters, buffers and optimizer state to every rank (collective).

        Parameters, then buffers (BatchNorm's running statistics), go in sorted-name
        order. The optimizer state takes rank 0's keys too, so a state that rank 0
        alone loaded from a checkpoint is adopted.
        """
        params = {name: param for name, param, _ in self.net.named_params()}
        for name in sorted(params):
            self._broadcast_in_place(params[name])
        buffers = {name: layer.buffers[key] for name, layer, key in self.net.buffer_slots()}
        for name in sorted(buffers):
            self._broadcast_in_place(buffers[name])
        if self.optimizer is None:
            return
        state = self.optimizer.state_dict()
        layout = self.comm.broadcast_object(
            {key: (value.shape, value.dtype.str) for key, value in state.items()}
            if self.comm.rank == 0 else None)
        received = {}
        for key in sorted(layout):
            shape, dtype = layout[key]
            value = state[key] if self.comm.rank == 0 else np.empty(shape, dtype=dtype)
            received[key] = self.comm.broadcast(_contiguous(value), root=0)
        if self.comm.rank != 0:
            self.optimizer.load_state_dict(received)

    def _broadcast_in_place(self, array: np.ndarray) -> None:
        contiguous = _contiguous(array)
        self.comm.broadcast(contiguous, root=0)
        if contiguous is not array:
            array[...] = contiguous

    # -- training --------------------------------------------------------------------

    def __call__(self, inputs: np.ndarray, targets: np.ndarray | None = None) -> Any:
        return self.forward(inputs, targets)

    def forward(self, inputs: np.ndarray, targets: np.ndarray | None = None) -> Any:
        """Run the local net on this rank's shard; return its (local mean) loss.

        An empty shard returns a loss of 0.0 without running the net (a mean over
        no samples is undefined; its weight ``b_r / B`` in the global loss is 0);
        its layers with batch statistics add zeros to the other ranks' sums.
        """
        start = time.perf_counter()
        count = len(inputs)
        if targets is not None:
            self._forward_count = count
            if count == 0:
                self.net.forward_no_samples()
                return 0.0
        result = self.net(inputs, targets)
        end = time.perf_counter()
        self.timings["compute_s"] += end - start
        if self._timeline is not None:
            self._timeline.span("forward", start, end)
        return result

    def backward(self, global_batch_size: int | None = None,
                 local_batch_size: int | None = None) -> None:
        """Backpropagate this rank's shard; weight and (unless in ``no_sync``) reduce.

        ``global_batch_size``: samples of this (micro-)batch over all ranks; when
        omitted it is summed over the ranks with an extra small collective.
        ``local_batch_size``: this rank's samples, by default those of the last
        ``forward``. Collective: every rank calls it, also with an empty shard.
        """
        if self._reduced or self._sync_backward_done:
            raise RuntimeError("DataParallel.backward: this step's gradients are already being "
                               "reduced; call step() before the next backward")
        if local_batch_size is None:
            if self._forward_count is None:
                raise RuntimeError("DataParallel.backward: called before a forward with targets")
            local_batch_size = self._forward_count
        local_batch_size = int(local_batch_size)
        if global_batch_size is None:
            counts = np.array([local_batch_size], dtype=np.int64)
            global_batch_size = int(self.comm.allreduce(counts)[0])
        global_batch_size = int(global_batch_size)
        if not 0 <= local_batch_size <= global_batch_size or global_batch_size == 0:
            raise ValueError(f"DataParallel.backward: expected 0 <= local_batch_size <= "
                             f"global_batch_size and global_batch_size > 0, got local "
                             f"{local_batch_size}, global {global_batch_size}")
        self._check_bindings()
        self._forward_count = None
        window = self._window_global + global_batch_size
        if self._window_global:
            self._rescale(self._window_global / window)  # Eq. (2), first term
        self._window_global = window

        start = time.perf_counter()
        comm_before = self.timings["comm_s"]
        if local_batch_size > 0:
            hook = self._on_layer_done if self._sync and self._buckets_ready_after else None
            self.net.backward(hook=hook, scale=local_batch_size / window)  # Eq. (1), (2)
        else:
            self.net.backward_no_samples()
        end = time.perf_counter()
        self.timings["compute_s"] += (end - start) - (self.timings["comm_s"] - comm_before)
        if self._timeline is not None:
            self._timeline.span("backward", start, end)
        self._sync_backward_done = self._sync

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the next backward outside it reduces them all.

        Exactness (Eq. 2) holds for any micro-batch sizes, as long as each
        backward is given its micro-batch's global size.
        """
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def synchronize(self) -> None:
        """Finish the reduction: afterwards every rank's grads hold the global gradient.

        Starts the non-blocking reductions that backward did not (an empty
        shard, or backward calls inside ``no_sync`` only), reduces the buckets
        left for blocking calls (all of them with the ring), then waits for all.
        """
        if self._reduced:
            return
        if self._window_global == 0:
            raise RuntimeError("DataParallel.synchronize: no backward since the last step")
        start = time.perf_counter()
        self._start_pending()
        for bucket, reduce in self._blocking:
            began = time.perf_counter() if self._timeline is not None else 0.0
            reduce(bucket.buffer)
            self.timings["reduced_bytes"] += bucket.nbytes
            if self._timeline is not None:
                self._timeline.span("all-reduce", began, time.perf_counter(), *self._timeline_tracks[bucket])
        if self._timeline is None:
            Request.wait_all(self._requests)
        else:
            self._record_reductions_done(wait=True)
        end = time.perf_counter()
        self.timings["wait_s"] += end - start
        self.timings["comm_s"] += end - start
        if self._timeline is not None:
            self._timeline.span("wait", start, end)
        self._requests = []
        self._reduced = True

    def step(self, lr: float | None = None) -> None:
        """Synchronize, update the parameters, clear the gradients (collective).

        With an optimizer ``lr`` must be omitted (set ``optimizer.lr``);
        without one, ``net.step(lr)`` is used and ``lr`` is required.
        """
        if self.optimizer is not None and lr is not None:
            raise ValueError("DataParallel.step: lr is the optimizer's; set optimizer.lr instead")
        if self.optimizer is None and lr is None:
            raise ValueError("DataParallel.step: without an optimizer, pass lr")
        self.synchronize()
        start = time.perf_counter()
        if self.optimizer is not None:
            self.optimizer.step()
        else:
            self.net.step(lr)
        self.zero_grads()
        end = time.perf_counter()
        self.timings["optimizer_s"] += end - start
        self.timings["steps"] += 1
        if self._timeline is not None:
            self._timeline.span("optimizer", start, end)

    def zero_grads(self) -> None:
        """Clear the gradients and forget the accumulated (unreduced) micro-batches.

        Collective after a backward outside ``no_sync`` that was not reduced:
        the reductions other ranks started must be matched and finished here,
        or they would pair with the next step's.
        """
        if self._sync_backward_done and not self._reduced:
            self._start_pending()
        # An in-flight reduction still writes into the buckets.
        Request.wait_all(self._requests)
        self.net.zero_grads()
        self._reset_window()

    def gradients_finite(self) -> bool:
        """Whether every reduced gradient is a finite number (after :meth:`synchronize`,
        the same answer on every rank). One dot product per bucket: NaN and infinities
        propagate into it, so a single pass finds them (about 17 us for the 0.8 MB of
        the MLP 784-256-10); a gradient so large that its squared norm overflows counts
        as not finite too."""
        return all(np.isfinite(np.dot(bucket.buffer, bucket.buffer)) for bucket in self.buckets)

    def reset_timings(self) -> None:
        """Zero the counters in ``timings``.

        ``compute_s``: forward and backward, without the communication calls
        made from inside backward; ``comm_s``: time in communication calls
        (starting reductions, and waiting); ``wait_s``: the part of ``comm_s``
        spent blocked in ``synchronize``, i.e. communication that backward did
        not hide; ``optimizer_s``: update and clearing; ``steps``; ``reduced_bytes``.
        """
        self.timings = {key: 0 if key in ("steps", "reduced_bytes") else 0.0 for key in _TIMING_KEYS}

    # -- internals -----------------------------------------------------------------

    def _reset_window(self) -> None:
        self._window_global = 0   # W: sum of global (micro-)batch sizes since the last step
        self._requests: list[Request] = []
        self._request_starts: list[float] = []  # when each request started (timeline only)
        self._requests_recorded = 0  # how many of them the timeline has seen done
        self._sync_backward_done = False  # a backward outside no_sync ran: reduce next
        self._reduced = False

    def _check_bindings(self) -> None:
        for name, _, grad in self.net.named_params():
            if self._bound_grads.get(name) is not grad:
                raise RuntimeError(f"DataParallel: the gradient of {name!r} was replaced after wrapping "
                                   "(e.g. by net.astype); cast the net before building DataParallel")

    def _rescale(self, factor: float) -> None:
        for bucket in self.buckets:
            bucket.buffer *= factor

    def _on_layer_done(self, index: int, layer: Any) -> None:
        start = time.perf_counter()
        for bucket in self._buckets_ready_after.get(index, ()):
            self._start(bucket)
        # MPI progresses non-blocking collectives only inside MPI calls; poll so the
        # reductions already started advance while the next layers compute.
        if self._timeline is None:
            Request.test_all(self._requests)
        else:
            self._record_reductions_done(wait=False)
        self.timings["comm_s"] += time.perf_counter() - start

    def _start_pending(self) -> None:
        """Start the non-blocking reductions this rank's backward did not start.

        Backward starts them in the order of ``_overlapped``, and nothing else
        adds requests, so the started ones are its first ``len(_requests)``.
        A rank with an empty shard (no backward) or after ``no_sync`` backward
        calls only starts them all here, in the same order as every other rank.
        """
        for bucket in self._overlapped[len(self._requests):]:
            self._start(bucket)

    def _start(self, bucket: GradientBucket) -> None:
        if self._timeline is not None:
            self._request_starts.append(time.perf_counter())
        self._requests.append(self.comm.iallreduce(bucket.buffer))
        self.timings["reduced_bytes"] += bucket.nbytes

    def _record_reductions_done(self, wait: bool) -> None:
        """Timeline spans for the started reductions that are done, in start order (with
        ``wait``, all of them): each ends when this rank first saw it done, which is also
        when MPI let it progress. The requests are those of ``_overlapped``, in order."""
        for index in range(self._requests_recorded, len(self._requests)):
            request = self._requests[index]
            if wait:
                request.wait()
            elif not request.test():
                break
            track, args = self._timeline_tracks[self._overlapped[index]]
            self._timeline.span("all-reduce", self._request_starts[index], time.perf_counter(), track, args)
            self._requests_recorded = index + 1
