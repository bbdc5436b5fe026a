"""Data-parallel training of an MLP, as one readable loop: ``train(config, comm)``.

The Python API mirrors the ``mnn-train`` command line::

    from mnn.distributed.trainer import TrainConfig, train
    summary = train(TrainConfig(layers=[64, 128, 10], optimizer="momentum", epochs=5))

Run it on several ranks with ``mpiexec -n 2 mnn-train --layers 64,128,10``. Every
rank builds the same net from the seed, DataParallel broadcasts rank 0's
parameters, and each step every rank trains on its shard of a global batch that
depends only on (seed, epoch, batch size): the run computes the same updates on
any number of ranks, up to the order of floating-point sums.

Before the first step the job is checked on rank 0 (output directory writable,
checkpoint present and compatible, dataset readable and matching ``layers``);
a problem raises :class:`JobConfigError` on every rank, so all ranks stop
together. Only rank 0 prints and writes files.

Positions in a run are told one way everywhere (lines, metrics.jsonl, messages):
``epoch`` is the 1-based epoch trained in and ``step_in_epoch`` the global
batches of it done so far, so the end of epoch 2 is epoch 2, step S/S (never
epoch 3, step 0). ``epochs_done`` counts complete epochs.

OUTPUT/metrics.jsonl holds one JSON object per line, with an ``event`` key:

* ``train`` (every ``log_every`` steps and at the end of each epoch): ``epoch``,
  ``step_in_epoch``, ``global_step``, ``loss`` (mean training loss since the
  last train event), ``lr``, ``samples_per_s``;
* ``eval`` (every ``eval_every`` epochs and at the end): ``epoch``,
  ``step_in_epoch``, ``epochs_done``, ``global_step``, ``test_loss``,
  ``test_accuracy``; the evaluation followed a partial epoch when
  ``epochs_done < epoch`` (its line then says "(partial)");
* ``resume`` (first, when the run continues a checkpoint): ``checkpoint``,
  ``epoch``, ``step_in_epoch``, ``epochs_done``, ``global_step`` of the
  checkpoint, and ``changed``: the settings that differ from the
  checkpoint's, as ``{name: [checkpoint's value, this job's value]}``;
* ``summary`` (last): the summary, whose ``epochs`` is ``epochs_done``.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from mnn import (
    SGD,
    Adam,
    CrossEntropyLossLayer,
    LinearLayer,
    LogSoftmaxLayer,
    MSELossLayer,
    NllLossLayer,
    ReluLayer,
    SequentialLayers,
)
from mnn.datasets import Dataset, Split, load_dataset
from mnn.distributed.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from mnn.distributed.comm import Communicator, RankFailure, get_communicator, run_all
from mnn.distributed.config import TrainConfig
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.reporting import progress_bar_wanted
from mnn.distributed.sampler import GlobalBatchSampler, shard_sizes
from mnn.io import atomic_write_text, save_arrays

__all__ = [
    "train",
    "TrainConfig",
    "build_net",
    "build_optimizer",
    "learning_rate",
    "evaluate",
    "JobConfigError",
    "TrainingInterrupted",
    "RESUME_MUST_MATCH",
    "EVAL_BATCH_SIZE",
]

# A checkpoint resumes exactly only if these fields are unchanged: they define the
# parameters' shapes, the optimizer state and the sequence of global batches.
RESUME_MUST_MATCH = ("layers", "loss", "dataset", "batch_size", "seed", "dtype", "optimizer",
                     "drop_last")
# Rows per forward pass during evaluation; any size gives the same metrics.
EVAL_BATCH_SIZE = 1024


class JobConfigError(RankFailure):
    """The job cannot start as configured; raised on every rank before training."""


class TrainingInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt (Ctrl-C, SIGINT) during training; its message says
    where the run stopped and which checkpoint it can resume from.

    ``ranks_agreed`` is True when all ranks stopped together after the same step
    (see :class:`_StopRequests`): none of them is left inside a collective, so
    they can leave normally. It is False after an immediate stop (a second
    signal, or a KeyboardInterrupt raised outside the training loop).
    """

    def __init__(self, message: str, ranks_agreed: bool = False):
        super().__init__(message)
        self.ranks_agreed = ranks_agreed


class _StopRequests:
    """Catch SIGINT and SIGTERM during training and only count them.

    A signal handler runs between two Python bytecodes on whatever the main
    thread is doing; raising there could leave one rank inside a collective
    that the others have left. Counting instead lets the training loop ask all
    ranks after each step whether any of them was asked to stop, so they all
    stop after the same step. A signal that comes more than
    ``_REPEAT_AFTER_S`` after the first is taken as a person insisting: the
    previous handlers come back and it raises KeyboardInterrupt at once.
    (One Ctrl-C may arrive twice within milliseconds: from the terminal and
    forwarded by the launcher.) Outside the main thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    _REPEAT_AFTER_S = 1.0

    def __init__(self) -> None:
        self.count = 0
        self._first_at: float | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _request(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
        elif now - self._first_at > self._REPEAT_AFTER_S:
            previous = self._previous.get(signum)
            self.restore()
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.count += 1


# ------------------------------------------------------------------ building
def build_net(config: TrainConfig) -> SequentialLayers:
    """Linear layers of ``config.layers`` with ReLU between them, then the loss.

    Weights get He initialisation from one Generator seeded with ``config.seed``,
    drawn layer by layer, so every rank builds the same net; biases start at zero.
    """
    dtype = np.dtype(config.dtype)
    rng = np.random.default_rng(config.seed)
    layers: list[Any] = []
    widths = config.layers
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index > 0:
            layers.append(ReluLayer(dtype=dtype))
        layers.append(LinearLayer(n_in, n_out, dtype=dtype, rng=rng))
    if config.loss == "cross_entropy":
        layers.append(CrossEntropyLossLayer(dtype=dtype))
    elif config.loss == "nll":
        layers += [LogSoftmaxLayer(dtype=dtype), NllLossLayer(dtype=dtype)]
    else:
        assert config.loss == "mse", config.loss
        layers.append(MSELossLayer(dtype=dtype))
    return SequentialLayers(layers)


def build_optimizer(config: TrainConfig, net: SequentialLayers) -> SGD | Adam:
    """The optimizer of ``config``; its lr is set every step by :func:`learning_rate`."""
    if config.optimizer == "adam":
        return Adam(net, lr=config.lr, weight_decay=config.weight_decay)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return SGD(net, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay)


def learning_rate(config: TrainConfig, world_size: int, step: int, steps_per_epoch: int) -> float:
    r"""The lr of optimizer step ``step`` (0-based, counted over the whole run).

    With linear scaling the target is :math:`\eta N` for :math:`N` ranks (Goyal
    et al. 2017), since the global batch then grows with N in their setting;
    here the global batch is fixed, so scaling is opt-in. During warm-up
    (:math:`W` = warmup_epochs x steps_per_epoch steps) the lr ramps linearly,
    :math:`\eta_t = \eta \min(1, (t + 1) / W)`.
    """
    target = config.lr * (world_size if config.lr_scaling == "linear" else 1)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return target * (step + 1) / warmup_steps
    return target


def _targets(config: TrainConfig, labels: np.ndarray) -> np.ndarray:
    """What the loss layer takes: class indices, or one-hot rows for mse."""
    if config.loss != "mse":
        return labels
    return np.eye(config.layers[-1], dtype=config.dtype)[labels]


# ---------------------------------------------------------------- evaluation
def evaluate(net: SequentialLayers, split: Split, config: TrainConfig,
             comm: Communicator) -> dict[str, float]:
    """Loss and accuracy over the whole ``split``, sharded over the ranks (collective).

    Each rank evaluates a contiguous part of the split; the ranks then sum the
    loss sums, correct counts and sample counts, so the metrics are those of the
    whole split, exactly, whatever the shard sizes (never a mean of means).
    """
    sizes = shard_sizes(len(split), comm.size)
    start = sum(sizes[:comm.rank])
    indices = np.arange(start, start + sizes[comm.rank])
    totals = np.zeros(3)  # loss sum, correct predictions, samples
    for offset in range(0, len(indices), EVAL_BATCH_SIZE):
        x, labels = split.batch(indices[offset:offset + EVAL_BATCH_SIZE], config.dtype)
        outputs = net(x)  # without targets: the prediction, before the loss layer
        mean_loss = net.loss_layer.forward(outputs, _targets(config, labels))
        totals += (float(mean_loss) * len(labels), np.count_nonzero(outputs.argmax(axis=1) == labels),
                   len(labels))
    comm.allreduce(totals)
    loss_sum, correct, count = totals
    return {"loss": loss_sum / count, "accuracy": correct / count, "samples": int(count)}


# ---------------------------------------------------------------- preflight
def _collectively(comm: Communicator, fn: Callable[[], Any], on_rank0_only: bool = True) -> Any:
    """Run ``fn`` (on rank 0 only, or everywhere); a failure anywhere stops all ranks."""
    return run_all(comm, lambda: fn() if comm.rank == 0 or not on_rank0_only else None)


def _check_output_dir(output: str) -> None:
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {output!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"output directory {output!r} is not writable: {error}") from None


def _checkpoint_to_resume(config: TrainConfig) -> Path | None:
    if config.resume is False:
        return None
    if config.resume is True:
        path = Path(config.output) / CHECKPOINT_NAME
        return path if path.exists() else None  # nothing saved yet: start from scratch
    path = Path(config.resume)
    if not path.is_file():
        raise ValueError(f"resume: checkpoint {config.resume!r} does not exist")
    return path


def _restore(path: Path, config: TrainConfig, net: SequentialLayers, optimizer: Any) -> dict[str, Any]:
    """Load a checkpoint into ``net`` and ``optimizer``; return its position and
    the settings that differ from its config (``changed``: name -> [old, new])."""
    checkpoint = load_checkpoint(path)
    try:
        saved = TrainConfig.from_dict(checkpoint.config, source=f"the config in {str(path)!r}")
    except (ValueError, TypeError) as error:
        raise ValueError(f"cannot resume from {str(path)!r}: its stored config is not a valid "
                         f"job: {error}") from None
    mismatched = [f"{key}: checkpoint has {getattr(saved, key)!r}, this job {getattr(config, key)!r}"
                  for key in RESUME_MUST_MATCH if getattr(saved, key) != getattr(config, key)]
    if mismatched:
        raise ValueError(f"cannot resume from {str(path)!r}: these settings must match the "
                         f"checkpoint's: " + "; ".join(mismatched))
    # `resume` itself always differs from the run that wrote the checkpoint.
    changed = {key: [value, getattr(config, key)] for key, value in saved.to_dict().items()
               if key not in RESUME_MUST_MATCH and key != "resume" and value != getattr(config, key)}
    net.load_state_dict(checkpoint.model_state)
    optimizer.load_state_dict(checkpoint.optimizer_state)
    return {"epoch": checkpoint.epoch, "step_in_epoch": checkpoint.step_in_epoch,
            "global_step": checkpoint.global_step, "samples_seen": checkpoint.samples_seen,
            "resumed_from": str(path), "changed": changed}


def _load_data(config: TrainConfig, comm: Communicator) -> Dataset:
    # Rank 0 first, so that it alone builds the dataset cache; the others then
    # map the finished files (run_all ends with a collective, i.e. a barrier).
    # "digits" comes from scikit-learn with no cache to build: all load at once.
    loaded_by_root = None
    if config.dataset != "digits":
        loaded_by_root = _collectively(comm, lambda: load_dataset(config.dataset))
    dataset = _collectively(
        comm, lambda: loaded_by_root or load_dataset(config.dataset), on_rank0_only=False)

    def check() -> None:
        if dataset.n_features != config.layers[0]:
            raise ValueError(
                f"layers: the first width must equal the dataset's {dataset.n_features} features "
                f"per sample ({dataset.name}), got layers[0] = {config.layers[0]}")
        dataset.check_classes(config.layers[-1])
        if len(dataset.train) == 0 or len(dataset.test) == 0:
            raise ValueError(f"dataset {dataset.name}: expected non-empty train and test splits, "
                             f"got {len(dataset.train)} and {len(dataset.test)} samples")

    _collectively(comm, check)
    return dataset


# ---------------------------------------------------------------- reporting
def _epoch_and_step(epochs_done: int, step_in_epoch: int, steps_per_epoch: int) -> tuple[int, int]:
    """The 1-based epoch last trained in and its steps done: the end of epoch 2 is
    (2, steps_per_epoch), not (3, 0). Before any step it is (1, 0)."""
    if step_in_epoch == 0 and epochs_done > 0:
        return epochs_done, steps_per_epoch
    return epochs_done + 1, step_in_epoch


def _position_text(epochs_done: int, step_in_epoch: int, steps_per_epoch: int, epochs: int) -> str:
    """'the end of epoch 2/10', or 'epoch 3/10 step 7/23' within an epoch."""
    epoch, step = _epoch_and_step(epochs_done, step_in_epoch, steps_per_epoch)
    if step == steps_per_epoch:
        return f"the end of epoch {epoch}/{epochs}"
    return f"epoch {epoch}/{epochs} step {step}/{steps_per_epoch}"


def _nothing_left_text(checkpoint: str, config: TrainConfig, epochs_done: int,
                       step_in_epoch: int, global_step: int, steps_per_epoch: int) -> str | None:
    """Why a resumed run has no step left to train, or None if it has some."""
    if epochs_done >= config.epochs:
        if (epochs_done, step_in_epoch) == (config.epochs, 0):
            where = f"at the end of epoch {epochs_done} of {config.epochs}"
        else:
            where = (f"at {_position_text(epochs_done, step_in_epoch, steps_per_epoch, config.epochs)}, "
                     f"past this job's last epoch")
        return (f"checkpoint {checkpoint} is {where}: nothing left to train; "
                f"raise --epochs to train further")
    if config.max_steps is not None and global_step >= config.max_steps:
        return (f"checkpoint {checkpoint} is at step {global_step} and max_steps is "
                f"{config.max_steps}: nothing left to train; raise --max-steps to train further")
    return None


def _changed_text(changed: dict[str, list[Any]]) -> str:
    return "settings changed since the checkpoint: " + ", ".join(
        f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())


class _Reporter:
    """Rank 0's side effects: progress bar or plain lines, and metrics.jsonl.

    On other ranks every method does nothing. The bar is for a person watching
    a terminal (see :func:`~mnn.distributed.reporting.progress_bar_wanted`); in a log file plain lines
    are easier to read.
    """

    def __init__(self, active: bool, output: Path | None, total_steps: int, done_steps: int,
                 resumed: bool):
        self.active = active
        self.metrics_path = output / "metrics.jsonl" if output is not None and active else None
        if self.metrics_path is not None and not resumed:
            self.metrics_path.write_text("")  # a new run: do not append to an old run's metrics
        self.bar = None
        if active and progress_bar_wanted():
            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def record(self, event: dict[str, Any], line: str) -> None:
        if not self.active:
            return
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(event) + "\n")
        if self.bar is not None:
            if event["event"] == "train":
                self.bar.set_postfix(loss=f"{event['loss']:.4f}",
                                     samples_per_s=f"{event['samples_per_s']:.0f}")
            else:
                self.bar.write(line, file=sys.stderr)  # the stream the bar redraws on
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -------------------------------------------------------------------- train
def train(config: TrainConfig, comm: Any = None) -> dict[str, Any]:
    """Train ``config`` on the ranks of ``comm`` (default: ``get_communicator()``).

    Collective: every rank calls it with the same config. Returns the summary
    (the same dict on every rank; rank 0 also writes it to OUTPUT/summary.json).
    Raises :class:`JobConfigError` on every rank if the job cannot start, and
    :class:`TrainingInterrupted` once training started: on every rank after the
    same step when any rank gets SIGINT or SIGTERM during the training loop
    (with a checkpoint of that step in OUTPUT), or at once on a
    KeyboardInterrupt elsewhere or a second signal.
    A resumed run with no step left to train says so, evaluates the restored
    model and returns without writing anything.
    """
    started = time.perf_counter()
    comm = get_communicator(comm)
    is_root = comm.rank == 0
    output = Path(config.output) if config.output is not None else None
    net = build_net(config)
    optimizer = build_optimizer(config, net)

    def check_output_and_restore() -> dict[str, Any] | None:
        # Rank 0 alone: the output directory is its own (other hosts may not see
        # it); DataParallel broadcasts the restored parameters and optimizer state.
        if output is not None:
            _check_output_dir(config.output)
        checkpoint_path = _checkpoint_to_resume(config)
        if checkpoint_path is None:
            return None
        return _restore(checkpoint_path, config, net, optimizer)

    try:
        position = comm.allgather(_collectively(comm, check_output_and_restore))[0]
        dataset = _load_data(config, comm)
        sampler = run_all(comm, GlobalBatchSampler, len(dataset.train), config.batch_size,
                          rank=comm.rank, world_size=comm.size, seed=config.seed,
                          drop_last=config.drop_last)
    except RankFailure as failure:
        raise JobConfigError(failure.failures) from failure
    if position is None:
        position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "samples_seen": 0,
                    "resumed_from": None, "changed": {}}

    dp = DataParallel(net, optimizer, comm, bucket_bytes=config.bucket_bytes)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    global_step, samples_seen = position["global_step"], position["samples_seen"]
    epoch, step_in_epoch = position["epoch"], position["step_in_epoch"]  # epoch: epochs done
    train_seconds, samples_this_run = 0.0, 0

    def where(done: int, step: int) -> str:
        return _position_text(done, step, steps_per_epoch, config.epochs)

    def summarize(last_eval: dict[str, float], train_loss: float | None) -> dict[str, Any]:
        # Times and rates as rank 0 measured them, so every rank returns the same summary.
        rates = comm.allgather({
            "samples_per_s": samples_this_run / train_seconds if train_seconds else 0.0,
            "train_s": train_seconds,
            "wall_s": time.perf_counter() - started,
            "timings": dict(dp.timings),
        })[0]
        return {
            "world_size": comm.size,
            "epochs": epoch,
            "steps": global_step,
            "samples_seen": samples_seen,
            "stopped_early": epoch < config.epochs,
            "resumed_from": position["resumed_from"],
            "train_loss": train_loss,
            "test_loss": float(last_eval["loss"]),
            "test_accuracy": float(last_eval["accuracy"]),
            **rates,
        }

    if position["resumed_from"] is not None:
        nothing_left = _nothing_left_text(position["resumed_from"], config, epoch, step_in_epoch,
                                          global_step, steps_per_epoch)
        if nothing_left is not None:
            # The finished run's outputs stay as they are: this run trained nothing.
            if is_root:
                print(nothing_left, flush=True)
            return summarize(evaluate(net, dataset.test, config, comm), train_loss=None)

    if is_root and output is not None:
        atomic_write_text(output / "config.toml", config.to_toml())
    reporter = _Reporter(is_root, output, total_steps, min(global_step, total_steps),
                         resumed=position["resumed_from"] is not None)
    # The last checkpoint this run could be continued from: (path, where it is).
    last_checkpoint: tuple[str, str] | None = None
    if position["resumed_from"]:
        last_checkpoint = (position["resumed_from"], where(epoch, step_in_epoch))
        shown_epoch, shown_step = _epoch_and_step(epoch, step_in_epoch, steps_per_epoch)
        line = f"resumed from {position['resumed_from']} at {where(epoch, step_in_epoch)}"
        if position["changed"]:
            line += "\n" + _changed_text(position["changed"])
        reporter.record({"event": "resume", "checkpoint": position["resumed_from"],
                         "epoch": shown_epoch, "step_in_epoch": shown_step, "epochs_done": epoch,
                         "global_step": global_step, "changed": position["changed"]}, line)
    elif config.resume is True and is_root:
        print(f"no {CHECKPOINT_NAME} in {config.output} yet: starting from scratch", flush=True)

    checkpointed_at = -1

    def save_position() -> None:
        nonlocal checkpointed_at, last_checkpoint
        checkpointed_at = global_step
        checkpoint = Checkpoint(net.state_dict(), optimizer.state_dict(), epoch, step_in_epoch,
                                global_step, samples_seen, comm.size, config.to_dict())
        _collectively(comm, lambda: save_checkpoint(output / CHECKPOINT_NAME, checkpoint))
        last_checkpoint = (str(output / CHECKPOINT_NAME), where(epoch, step_in_epoch))

    def run_evaluation() -> dict[str, float]:
        metrics = evaluate(net, dataset.test, config, comm)
        shown_epoch, shown_step = _epoch_and_step(epoch, step_in_epoch, steps_per_epoch)
        partial = "" if shown_step == steps_per_epoch else f" (partial, step {shown_step}/{steps_per_epoch})"
        reporter.record({"event": "eval", "epoch": shown_epoch, "step_in_epoch": shown_step,
                         "epochs_done": epoch, "global_step": global_step,
                         "test_loss": metrics["loss"], "test_accuracy": metrics["accuracy"]},
                        f"epoch {shown_epoch}/{config.epochs}{partial} | test loss {metrics['loss']:.4f} | "
                        f"test accuracy {metrics['accuracy']:.4f}")
        return metrics

    # Training-loss sums since the last log line, and over the current epoch:
    # [sum over samples of the loss, samples], summed over ranks at log points.
    window, epoch_totals = np.zeros(2), np.zeros(2)
    window_started = time.perf_counter()
    train_loss: float | None = None  # mean over the last epoch (or part of one) trained
    last_eval: dict[str, float] | None = None
    evaluated_at = -1

    def log_window() -> None:
        nonlocal window_started
        comm.allreduce(window)
        epoch_totals[:] += window
        now = time.perf_counter()
        if window[1] > 0:
            loss, samples_per_s = window[0] / window[1], window[1] / (now - window_started)
            shown_epoch, shown_step = _epoch_and_step(epoch, step_in_epoch, steps_per_epoch)
            reporter.record(
                {"event": "train", "epoch": shown_epoch, "step_in_epoch": shown_step,
                 "global_step": global_step, "loss": loss, "lr": optimizer.lr,
                 "samples_per_s": samples_per_s},
                f"epoch {shown_epoch}/{config.epochs} step {shown_step}/{steps_per_epoch} | "
                f"loss {loss:.4f} | lr {optimizer.lr:.4g} | {samples_per_s:.0f} samples/s")
        window[:] = 0
        window_started = now

    # Any rank's stop request, summed over the ranks after every step: all ranks
    # then stop after the same step (one 8-byte allreduce, a few microseconds).
    stop_votes = np.zeros(1)

    def stop_agreed(requests: _StopRequests) -> bool:
        stop_votes[0] = requests.count
        comm.allreduce(stop_votes)
        return bool(stop_votes[0])

    def interrupted_text() -> str:
        message = f"interrupted at {where(epoch, step_in_epoch)}; "
        if last_checkpoint is None:
            return message + "no checkpoint was written" + ("" if output is not None else " (no --output)")
        path, at = last_checkpoint
        again = "--resume" if output is not None and path == str(output / CHECKPOINT_NAME) \
            else f"--resume {path}"
        if at == where(epoch, step_in_epoch):
            return message + f"checkpoint saved to {path}; continue with {again}"
        return message + f"the last checkpoint is {path}, at {at}; continue with {again}"

    try:
        stopping = False
        with _StopRequests() as stop_requests:
            while epoch < config.epochs and global_step < total_steps and not stopping:
                for batch in sampler.batches(epoch, start_step=step_in_epoch):
                    step_started = time.perf_counter()
                    optimizer.lr = learning_rate(config, comm.size, global_step, steps_per_epoch)
                    x, labels = dataset.train.batch(batch.indices, config.dtype)
                    loss = dp(x, _targets(config, labels))
                    dp.backward(global_batch_size=batch.global_batch_size)
                    dp.step()
                    train_seconds += time.perf_counter() - step_started
                    window += (float(loss) * len(labels), len(labels))
                    global_step += 1
                    step_in_epoch += 1
                    samples_seen += batch.global_batch_size
                    samples_this_run += batch.global_batch_size
                    reporter.step()
                    if global_step % config.log_every == 0:
                        log_window()
                    stopping = stop_agreed(stop_requests)
                    if global_step >= total_steps or stopping:
                        break
                if step_in_epoch < steps_per_epoch:
                    break  # stopped by max_steps or a stop request, mid-epoch
                # A stop request at the last step of an epoch stops after the
                # epoch's bookkeeping, so the checkpoint is at the epoch's end.
                log_window()
                epoch, step_in_epoch = epoch + 1, 0
                train_loss = float(epoch_totals[0] / epoch_totals[1])
                epoch_totals[:] = 0
                if config.eval_every and epoch % config.eval_every == 0:
                    last_eval, evaluated_at = run_evaluation(), global_step
                if output is not None and config.checkpoint_every and epoch % config.checkpoint_every == 0:
                    save_position()
            if stopping and (epoch < config.epochs and global_step < total_steps):
                reporter.close()
                if output is not None and checkpointed_at != global_step:
                    save_position()
                raise TrainingInterrupted(interrupted_text(), ranks_agreed=True)
        # A stop request after the last step changes nothing: the run is complete.
        log_window()
        reporter.close()
        if epoch_totals[1]:
            train_loss = float(epoch_totals[0] / epoch_totals[1])

        if output is not None and (config.checkpoint_every or epoch < config.epochs) \
                and checkpointed_at != global_step:
            save_position()
        if evaluated_at != global_step or last_eval is None:
            last_eval = run_evaluation()
        summary = summarize(last_eval, train_loss)
        if output is not None:
            _collectively(comm, lambda: _write_results(output, net.state_dict(), summary))
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        reporter.close()
        raise TrainingInterrupted(interrupted_text()) from None
    reporter.record({"event": "summary", **summary}, _summary_line(summary))
    return summary


def _write_results(output: Path, model_state: dict[str, np.ndarray], summary: dict[str, Any]) -> None:
    save_arrays(output / "model.npz", model_state)
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")


def _summary_line(summary: dict[str, Any]) -> str:
    return (f"done: test accuracy {summary['test_accuracy']:.4f} | "
            f"{summary['samples_per_s']:.0f} samples/s | wall {summary['wall_s']:.1f} s | "
            f"{summary['world_size']} rank{'s' if summary['world_size'] > 1 else ''} | "
            f"{summary['steps']} steps, {summary['epochs']} epoch{'s' if summary['epochs'] != 1 else ''} done")
