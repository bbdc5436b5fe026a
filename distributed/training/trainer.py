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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnn import SequentialLayers
from mnn.distributed.training.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from mnn.distributed.comm import Communicator, RankFailure, get_communicator, run_on_root
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.data_parallel import DataParallel
from mnn.distributed.training.position import Position
from mnn.distributed.training.preflight import RESUME_MUST_MATCH, JobConfigError, PreparedJob, prepare_job
from mnn.distributed.training.reporting import Reporter, json_text
from mnn.distributed.training.stopping import StopRequests, TrainingInterrupted
from mnn.distributed.training.task import EVAL_BATCH_SIZE, build_net, build_optimizer, evaluate, learning_rate
from mnn.distributed.training.output_dir import DIVERGED_NAME, LOCK_NAME, PREVIOUS_RUN, RUN_FILES
from mnn.distributed.timeline import Timeline, check_timeline_path
from mnn.distributed.watchdog import StallWatchdog
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
    "TrainingFailed",
    "TrainingDiverged",
    "DIVERGED_NAME",
    "RESUME_MUST_MATCH",
    "EVAL_BATCH_SIZE",
]


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
    Raises :class:`JobConfigError` on every rank if the job cannot start;
    :class:`TrainingInterrupted` on every rank when any rank gets SIGINT or
    SIGTERM before the run is complete: after the same step (with a checkpoint
    of that step in OUTPUT), or at once on a second signal; and
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
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return _run(job, comm, stop_requests, watchdog, started)
        finally:
            try:
                job.release()
            except OSError:
                pass  # OUTPUT turned read-only: the next job takes the lock over, as a dead job's


def _run(job: PreparedJob, comm: Communicator, stop_requests: StopRequests, watchdog: StallWatchdog,
         started: float) -> dict[str, Any]:
    """The training loop of a prepared job."""
    config, net, optimizer, position = job.config, job.net, job.optimizer, job.position
    dataset, task, sampler = job.dataset, job.task, job.sampler
    output = Path(config.output) if config.output is not None else None
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    reporter = Reporter(comm.rank == 0, output, config.epochs, steps_per_epoch)
    for note in job.notes:
        reporter.message(note)
    timeline = _open_timeline(comm, config)  # off, and free, without --timeline
    dp = DataParallel(net, optimizer, comm, bucket_bytes=config.bucket_bytes, allreduce=config.allreduce,
                      grad_compression=config.grad_compression, timeline=timeline)  # broadcasts rank 0's state
    run = _RunClock(started)
    if stop_requests.vote(comm).stop:
        raise TrainingInterrupted("interrupted before training started; nothing was trained", ranks_agreed=True)

    # A resumed run with no step left says so, and finishes writing what its run did not.
    if job.resumed_from is not None and _finished(config, position, total_steps):
        reporter.message(_nothing_left_text(job.resumed_from, config, position, steps_per_epoch))
        summary = _summary(comm, config, position, job.resumed_from, None, evaluate(net, dataset.test, task, comm),
                           run, dp, _Skips())
        timeline.close()
        if output is not None:
            try:
                _on_root_writing(comm, output, lambda: _write_missing_results(output, net.state_dict(), summary,
                                                                              reporter))
            except _WriteFailed as failure:
                raise TrainingFailed(f"{failure}; the finished run's checkpoint is {job.resumed_from}") from None
        return summary

    saved = _Saved(job.resumed_from, position) if job.resumed_from is not None else None
    try:
        _on_root_writing(comm, output, lambda: _start_record(output, config, job, position, total_steps, reporter))
    except _WriteFailed as failure:
        reporter.close()
        timeline.close()
        raise TrainingFailed(_write_failed_text(reporter, position, failure, saved, output)) from None

    losses = _LossSums()
    skips = _Skips()
    first_step = position.global_step
    train_loss: float | None = None  # mean over the last epoch (or part of one) trained
    last_eval: dict[str, Any] | None = None
    evaluated_at = -1  # the global step of last_eval
    try:
        stopping = False
        while not stopping and not _finished(config, position, total_steps):
            for batch in sampler.batches(position.epochs_done, start_step=position.step_in_epoch):
                # determine and set the learning rate of this step (and tell the watchdog and the
                # timeline which it is)
                watchdog.progress(position.global_step + 1)
                timeline.next_step(position.global_step + 1)
                optimizer.lr = learning_rate(config, comm.size, position.global_step, steps_per_epoch)

                # forward and backward on this rank's shard of the global batch, gradients reduced
                # (random layers such as dropout draw from the step and each sample's place in the
                # global batch, so any number of ranks draws the same)
                step_started = time.perf_counter()
                x, y = dataset.train.batch(batch.indices, config.dtype)
                net.start_batch(position.global_step, batch.offset)
                loss = float(dp(x, task.targets(y)))
                dp.backward(global_batch_size=batch.global_batch_size)
                dp.synchronize()

                # every rank agrees on stopping and on non-finite numbers (one small all-reduce)
                vote = stop_requests.vote(comm, nonfinite=not (math.isfinite(loss) and dp.gradients_finite()))
                stopping = vote.stop
                if vote.nonfinite:
                    what = _nonfinite_text(comm, loss, dp.gradients_finite())
                    failed = position.after_step(batch.global_batch_size)
                    if config.on_nonfinite == "skip" and skips.skip() != config.max_skipped_steps:
                        reporter.nonfinite(failed, what, "skipped")
                        dp.zero_grads()  # the update is skipped; the batch counts as seen
                    else:
                        if config.on_nonfinite == "skip":
                            what += (f"; {skips.in_a_row} steps in a row were not finite "
                                     f"(--max-skipped-steps {config.max_skipped_steps})")
                        reporter.nonfinite(failed, what, "stopped")
                        reporter.close()
                        raise _diverged(comm, output, dp, position, config, saved, reporter,
                                        f"training diverged at {reporter.where(failed)}: {what}; its update "
                                        "was not applied")
                else:
                    skips.in_a_row = 0
                    dp.step()
                    losses.add(loss, len(y))
                run.add_step(time.perf_counter() - step_started, batch.global_batch_size)
                position = position.after_step(batch.global_batch_size)

                # log the training loss
                reporter.step()
                if position.global_step % config.log_every == 0:
                    _log_training(reporter, losses, comm, position, optimizer.lr)

                # termination conditions: max_steps, or a stop request on any rank
                if stopping or position.global_step >= total_steps:
                    break
            if position.step_in_epoch < steps_per_epoch:
                break  # stopped mid-epoch, by max_steps or a stop request

            # the end of an epoch (also when a stop request came at its last
            # step, so that the checkpoint is at the epoch's end): log, evaluate,
            # write a checkpoint
            _log_training(reporter, losses, comm, position, optimizer.lr)
            train_loss = losses.end_epoch()
            position = position.after_epoch()
            if config.eval_every and position.epochs_done % config.eval_every == 0:
                last_eval, evaluated_at = _evaluate(net, dataset, task, comm, reporter, position)
            if output is not None and config.checkpoint_every \
                    and position.epochs_done % config.checkpoint_every == 0:
                saved = _save(comm, output, dp, position, config)

        # a stop request before the end: checkpoint this step, then stop every rank
        if stopping and not _finished(config, position, total_steps):
            reporter.close()
            if output is not None and not _saved_here(saved, output, position):
                saved = _save(comm, output, dp, position, config)
            raise TrainingInterrupted(_interrupted_text(reporter, position, saved, output), ranks_agreed=True)

        # the run is complete: a stop request from here on changes nothing (it is
        # counted, and the last checkpoint, the model and the summary are written)
        _log_training(reporter, losses, comm, position, optimizer.lr)
        reporter.close()
        if skips.total and skips.total == position.global_step - first_step:
            raise _diverged(comm, output, dp, position, config, saved, reporter,
                            f"training diverged: the loss or gradient of every step of this run "
                            f"({skips.total}) was not finite, so nothing was trained")
        train_loss = losses.end_epoch() if losses.epoch_samples else train_loss
        if output is not None and (config.checkpoint_every or position.epochs_done < config.epochs) \
                and not _saved_here(saved, output, position):
            saved = _save(comm, output, dp, position, config)
        if evaluated_at != position.global_step or last_eval is None:
            last_eval, evaluated_at = _evaluate(net, dataset, task, comm, reporter, position)
        summary = _summary(comm, config, position, job.resumed_from, train_loss, last_eval, run, dp, skips)
        timeline.close()
        _on_root_writing(comm, output, lambda: _finish_record(output, net.state_dict(), summary, reporter))
    except _WriteFailed as failure:  # raised on every rank alike
        reporter.close()
        timeline.close()
        raise TrainingFailed(_write_failed_text(reporter, position, failure, saved, output)) from None
    except (TrainingInterrupted, TrainingFailed):
        timeline.close()  # raised on every rank alike, so the spans can still be gathered
        raise
    except KeyboardInterrupt:
        reporter.close()
        raise TrainingInterrupted(_interrupted_text(reporter, position, saved, output)) from None
    return summary


class TrainingFailed(RuntimeError):
    """Training stopped during the run, on every rank alike (OUTPUT could not be written);
    the message says why and which checkpoint to continue from."""


class TrainingDiverged(TrainingFailed):
    """A step's loss or gradient was not finite (``on_nonfinite = "stop"``, or too many
    skipped steps); raised on every rank alike, before that step's update. The last
    checkpoint is left as it was; the state before the step goes beside it, to
    OUTPUT/diverged.npz (:data:`DIVERGED_NAME`), for inspection."""


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


def _finished(config: TrainConfig, position: Position, total_steps: int) -> bool:
    return position.epochs_done >= config.epochs or position.global_step >= total_steps


# ------------------------------------------------------------------ the loop's steps
def _check_timeline(comm: Communicator, config: TrainConfig) -> None:
    """Refuse, as a bad job, a ``--timeline`` that would overwrite a file mnn did not write
    as a timeline, or one of the run's own outputs (collective; rank 0 checks)."""
    if config.timeline is None:
        return
    try:
        run_on_root(comm, lambda: check_timeline_path(config.timeline, _run_output(config.timeline, config.output)))
    except RankFailure as failure:
        raise JobConfigError(failure.failures) from failure


def _run_output(path: str, output: str | None) -> str | None:
    """What ``path`` is among the files a run writes into ``output`` (None when it is none of them)."""
    if output is None:
        return None
    file, folder = Path(path).absolute(), Path(output).absolute()
    if file == folder or folder / PREVIOUS_RUN in (file, *file.parents):
        return f"the output directory {output!r} or its {PREVIOUS_RUN}/"
    if file.parent == folder and (file.name in (*RUN_FILES, LOCK_NAME)
                                  or (file.name.startswith(Path(CHECKPOINT_NAME).stem)
                                      and file.suffix == Path(CHECKPOINT_NAME).suffix)):
        return f"a file of this run's output directory {output!r}"
    return None


def _open_timeline(comm: Communicator, config: TrainConfig) -> Timeline:
    """The run's timeline (collective; disabled without ``config.timeline``); a file rank 0
    cannot create stops every rank before training, as a bad job."""
    try:
        return Timeline(comm, config.timeline)
    except RankFailure as failure:
        raise JobConfigError(failure.failures) from failure


def _log_training(reporter: Reporter, losses: _LossSums, comm: Communicator, position: Position,
                  lr: float) -> None:
    """A train event for the window's loss (collective); nothing when the window is empty.
    Raises _WriteFailed on every rank when rank 0 could not write metrics.jsonl."""
    window = losses.take_window(comm, write_failed=reporter.write_failure is not None)
    if window is not None:
        reporter.train(position, window[0], lr, window[1])


def _evaluate(net: SequentialLayers, dataset: Any, task: Any, comm: Communicator, reporter: Reporter,
              position: Position) -> tuple[dict[str, Any], int]:
    """Evaluate on the test split and report it (collective); returns the metrics and the step."""
    metrics = evaluate(net, dataset.test, task, comm)
    reporter.eval(position, metrics)
    return metrics, position.global_step


def _save(comm: Communicator, output: Path, dp: DataParallel, position: Position, config: TrainConfig,
          name: str = CHECKPOINT_NAME) -> _Saved:
    """Write OUTPUT/checkpoint.npz (or OUTPUT/``name``) on rank 0 (collective: a failure,
    _WriteFailed, stops every rank). Parameters that are not finite are never written over
    a checkpoint."""
    state = dp.net.state_dict()
    bad = [key for key, value in state.items() if not np.isfinite(value).all()]
    if bad and name == CHECKPOINT_NAME:
        raise TrainingDiverged(f"the parameters are not finite at {position.global_step} steps ({bad[0]} and "
                               f"{len(bad) - 1} more): no checkpoint is written over a finite one; lower --lr")
    checkpoint = Checkpoint(state, dp.optimizer.state_dict(), position, comm.size, config.to_dict())
    path = output / name
    keep = config.keep_checkpoints if name == CHECKPOINT_NAME else 1
    _on_root_writing(comm, path, lambda: save_checkpoint(path, checkpoint, keep=keep))
    return _Saved(str(path), position)


def _diverged(comm: Communicator, output: Path | None, dp: DataParallel, position: Position, config: TrainConfig,
              saved: _Saved | None, reporter: Reporter, headline: str) -> TrainingDiverged:
    """The error a run that diverged at ``position``'s next step raises (collective). Its
    checkpoints are left as they are; the state before the failed step, when no checkpoint
    holds it, is kept beside them as OUTPUT/diverged.npz, for inspection."""
    kept, not_kept = None, ""
    if output is not None and not _saved_here(saved, output, position):
        try:
            kept = _save(comm, output, dp, position, config, name=DIVERGED_NAME)
        except _WriteFailed as failure:
            not_kept = f"; the state before it could not be kept: {failure}"
    return TrainingDiverged(_diverged_text(reporter, headline, config, saved, kept, output) + not_kept)


def _on_root_writing(comm: Communicator, path: Path | None, write: Any) -> None:
    """``write()`` on rank 0, which writes ``path`` (a file or OUTPUT; None: no file, only
    lines); if it raised, _WriteFailed on every rank (collective)."""
    try:
        run_on_root(comm, write)
    except RankFailure as failure:
        raise _WriteFailed(f"cannot write {path or 'the output'}: {failure.failures[0]}") from None


def _start_record(output: Path | None, config: TrainConfig, job: PreparedJob, position: Position,
                  total_steps: int, reporter: Reporter) -> None:
    """Rank 0's first lines and files: config.toml, and metrics.jsonl begun."""
    if output is not None:
        atomic_write_text(output / "config.toml", config.to_toml())
    reporter.start(position, total_steps, resumed=job.resumed_from is not None)
    if job.resumed_from is not None:
        reporter.resume(job.resumed_from, position, job.changed)
    elif config.resume is True:
        reporter.message(f"no {CHECKPOINT_NAME} in {config.output} yet: starting from scratch")
    reporter.raise_write_failure()


def _finish_record(output: Path | None, model_state: dict[str, np.ndarray], summary: dict[str, Any],
                   reporter: Reporter) -> None:
    """Rank 0's last files: model.npz, summary.json and the summary event (with its line)."""
    if output is not None:
        _write_results(output, model_state, summary)
    reporter.summary(summary)
    reporter.raise_write_failure()


def _saved_here(saved: _Saved | None, output: Path, position: Position) -> bool:
    return saved is not None and saved.path == str(output / CHECKPOINT_NAME) and saved.position == position


def _summary(comm: Communicator, config: TrainConfig, position: Position, resumed_from: str | None,
             train_loss: float | None, last_eval: dict[str, Any], run: _RunClock,
             dp: DataParallel, skips: _Skips) -> dict[str, Any]:
    # Times and rates as rank 0 measured them, so every rank returns the same summary.
    rates = comm.broadcast_object({
        "samples_per_s": run.samples / run.train_s if run.train_s else 0.0,
        "train_s": run.train_s,
        "wall_s": time.perf_counter() - run.started,
        "timings": dict(dp.timings),
    })
    return {
        "world_size": comm.size,
        "epochs": position.epochs_done,
        "steps": position.global_step,
        "samples_seen": position.samples_seen,
        "skipped_steps": skips.total,
        "stopped_early": position.epochs_done < config.epochs,
        "resumed_from": resumed_from,
        "train_loss": train_loss,
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


def _diverged_text(reporter: Reporter, headline: str, config: TrainConfig, saved: _Saved | None,
                   kept: _Saved | None, output: Path | None) -> str:
    """What diverged, the checkpoint to continue from (left as it was) and where the state
    before the failed step was kept."""
    or_skip = ", or with --on-nonfinite skip" if config.on_nonfinite == "stop" else ""
    if saved is None:
        message = (f"{headline}. No checkpoint was written{'' if output is not None else ' (no --output)'}: "
                   f"start again with a lower --lr{or_skip}")
    else:
        message = (f"{headline}. The last checkpoint, {saved.path} at {reporter.where(saved.position)}, is "
                   f"left as it was: continue with {_resume_option(saved, output)} and a lower --lr{or_skip}")
    if kept is not None:
        message += (f"; the state before the failed step, at {reporter.where(kept.position)}, is in {kept.path}, "
                    "for inspection")
    return message


def _write_failed_text(reporter: Reporter, position: Position, failure: _WriteFailed, saved: _Saved | None,
                       output: Path | None) -> str:
    """Which file could not be written, where the run stopped and how to continue it."""
    # rank 0 prints it: its reporter knows the first write that failed
    what = reporter.write_failure or str(failure) or "cannot write the output files (on rank 0)"
    message = f"{what}; training stopped at {reporter.where(position)}"
    if saved is None:
        return message + "; no checkpoint was written"
    return (message + f"; the last checkpoint is {saved.path}, at {reporter.where(saved.position)}: continue with "
            f"{_resume_option(saved, output)} once {output} can be written")


def _resume_option(saved: _Saved, output: Path | None) -> str:
    """``--resume``, or ``--resume PATH`` when the checkpoint is not OUTPUT/checkpoint.npz."""
    if output is not None and saved.path == str(output / CHECKPOINT_NAME):
        return "--resume"
    return f"--resume {saved.path}"


def _interrupted_text(reporter: Reporter, position: Position, saved: _Saved | None, output: Path | None) -> str:
    """Where the run stopped and how to continue it."""
    message = f"interrupted at {reporter.where(position)}; "
    if saved is None:
        return message + "no checkpoint was written" + ("" if output is not None else " (no --output)")
    again = _resume_option(saved, output)
    if saved.position == position:
        return message + f"checkpoint saved to {saved.path}; continue with {again}"
    return message + f"the last checkpoint is {saved.path}, at {reporter.where(saved.position)}; continue with {again}"
