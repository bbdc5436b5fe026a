"""Data-parallel training of any mnn layer stack, as one readable loop: ``train(config, comm)``.

The Python API mirrors the ``mnn-train`` command line::

    from mnn.distributed.training import TrainConfig, train
    summary = train(TrainConfig(layers=[64, 128, 10], optimizer="momentum", epochs=5))

and trains a net and arrays of your own the same way, with the same
checkpoints, resume, metrics and exactness::

    net = SequentialLayers([...your layers..., CrossEntropyLossLayer()])
    summary = train(TrainConfig(epochs=5, output="runs/mine"), net=net,
                    data=(x_train, y_train, x_test, y_test))

Run it on several ranks with ``mnn-launch -n 2 -- mnn-train ...`` (or a script
under ``mpiexec``): every rank calls ``train`` with the same config and builds
the same net, DataParallel broadcasts rank 0's parameters, and each step every
rank trains on its shard of a global batch that depends only on (seed, epoch,
batch size), so the run computes the same updates on any number of ranks, up
to the order of floating-point sums.

The pieces, each in its module: preflight checks everything before the first
step (:mod:`~mnn.distributed.training.preflight`); the net, optimizer, learning rate,
targets and evaluation sit beside the loss choice (:mod:`~mnn.distributed.training.task`);
the run's :class:`~mnn.distributed.training.position.Position` is the value the loop
advances and the checkpoint stores; rank 0's lines, progress bar and
metrics.jsonl come from the :class:`~mnn.distributed.training.reporting.Reporter`
(whose docstring gives the metrics schema); Ctrl-C and SIGTERM are handled by
:mod:`~mnn.distributed.training.stopping`; ``--timeline`` spans are recorded by
:class:`~mnn.distributed.timeline.Timeline`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnn import SequentialLayers
from mnn.distributed.comm import Communicator, RankFailure, get_communicator, run_on_root
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.timeline import Timeline, check_timeline_path
from mnn.distributed.training.checkpoint import (CHECKPOINT_NAME, BackgroundWriter, Checkpoint, is_checkpoint_name,
                                                save_checkpoint)
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.training.event_file import event_files_wanted
from mnn.distributed.training.output_dir import DIVERGED_NAME, LOCK_NAME, PREVIOUS_RUN, RUN_FILES
from mnn.distributed.training.position import Position
from mnn.distributed.training.preflight import JobConfigError, PreparedJob, prepare_job
from mnn.distributed.training.reporting import Reporter, json_text
from mnn.distributed.training.restarts import restart_totals, this_restart
from mnn.distributed.training.stopping import StopRequests, TrainingInterrupted
from mnn.distributed.training.task import evaluate, learning_rate
from mnn.distributed.watchdog import StallWatchdog
from mnn.io import atomic_write_text, save_arrays

__all__ = ["train", "TrainingFailed", "TrainingDiverged"]


def train(config: TrainConfig, comm: Any = None, *, net: SequentialLayers | None = None,
          data: Any = None) -> dict[str, Any]:
    """Train ``config`` on the ranks of ``comm`` (default: ``get_communicator()``).

    ``net``: your own ``SequentialLayers`` ending in a loss layer, instead of the
    net the config describes (``layers``/``loss`` or ``model``); ``data``: your
    own arrays ``(x_train, y_train, x_test, y_test)`` (or a dict of them, or a
    ``mnn.datasets.Dataset``), used as they are, instead of ``config.dataset``.
    Integer ``y`` are class labels (accuracy is reported), floating ``y``
    regression targets (the loss is the metric).

    Collective: every rank calls it with the same config. Returns the summary
    (the same dict on every rank; rank 0 also writes it to OUTPUT/summary.json).
    Raises :class:`~mnn.distributed.training.preflight.JobConfigError` on every rank
    if the job cannot start;
    :class:`~mnn.distributed.training.stopping.TrainingInterrupted` on every rank
    when any rank gets SIGINT or SIGTERM before the run is complete: after the same
    step (with a checkpoint of that step in OUTPUT), or at once on a second signal; and
    :class:`TrainingDiverged` on every rank when a step's loss or gradient is
    not finite and ``on_nonfinite`` is "stop" (or ``max_skipped_steps`` steps in
    a row were skipped, or every step of the run was); :class:`TrainingFailed` on
    every rank when OUTPUT cannot be written any more.
    A resumed run with no step left to train says so, evaluates the restored
    model and writes only the outputs a previous run did not finish writing.
    """
    started = time.perf_counter()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig (TrainConfig.from_dict makes one of a dict, "
                        f"resolve_config of a job file), got {type(config).__name__}")
    config.validate()  # again: a field may have been set after the config was made
    comm = get_communicator(comm)
    # Signals are counted from here on and acted on where every rank can agree:
    # after start-up and after each step (see mnn.distributed.training.stopping). A rank that
    # waits for the others longer than the stall timeout ends the job with a report
    # of who did not arrive (see mnn.distributed.watchdog): every collective of the
    # job goes through the watchdog's communicator.
    with StopRequests() as stop_requests, StallWatchdog(comm, config.stall_timeout) as watchdog:
        comm = watchdog.watched_comm
        _check_timeline(comm, config)  # before preflight changes anything in OUTPUT
        job = prepare_job(config, comm, net=net, data=data)
        # NaN and overflow are found and reported by the trainer (on_nonfinite), not as
        # NumPy's warnings from deep inside a layer.
        # The run's own ends release OUTPUT's lock; a crash (an MPI error, a bug) leaves it as a
        # killed job's is left: it says how far the job got, for a restart, and the next job
        # takes it over.
        ended = False
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                summary = _run(job, comm, stop_requests, watchdog, started)
            ended = True
            return summary
        except (TrainingInterrupted, TrainingFailed):
            ended = True
            raise
        finally:
            try:
                job.release(remove=ended)
            except OSError:
                pass  # OUTPUT turned read-only: the next job takes the lock over, as a dead job's


def _run(job: PreparedJob, comm: Communicator, stop_requests: StopRequests, watchdog: StallWatchdog,
         started: float) -> dict[str, Any]:
    """The training loop of a prepared job. What it advances is in one :class:`_RunState`;
    :func:`_end_reason` alone decides that the run is over, and every way it ends, the
    exceptions included, goes through :func:`_finish`."""
    config, sampler, net, task = job.config, job.sampler, job.net, job.task
    run, state = _open_run(job, comm, started)

    # a stop request that came while the job was prepared ends it before the first step; a
    # resumed run with no step left says so and finishes writing what its run did not
    state.stop_requested = stop_requests.vote(comm).stop
    reason = _end_reason(run, state)
    if reason is not None:
        return _finish(run, state, reason)

    error: Exception | None = None
    try:
        # rank 0's record begins: config.toml, metrics.jsonl and the first lines
        _on_root_writing(comm, run.output, lambda: _start_record(run, state))
        state.started, state.losses = True, _LossSums()  # the first window's time starts here
        batches = sampler.batches(state.position.epochs_done, start_step=state.position.step_in_epoch)
        while True:
            # the end of an epoch (also when a stop request came at its last step, so that the
            # checkpoint is at the epoch's end): log, evaluate, write a checkpoint
            if state.position.step_in_epoch == sampler.steps_per_epoch:
                _end_epoch(run, state)
                batches = sampler.batches(state.position.epochs_done)

            # termination conditions: every step trained, a stop request on any rank, or a step
            # that was not finite (a complete run's last train event goes out while the
            # progress bar is still up)
            reason = _end_reason(run, state)
            if reason == "complete":
                _log_training(run, state)
            if reason is not None:
                break

            # determine and set the learning rate of this step (and tell the watchdog and the
            # timeline which it is)
            step = state.position.global_step
            watchdog.progress(step + 1)
            run.timeline.next_step(step + 1)
            job.optimizer.lr = learning_rate(config, comm.size, step, sampler.steps_per_epoch)

            # forward and backward on this rank's shard of the next global batch, gradients
            # reduced (random layers such as dropout draw from the step and each sample's place
            # in the global batch, so any number of ranks draws the same)
            batch = next(batches)
            step_started = time.perf_counter()
            x, y = job.dataset.train.batch(batch.indices, config.dtype)
            net.start_batch(step, batch.offset)
            loss = float(run.dp(x, task.targets(y)))
            run.dp.backward(global_batch_size=batch.global_batch_size)
            run.dp.synchronize()

            # every rank agrees on stopping and on non-finite numbers (one small all-reduce); a
            # step that was not finite is skipped, or ends the run without its update
            vote = stop_requests.vote(comm, nonfinite=not (math.isfinite(loss) and run.dp.gradients_finite()),
                                      checkpoint=_clock_says_save(run, state))
            state.stop_requested = vote.stop
            if vote.nonfinite:
                state.diverged = _skip_or_stop(run, state, loss, batch.global_batch_size)
                if state.diverged is not None:
                    continue  # to the termination conditions
            else:
                state.skips.in_a_row = 0
                run.dp.step()
                state.losses.add(loss, len(y))
            state.position = state.position.after_step(batch.global_batch_size)
            # how far the job got, and a checkpoint every N steps or S seconds, written while
            # the next steps train (its copy of the state counts in this step's time)
            _keep_progress(run, state, vote.checkpoint)
            state.clock.add_step(time.perf_counter() - step_started, batch.global_batch_size)

            # log the training loss
            run.reporter.step()
            if state.position.global_step % config.log_every == 0:
                _log_training(run, state)
    except (_WriteFailed, TrainingDiverged) as failure:  # raised on every rank alike
        reason, error = "failed", failure
    except KeyboardInterrupt:  # a second signal: this rank stops at once, without the others
        reason = "signal"
    return _finish(run, state, reason, error)


class TrainingFailed(RuntimeError):
    """Training stopped during the run, on every rank alike (OUTPUT could not be written);
    the message says why and which checkpoint to continue from."""


class TrainingDiverged(TrainingFailed):
    """A step's loss or gradient was not finite (``on_nonfinite = "stop"``, or too many
    skipped steps); raised on every rank alike, before that step's update. The last
    checkpoint is left as it was; the state before the step goes beside it, to
    OUTPUT/diverged.npz (:data:`~mnn.distributed.training.output_dir.DIVERGED_NAME`),
    for inspection."""


class _WriteFailed(Exception):
    """A file of OUTPUT could not be written (raised on every rank alike)."""


# ------------------------------------------------------------------ the loop's small values
class _LossSums:
    """Training-loss sums, ``[sum over samples of the loss, samples]``, over this rank's
    shards: since the last train event (the window) and over the current epoch. The
    window's all-reduce also carries a third number, the ranks that could not write
    their files (rank 0's metrics.jsonl), so that every rank learns of it at no cost."""

    def __init__(self) -> None:
        # The window and the ranks whose writes failed, all-reduced together in place.
        self._reduced = np.zeros(3)
        self.window = self._reduced[:2]  # a view: adding to it fills the buffer
        self.epoch = np.zeros(2)
        self.window_started = time.perf_counter()

    @property
    def epoch_samples(self) -> float:
        return self.epoch[1]

    def add(self, loss: float, samples: int) -> None:
        self.window += (loss * samples, samples)

    def take_window(self, comm: Communicator, write_failed: bool = False) -> tuple[float, float] | None:
        """The window's mean loss and samples/s over all ranks (collective), then a new window.
        Raises _WriteFailed on every rank when ``write_failed`` on some rank."""
        self._reduced[2] = write_failed
        comm.allreduce(self._reduced)
        if self._reduced[2]:
            raise _WriteFailed("")
        self.epoch += self.window
        now = time.perf_counter()
        loss_sum, samples = self.window
        result = (loss_sum / samples, samples / (now - self.window_started)) if samples else None
        self.window[:] = 0
        self.window_started = now
        return result

    def end_epoch(self) -> float | None:
        """The mean training loss over the epoch (as summed so far; None when every step of it
        was skipped); the next epoch starts at zero."""
        mean = float(self.epoch[0] / self.epoch[1]) if self.epoch[1] else None
        self.epoch[:] = 0
        return mean


@dataclass
class _RunClock:
    """Wall time since ``train`` started, and the time and samples of this run's steps."""

    started: float
    train_s: float = 0.0
    samples: int = 0

    def add_step(self, seconds: float, samples: int) -> None:
        self.train_s += seconds
        self.samples += samples


@dataclass
class _Skips:
    """Steps whose update was skipped (``on_nonfinite = "skip"``): in all, and in a row
    up to the last step."""

    total: int = 0
    in_a_row: int = 0

    def skip(self) -> int:
        """Count one more skipped step; returns the steps skipped in a row."""
        self.total += 1
        self.in_a_row += 1
        return self.in_a_row


@dataclass(frozen=True)
class _Saved:
    """The last checkpoint this run could continue from: its path and position."""

    path: str
    position: Position


@dataclass(frozen=True)
class _Run:
    """What a run works with, set up once: the prepared job, the (watched) communicator,
    the DataParallel engine, rank 0's reporter, the timeline, OUTPUT (None: no files)
    and the number of global steps the job trains to."""

    job: PreparedJob
    comm: Communicator
    dp: DataParallel
    reporter: Reporter
    timeline: Timeline
    output: Path | None
    total_steps: int
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)  # rank 0's checkpoints in the background

    @property
    def config(self) -> TrainConfig:
        return self.job.config


@dataclass
class _RunState:
    """How far the run has got: everything the loop advances, in one value that the
    loop's helpers are handed (and change), so that none reads a copy gone stale."""

    position: Position
    saved: _Saved | None  # the last checkpoint the run could continue from
    clock: _RunClock
    first_step: int  # the global step this run started from
    losses: _LossSums = field(default_factory=_LossSums)
    skips: _Skips = field(default_factory=_Skips)
    started: bool = False  # rank 0's record has begun (config.toml, metrics.jsonl)
    stop_requested: bool = False  # on some rank, as the last vote found
    diverged: str | None = None  # why the last step ends the run: it was not finite
    train_loss: float | None = None  # mean over the last epoch (or part of one) trained
    last_eval: dict[str, Any] | None = None
    evaluated_at: int = -1  # the global step of last_eval
    writing: _Saved | None = None  # the checkpoint being written in the background
    saved_at: float = field(default_factory=time.monotonic)  # when the last checkpoint began (rank 0's clock)


# ------------------------------------------------------------------ the run's start and end
def _check_timeline(comm: Communicator, config: TrainConfig) -> None:
    """Refuse, as a bad job, a ``--timeline`` that would overwrite a file mnn did not write
    as a timeline, or one of the run's own outputs (collective; rank 0 checks)."""
    if config.timeline is None:
        return
    try:
        run_on_root(comm, lambda: check_timeline_path(config.timeline, _run_output(config.timeline, config.output)))
    except RankFailure as failure:
        raise JobConfigError(failure.failures, failure.world_size) from failure


def _run_output(path: str, output: str | None) -> str | None:
    """What ``path`` is among the files a run writes into ``output`` (None when it is none of them)."""
    if output is None:
        return None
    file, folder = Path(path).absolute(), Path(output).absolute()
    if file == folder or folder / PREVIOUS_RUN in (file, *file.parents):
        return f"the output directory {output!r} or its {PREVIOUS_RUN}/"
    if file.parent == folder and (file.name in (*RUN_FILES, LOCK_NAME) or is_checkpoint_name(file.name)):
        return f"a file of this run's output directory {output!r}"
    return None


def _open_timeline(comm: Communicator, config: TrainConfig) -> Timeline:
    """The run's timeline (collective; disabled without ``config.timeline``); a file rank 0
    cannot create stops every rank before training, as a bad job."""
    try:
        return Timeline(comm, config.timeline)
    except RankFailure as failure:
        raise JobConfigError(failure.failures, failure.world_size) from failure


def _open_run(job: PreparedJob, comm: Communicator, started: float) -> tuple[_Run, _RunState]:
    """The run of a prepared job and its state at the job's position (collective): rank 0's
    reporter, which tells the job's notes; the timeline (off, and free, without
    --timeline); DataParallel, which broadcasts rank 0's state."""
    config, steps_per_epoch = job.config, job.sampler.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    output = Path(config.output) if config.output is not None else None
    reporter = Reporter(comm.rank == 0, output, config.epochs, steps_per_epoch,
                        event_files=event_files_wanted(config.tensorboard))
    for note in job.notes:
        reporter.message(note)
    timeline = _open_timeline(comm, config)
    dp = DataParallel(job.net, job.optimizer, comm, bucket_bytes=config.bucket_bytes, allreduce=config.allreduce,
                      grad_compression=config.grad_compression, timeline=timeline)
    saved = _Saved(job.resumed_from, job.position) if job.resumed_from is not None else None
    state = _RunState(job.position, saved, _RunClock(started), first_step=job.position.global_step)
    return _Run(job, comm, dp, reporter, timeline, output, total_steps), state


def _end_reason(run: _Run, state: _RunState) -> str | None:
    """Why the run is over, or None while it goes on: the one place that decides it.

    Before rank 0's record has begun: "not started" (a stop request came while the
    job was prepared) or "nothing left" (a resumed run whose checkpoint is at the
    job's end). Then: "diverged" (the last step was not finite, and not skipped),
    "complete" (every step of the job is trained: a stop request from here on changes
    nothing) or "interrupted" (a stop request before that). Two more reasons come as
    exceptions during the loop: "failed" and "signal" (see :func:`_finish`).
    """
    position, config = state.position, run.config
    trained = position.epochs_done >= config.epochs or position.global_step >= run.total_steps
    if not state.started:
        if state.stop_requested:
            return "not started"
        return "nothing left" if trained and run.job.resumed_from is not None else None
    if state.diverged is not None:
        return "diverged"
    if trained:
        return "complete"
    return "interrupted" if state.stop_requested else None


def _finish(run: _Run, state: _RunState, reason: str, error: Exception | None = None) -> dict[str, Any]:
    """End the run for ``reason`` (see :func:`_end_reason`): close what is open, write what
    is due, then return the summary, or raise what says where the run stopped and how to
    continue it. Collective, except after "signal".

    1. The progress bar closes, and the timeline (collective: every rank ends here, for
       the same reason), except after "signal": a second signal stops this rank at once,
       alone, with TrainingInterrupted.
    2. "complete": :func:`_complete`; "nothing left": :func:`_write_what_is_missing`;
       "interrupted": a checkpoint of this step (unless it has one), then
       TrainingInterrupted; "not started": TrainingInterrupted, nothing written;
       "diverged": TrainingDiverged (see :func:`_diverged`); "failed": ``error``.
    3. A write that fails on the way (``error`` included) is TrainingFailed, naming the
       file and the checkpoint to continue from; a second signal is as "signal".
    """
    run.reporter.close()
    if reason == "signal":
        _leave_background_write(run, state)
        raise TrainingInterrupted(_interrupted_text(run, state)) from None
    run.timeline.close()
    try:
        _await_checkpoint(run, state)
        if reason == "complete":
            return _complete(run, state)
        if reason == "nothing left":
            return _write_what_is_missing(run, state)
        if reason == "interrupted":
            if _unsaved(run, state):
                state.saved = _save(run, state)
            raise TrainingInterrupted(_interrupted_text(run, state), ranks_agreed=True)
        if reason == "not started":
            raise TrainingInterrupted("interrupted before training started; nothing was trained", ranks_agreed=True)
        if reason == "diverged":
            raise _diverged(run, state, state.diverged)
        assert reason == "failed" and error is not None, reason
        raise error
    except _WriteFailed as failure:  # raised on every rank alike
        raise TrainingFailed(_write_failed_text(run, state, failure)) from None
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # a second signal while the run ends
        raise TrainingInterrupted(_interrupted_text(run, state)) from None


def _complete(run: _Run, state: _RunState) -> dict[str, Any]:
    """The end of a run that trained its last step (collective): a checkpoint of that step
    unless it has one (none when checkpoints are off and every epoch is done), its
    evaluation unless it has one, then model.npz, summary.json and the summary event. A
    run whose every step was skipped diverged."""
    config, position = run.config, state.position
    if state.skips.total and state.skips.total == position.global_step - state.first_step:
        raise _diverged(run, state, f"training diverged: the loss or gradient of every step of this run "
                                    f"({state.skips.total}) was not finite, so nothing was trained")
    if state.losses.epoch_samples:
        state.train_loss = state.losses.end_epoch()
    if (config.checkpoint_every or position.epochs_done < config.epochs) and _unsaved(run, state):
        state.saved = _save(run, state)
    if state.evaluated_at != position.global_step:
        _evaluate(run, state)
    summary = _summary(run, state)
    _on_root_writing(run.comm, run.output, lambda: _finish_record(run, summary))
    return summary


def _write_what_is_missing(run: _Run, state: _RunState) -> dict[str, Any]:
    """The end of a resumed run with no step left (collective): it says so, evaluates the
    restored model and writes the model.npz and summary.json its run did not finish writing."""
    job, output = run.job, run.output
    run.reporter.message(_nothing_left_text(job.resumed_from, run.config, state.position, job.sampler.steps_per_epoch))
    state.last_eval = evaluate(job.net, job.dataset.test, job.task, run.comm)
    summary = _summary(run, state)
    if output is not None:
        try:
            _on_root_writing(run.comm, output, lambda: _write_missing_results(output, job.net.state_dict(), summary,
                                                                              run.reporter))
        except _WriteFailed as failure:
            raise TrainingFailed(f"{failure}; the finished run's checkpoint is {job.resumed_from}") from None
    return summary


# ------------------------------------------------------------------ the loop's steps
def _skip_or_stop(run: _Run, state: _RunState, loss: float, global_batch_size: int) -> str | None:
    """Report a step whose loss or gradient was not finite on some rank (collective). With
    ``on_nonfinite = "skip"`` its update is dropped and None returned, until
    ``max_skipped_steps`` in a row; otherwise the run ends: returns why."""
    config = run.config
    what = _nonfinite_text(run.comm, loss, run.dp.gradients_finite())
    failed = state.position.after_step(global_batch_size)
    if config.on_nonfinite == "skip" and state.skips.skip() != config.max_skipped_steps:
        run.reporter.nonfinite(failed, what, "skipped")
        run.dp.zero_grads()  # the update is skipped; the batch counts as seen
        return None
    if config.on_nonfinite == "skip":
        what += (f"; {state.skips.in_a_row} steps in a row were not finite "
                 f"(--max-skipped-steps {config.max_skipped_steps})")
    run.reporter.nonfinite(failed, what, "stopped")
    return f"training diverged at {run.reporter.where(failed)}: {what}; its update was not applied"


def _end_epoch(run: _Run, state: _RunState) -> None:
    """Book the epoch's last step (collective): its last train event and mean training loss,
    the next epoch's position, and the evaluation and checkpoint that are due."""
    config = run.config
    _log_training(run, state)
    state.train_loss = state.losses.end_epoch()
    state.position = state.position.after_epoch()
    if config.eval_every and state.position.epochs_done % config.eval_every == 0:
        _evaluate(run, state)
    if run.output is not None and config.checkpoint_every and state.position.epochs_done % config.checkpoint_every == 0:
        state.saved = _save(run, state)


def _log_training(run: _Run, state: _RunState) -> None:
    """A train event for the window's loss (collective); nothing when the window is empty.
    Raises _WriteFailed on every rank when rank 0 could not write metrics.jsonl."""
    window = state.losses.take_window(run.comm, write_failed=run.reporter.write_failure is not None)
    if window is not None:
        run.reporter.train(state.position, window[0], run.job.optimizer.lr, window[1])


def _evaluate(run: _Run, state: _RunState) -> None:
    """Evaluate on the test split at this step and report it (collective)."""
    state.last_eval = evaluate(run.job.net, run.job.dataset.test, run.job.task, run.comm)
    state.evaluated_at = state.position.global_step
    run.reporter.eval(state.position, state.last_eval)


def _save(run: _Run, state: _RunState, name: str = CHECKPOINT_NAME) -> _Saved:
    """Write OUTPUT/checkpoint.npz (or OUTPUT/``name``) of this position on rank 0, once a
    checkpoint written in the background is done (collective: a failure, _WriteFailed,
    stops every rank)."""
    _await_checkpoint(run, state)
    checkpoint = _checkpoint(run, state, name)
    path = run.output / name
    keep = run.config.keep_checkpoints if name == CHECKPOINT_NAME else 1
    _on_root_writing(run.comm, path, lambda: save_checkpoint(path, checkpoint, keep=keep))
    state.saved_at = time.monotonic()
    return _Saved(str(path), state.position)


def _checkpoint(run: _Run, state: _RunState, name: str = CHECKPOINT_NAME) -> Checkpoint:
    """The checkpoint of this position; TrainingDiverged (on every rank alike) when a
    parameter is not finite, which is never written over a checkpoint."""
    model_state = run.dp.net.state_dict()
    bad = [key for key, value in model_state.items() if not np.isfinite(value).all()]
    if bad and name == CHECKPOINT_NAME:
        raise TrainingDiverged(f"the parameters are not finite at {state.position.global_step} steps ({bad[0]} and "
                               f"{len(bad) - 1} more): no checkpoint is written over a finite one; lower --lr")
    return Checkpoint(model_state, run.dp.optimizer.state_dict(), state.position, run.comm.size,
                      run.config.to_dict())


def _keep_progress(run: _Run, state: _RunState, clock_says: bool) -> None:
    """After a step (collective): rank 0 writes it into OUTPUT's lock (how far the job got,
    for a restart after a failure), and a checkpoint that ``checkpoint_every_steps`` or the
    clock makes due begins in the background."""
    if run.job.lock is not None:
        run.job.lock.record_step(state.position.global_step)
    if _checkpoint_due(run, state, clock_says):
        _save_in_background(run, state)


def _clock_says_save(run: _Run, state: _RunState) -> bool:
    """Whether ``checkpoint_every_seconds`` have passed since the last checkpoint began, by
    rank 0's clock alone (the step's vote tells every rank)."""
    seconds = run.config.checkpoint_every_seconds
    return bool(seconds) and run.comm.rank == 0 and time.monotonic() - state.saved_at >= seconds


def _checkpoint_due(run: _Run, state: _RunState, clock_says: bool) -> bool:
    """Whether a checkpoint of this position is due by ``checkpoint_every_steps`` or the
    clock, and no other one comes at once: the epoch's (at its last step) or the run's last."""
    config, position = run.config, state.position
    every = config.checkpoint_every_steps
    if run.output is None or not (clock_says or (every and position.global_step % every == 0)):
        return False
    epoch_saves = (position.step_in_epoch == run.job.sampler.steps_per_epoch and config.checkpoint_every
                   and (position.epochs_done + 1) % config.checkpoint_every == 0)
    return not (epoch_saves or position.global_step >= run.total_steps)


def _save_in_background(run: _Run, state: _RunState) -> None:
    """Begin writing OUTPUT/checkpoint.npz of this position on rank 0, in the background of
    the next steps (collective: the one before it must have been written)."""
    _await_checkpoint(run, state)
    checkpoint = _checkpoint(run, state)
    path = run.output / CHECKPOINT_NAME
    if run.comm.rank == 0:
        run.writer.start(path, checkpoint, keep=run.config.keep_checkpoints)
    state.writing = _Saved(str(path), state.position)
    state.saved_at = time.monotonic()


def _await_checkpoint(run: _Run, state: _RunState) -> None:
    """Wait until the checkpoint written in the background is on disk, and count it as saved
    (collective: if its write failed, _WriteFailed on every rank)."""
    if state.writing is None:
        return
    writing, state.writing = state.writing, None
    _on_root_writing(run.comm, Path(writing.path), run.writer.wait)
    state.saved = writing


def _leave_background_write(run: _Run, state: _RunState) -> None:
    """Let rank 0's write in the background end before this rank stops alone (a second
    signal); the checkpoint counts if it was written."""
    if state.writing is not None:
        try:
            run.writer.wait()
            state.saved = state.writing
        except Exception:
            pass  # the last checkpoint before it still stands
        state.writing = None


def _unsaved(run: _Run, state: _RunState) -> bool:
    """Whether the run writes checkpoints and OUTPUT/checkpoint.npz does not hold this position."""
    if run.output is None:
        return False
    saved = state.saved
    return not (saved is not None and saved.path == str(run.output / CHECKPOINT_NAME)
                and saved.position == state.position)


def _diverged(run: _Run, state: _RunState, headline: str) -> TrainingDiverged:
    """The error a run that diverged at the step after this position raises (collective).
    Its checkpoints are left as they are; the state before the failed step, when no
    checkpoint holds it, is kept beside them as OUTPUT/diverged.npz, for inspection."""
    kept, not_kept = None, ""
    if _unsaved(run, state):
        try:
            kept = _save(run, state, name=DIVERGED_NAME)
        except _WriteFailed as failure:
            not_kept = f"; the state before it could not be kept: {failure}"
    return TrainingDiverged(_diverged_text(run, state, headline, kept) + not_kept)


def _on_root_writing(comm: Communicator, path: Path | None, write: Any) -> None:
    """``write()`` on rank 0, which writes ``path`` (a file or OUTPUT; None: no file, only
    lines); if it raised, _WriteFailed on every rank (collective)."""
    try:
        run_on_root(comm, write)
    except RankFailure as failure:
        raise _WriteFailed(f"cannot write {path or 'the output'}: {failure.failures[0]}") from None


def _start_record(run: _Run, state: _RunState) -> None:
    """Rank 0's first lines and files: config.toml, and metrics.jsonl begun."""
    config, job, reporter = run.config, run.job, run.reporter
    if run.output is not None:
        atomic_write_text(run.output / "config.toml", config.to_toml())
    reporter.start(state.position, run.total_steps, resumed=job.resumed_from is not None)
    if job.resumed_from is not None:
        reporter.resume(job.resumed_from, state.position, job.changed)
    restart = this_restart()
    if restart is not None:
        previous_lock = job.lock.previous if job.lock is not None else {}
        reporter.restart(restart.event(run.comm.size, state.position.global_step, previous_lock))
    elif job.resumed_from is None and config.resume is True:
        reporter.message(f"no {CHECKPOINT_NAME} in {config.output} yet: starting from scratch")
    reporter.raise_write_failure()


def _finish_record(run: _Run, summary: dict[str, Any]) -> None:
    """Rank 0's last files: model.npz, summary.json and the summary event (with its line)."""
    if run.output is not None:
        _write_results(run.output, run.job.net.state_dict(), summary)
    run.reporter.summary(summary)
    run.reporter.raise_write_failure()


def _summary(run: _Run, state: _RunState) -> dict[str, Any]:
    """What ``train`` returns (collective): the same dict on every rank."""
    comm, clock, position, last_eval = run.comm, state.clock, state.position, state.last_eval
    # Times and rates as rank 0 measured them, so every rank returns the same summary.
    steps = position.global_step - state.first_step
    rates = comm.broadcast_object({
        "samples_per_s": clock.samples / clock.train_s if clock.train_s else 0.0,
        "train_s": clock.train_s,
        "wall_s": time.perf_counter() - clock.started,
        "timings": dict(run.dp.timings),
        **restart_totals(run.reporter.restarts, clock.train_s / steps if steps else 0.0),
    })
    return {
        "world_size": comm.size,
        "epochs": position.epochs_done,
        "steps": position.global_step,
        "samples_seen": position.samples_seen,
        "skipped_steps": state.skips.total,
        "stopped_early": position.epochs_done < run.config.epochs,
        "resumed_from": run.job.resumed_from,
        "train_loss": state.train_loss,
        "test_loss": float(last_eval["loss"]),
        "test_accuracy": last_eval["accuracy"],
        **({"test_bits_per_char": last_eval["bits_per_char"]} if "bits_per_char" in last_eval else {}),
        **rates,
    }


def _write_results(output: Path, model_state: dict[str, np.ndarray], summary: dict[str, Any]) -> None:
    save_arrays(output / "model.npz", model_state)
    atomic_write_text(output / "summary.json", json_text(summary, indent=2) + "\n")


def _write_missing_results(output: Path, model_state: dict[str, np.ndarray], summary: dict[str, Any],
                           reporter: Reporter) -> None:
    """Write model.npz and summary.json where a finished run was stopped before writing them."""
    missing = [name for name in ("model.npz", "summary.json") if not (output / name).exists()]
    if missing:
        _write_results(output, model_state, summary)
        reporter.message(f"wrote the {' and '.join(missing)} that the finished run had not written yet")


# ------------------------------------------------------------------ messages
def _nothing_left_text(checkpoint: str, config: TrainConfig, position: Position, steps_per_epoch: int) -> str:
    """Why a resumed run has no step left to train."""
    if position.epochs_done >= config.epochs:
        if (position.epochs_done, position.step_in_epoch) == (config.epochs, 0):
            where = f"at the end of epoch {position.epochs_done} of {config.epochs}"
        else:
            where = f"at {position.text(steps_per_epoch, config.epochs)}, past this job's last epoch"
        return f"checkpoint {checkpoint} is {where}: nothing left to train; raise --epochs to train further"
    return (f"checkpoint {checkpoint} is at step {position.global_step} and max_steps is "
            f"{config.max_steps}: nothing left to train; raise --max-steps to train further")


def _nonfinite_text(comm: Communicator, loss: float, gradients_finite: bool) -> str:
    """What was not finite, and on which ranks (collective; only after a vote found something)."""
    ranks_by_value: dict[str, list[str]] = {}
    for rank, value in enumerate(comm.allgather(loss)):
        if not math.isfinite(value):
            ranks_by_value.setdefault(str(value), []).append(str(rank))
    parts = [f"the loss is {value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
             for value, ranks in ranks_by_value.items()]
    if not gradients_finite:
        parts.append("the averaged gradient is not finite")
    return "; ".join(parts)


def _diverged_text(run: _Run, state: _RunState, headline: str, kept: _Saved | None) -> str:
    """What diverged, the checkpoint to continue from (left as it was) and where the state
    before the failed step was kept."""
    reporter, saved = run.reporter, state.saved
    or_skip = ", or with --on-nonfinite skip" if run.config.on_nonfinite == "stop" else ""
    if saved is None:
        message = (f"{headline}. No checkpoint was written{'' if run.output is not None else ' (no --output)'}: "
                   f"start again with a lower --lr{or_skip}")
    else:
        message = (f"{headline}. The last checkpoint, {saved.path} at {reporter.where(saved.position)}, is "
                   f"left as it was: continue with {_resume_option(saved, run.output)} and a lower --lr{or_skip}")
    if kept is not None:
        message += (f"; the state before the failed step, at {reporter.where(kept.position)}, is in {kept.path}, "
                    "for inspection")
    return message


def _write_failed_text(run: _Run, state: _RunState, failure: _WriteFailed) -> str:
    """Which file could not be written, where the run stopped and how to continue it."""
    reporter, saved, output = run.reporter, state.saved, run.output
    # rank 0 prints it: its reporter knows the first write that failed
    what = reporter.write_failure or str(failure) or "cannot write the output files (on rank 0)"
    message = f"{what}; training stopped at {reporter.where(state.position)}"
    if saved is None:
        return message + "; no checkpoint was written"
    return (message + f"; the last checkpoint is {saved.path}, at {reporter.where(saved.position)}: continue with "
            f"{_resume_option(saved, output)} once {output} can be written")


def _resume_option(saved: _Saved, output: Path | None) -> str:
    """``--resume``, or ``--resume PATH`` when the checkpoint is not OUTPUT/checkpoint.npz."""
    if output is not None and saved.path == str(output / CHECKPOINT_NAME):
        return "--resume"
    return f"--resume {saved.path}"


def _interrupted_text(run: _Run, state: _RunState) -> str:
    """Where the run stopped and how to continue it."""
    reporter, saved, position = run.reporter, state.saved, state.position
    message = f"interrupted at {reporter.where(position)}; "
    if saved is None:
        return message + "no checkpoint was written" + ("" if run.output is not None else " (no --output)")
    again = _resume_option(saved, run.output)
    if saved.position == position:
        return message + f"checkpoint saved to {saved.path}; continue with {again}"
    return message + f"the last checkpoint is {saved.path}, at {reporter.where(saved.position)}; continue with {again}"
