"""What rank 0 shows and records of a run: progress, text lines and metrics.jsonl.

:class:`Reporter` has one method per event; each writes the event's line for
a person and its JSON object for programs, so the two never disagree. Positions
are told as :class:`~mnn.distributed.training.position.Position` tells them: ``epoch`` is
the 1-based epoch trained in and ``step_in_epoch`` the global batches of it done.

OUTPUT/metrics.jsonl holds one JSON object per line, with an ``event`` key:

* ``train`` (every ``log_every`` steps and at the end of each epoch): ``epoch``,
  ``step_in_epoch``, ``global_step``, ``loss`` (mean training loss since the
  last train event), ``lr``, ``samples_per_s``;
* ``eval`` (every ``eval_every`` epochs and at the end): ``epoch``,
  ``step_in_epoch``, ``epochs_done``, ``global_step``, ``test_loss``,
  ``test_accuracy`` (null for regression targets; per position for a text,
  which also has ``test_bits_per_char``); the evaluation followed a
  partial epoch when ``epochs_done < epoch`` (its line then says "(partial)");
* ``resume`` (first, when the run continues a checkpoint): ``checkpoint``,
  ``epoch``, ``step_in_epoch``, ``epochs_done``, ``global_step`` of the
  checkpoint, and ``changed``: the settings that differ from the
  checkpoint's, as ``{name: [checkpoint's value, this job's value]}``;
* ``restart`` (after ``resume``, when mnn-launch started the job again after a
  failure): ``restart``, ``max_restarts``, ``cause``, ``ranks_before``,
  ``ranks_after``, ``checkpoint_step``, ``reached_step``, ``redo_steps``,
  ``detect_s`` and ``restart_s`` (see :mod:`~mnn.distributed.training.restarts`);
* ``nonfinite`` (when a step's loss or gradient is NaN or infinite on some
  rank): ``epoch``, ``step_in_epoch``, ``global_step`` (of that step),
  ``detail`` (what, on which ranks) and ``action``: "skipped" (the update was
  not applied, training went on) or "stopped";
* ``summary`` (last): the summary that ``train()`` returns, whose ``epochs``
  is ``epochs_done`` and whose ``restarts``, ``steps_redone`` and ``lost_s``
  add up the run's ``restart`` events.

The file is strict JSON: a number that is not finite is written as ``null``.
With ``event_files`` the ``train`` and ``eval`` events' numbers also go into a
TensorBoard event file in OUTPUT (see :mod:`~mnn.distributed.training.event_file`).
A resumed run first drops the ``train``, ``eval`` and ``nonfinite`` events
after its checkpoint (the steps it trains again), so the file tells each step
once; a line that is not UTF-8 JSON is dropped too (with a note when it is not
just a last line cut short).

A write to metrics.jsonl (or to the event file) that fails (a full disk, a directory turned read-only)
raises nothing here: the reporter keeps the first failure in
:attr:`Reporter.write_failure` and writes no more events, and the trainer stops
every rank at its next collective (see :meth:`Reporter.raise_write_failure`).

``PROGRESS_ENV`` is how a launcher tells the ranks that a person watches a
terminal: under ``mpiexec`` a rank's stderr is a pipe, so it cannot see that
for itself.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mnn.distributed.environment import PROGRESS_ENV, install_hint
from mnn.distributed.training.event_file import EventFile, event_files, scalars_of, tensorboard_installed
from mnn.distributed.training.position import Position
from mnn.distributed.training.restarts import restart_line
from mnn.io import atomic_write_text

__all__ = ["progress_bar_wanted", "Reporter", "json_text", "NOTHING_SAVED"]

# The line after `done:` of a run without an output directory, which keeps nothing.
NOTHING_SAVED = "nothing saved (no --output): add --output DIR to keep the model and checkpoints"

# Events of a step, dropped on resume when they come after the checkpoint.
_STEP_EVENTS = ("train", "eval", "nonfinite")



def progress_bar_wanted() -> bool:
    """A bar when ``MNN_PROGRESS=bar`` (mnn-launch sets it when it runs on a
    terminal: the ranks' own stderr is a pipe then), plain lines when
    ``MNN_PROGRESS=lines``, else a bar exactly when stderr is a terminal."""
    choice = os.environ.get(PROGRESS_ENV, "")
    if choice in ("bar", "lines"):
        return choice == "bar"
    return sys.stderr.isatty()


class Reporter:
    """Rank 0's side effects: progress bar or plain lines, and metrics.jsonl.

    On other ranks (``active=False``) every method does nothing. The bar is for
    a person watching a terminal (see :func:`progress_bar_wanted`); in a log
    file plain lines are easier to read. ``output`` is the run's directory, or
    None for a run that writes no files: its ``done:`` line is followed by one
    that says so (:data:`NOTHING_SAVED`), lest a long run end and leave nothing.
    ``event_files``: also write the curves as TensorBoard event files into ``output``.
    """

    def __init__(self, active: bool, output: Path | None, epochs: int, steps_per_epoch: int,
                 event_files: bool = False):
        self.active = active
        self.saves = output is not None  # whether the run keeps anything (the model, checkpoints)
        self.metrics_path = output / "metrics.jsonl" if output is not None and active else None
        self.events_dir = output if event_files and self.metrics_path is not None else None
        self.event_file: EventFile | None = None  # this start's, once begun
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.bar: Any = None
        self.write_failure: str | None = None  # the first write to metrics.jsonl that failed
        self.restarts: list[dict[str, Any]] = []  # the run's restart events, in metrics.jsonl and since

    def where(self, position: Position) -> str:
        return position.text(self.steps_per_epoch, self.epochs)

    # -- the run's start and end --------------------------------------------------------

    def start(self, position: Position, total_steps: int, resumed: bool) -> None:
        """Begin the run's record: a new run empties metrics.jsonl, a resumed one appends."""
        if not self.active:
            return
        if self.metrics_path is not None:
            kept, dropped = _events_until(self.metrics_path, position.global_step) if resumed else ([], [])
            if dropped:
                self._show(f"{self.metrics_path}: dropped line{'s' if len(dropped) > 1 else ''} "
                           f"{', '.join(map(str, dropped))}, which {'are' if len(dropped) > 1 else 'is'} "
                           "not UTF-8 JSON")
            atomic_write_text(self.metrics_path, "".join(json_text(event) + "\n" for event in kept))
            self.restarts = [event for event in kept if event.get("event") == "restart"]
        if self.events_dir is not None:
            self._begin_event_file(position.global_step if resumed else None)
        if progress_bar_wanted():
            self.bar = tqdm(total=total_steps, initial=min(position.global_step, total_steps), unit="step",
                            dynamic_ncols=True)

    def _begin_event_file(self, resumed_at: int | None) -> None:
        """This start's event file. A resumed run's hides the earlier files' steps after its
        checkpoint (trained again); a new run removes an earlier run's files, as it empties
        metrics.jsonl."""
        try:
            if resumed_at is None:
                for path in event_files(self.events_dir):
                    path.unlink()
            self.event_file = EventFile(self.events_dir, purge_step=None if resumed_at is None else resumed_at + 1)
        except OSError as error:
            self.write_failure = f"cannot write a TensorBoard event file in {self.events_dir}: {error}"
            return
        if not tensorboard_installed():  # asked for (tensorboard = true) where it is not installed
            self._show(f"TensorBoard event files go into {self.events_dir}; to view them, install TensorBoard "
                       f"({install_hint('tensorboard')}) here or where the run is copied to")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def raise_write_failure(self) -> None:
        """Raise OSError when a write to metrics.jsonl failed (on rank 0, inside a
        ``run_on_root``, so that every rank stops)."""
        if self.write_failure is not None:
            raise OSError(self.write_failure)

    # -- events -------------------------------------------------------------------------

    def message(self, line: str) -> None:
        """A line for a person only (no event): how the run starts or why it does not."""
        if self.active:
            self._show(line)

    def resume(self, checkpoint: str, position: Position, changed: dict[str, list[Any]]) -> None:
        epoch, step = position.shown(self.steps_per_epoch)
        line = f"resumed from {checkpoint} at {self.where(position)}"
        if changed:
            line += "\nsettings changed since the checkpoint: " + ", ".join(
                f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
        self._record({"event": "resume", "checkpoint": checkpoint, "epoch": epoch, "step_in_epoch": step,
                      "epochs_done": position.epochs_done, "global_step": position.global_step,
                      "changed": changed}, line)

    def restart(self, event: dict[str, Any]) -> None:
        """A restart after a failure (the event of :meth:`Restart.event
        <mnn.distributed.training.restarts.Restart.event>`)."""
        if self.active:
            self.restarts.append(event)
        self._record(event, restart_line(event))

    def train(self, position: Position, loss: float, lr: float, samples_per_s: float) -> None:
        epoch, step = position.shown(self.steps_per_epoch)
        self._record({"event": "train", "epoch": epoch, "step_in_epoch": step,
                      "global_step": position.global_step, "loss": loss, "lr": lr,
                      "samples_per_s": samples_per_s},
                     f"epoch {epoch}/{self.epochs} step {step}/{self.steps_per_epoch} | loss {loss:.4f} | "
                     f"lr {lr:.4g} | {samples_per_s:.0f} samples/s")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{samples_per_s:.0f}")

    def eval(self, position: Position, metrics: dict[str, Any]) -> None:
        epoch, step = position.shown(self.steps_per_epoch)
        partial = "" if step == self.steps_per_epoch else f" (partial, step {step}/{self.steps_per_epoch})"
        bits = {"test_bits_per_char": metrics["bits_per_char"]} if "bits_per_char" in metrics else {}
        self._record({"event": "eval", "epoch": epoch, "step_in_epoch": step,
                      "epochs_done": position.epochs_done, "global_step": position.global_step,
                      "test_loss": metrics["loss"], "test_accuracy": metrics["accuracy"], **bits},
                     f"epoch {epoch}/{self.epochs}{partial} | "
                     f"{_metrics_text(metrics['loss'], metrics['accuracy'], metrics.get('bits_per_char'))}")

    def nonfinite(self, position: Position, detail: str, action: str) -> None:
        """A step whose loss or gradient was not finite; ``position`` is that step's."""
        epoch, step = position.shown(self.steps_per_epoch)
        self._record({"event": "nonfinite", "epoch": epoch, "step_in_epoch": step,
                      "global_step": position.global_step, "detail": detail, "action": action},
                     f"epoch {epoch}/{self.epochs} step {step}/{self.steps_per_epoch} | {detail}: {action}")

    def summary(self, summary: dict[str, Any]) -> None:
        ranks = summary["world_size"]
        epochs = summary["epochs"]
        skipped = summary.get("skipped_steps", 0)
        metrics = _metrics_text(summary["test_loss"], summary["test_accuracy"], summary.get("test_bits_per_char"),
                                loss_too=False)
        self._record({"event": "summary", **summary},
                     f"done: {metrics} | "
                     f"{summary['samples_per_s']:.0f} samples/s | wall {summary['wall_s']:.1f} s | "
                     f"{ranks} rank{'s' if ranks > 1 else ''} | "
                     f"{summary['steps']} steps{f' ({skipped} skipped)' if skipped else ''}, "
                     f"{epochs} epoch{'s' if epochs != 1 else ''} done")
        if not self.saves:
            # A line of its own, not an event: the `done:` line keeps one shape for every run.
            self.message(NOTHING_SAVED)

    # -- where lines and events go ---------------------------------------------------------

    def _record(self, event: dict[str, Any], line: str) -> None:
        if not self.active:
            return
        if self.metrics_path is not None:
            try:
                with self.metrics_path.open("a") as handle:
                    handle.write(json_text(event) + "\n")
            except OSError as error:
                self.write_failure = f"cannot write {self.metrics_path}: {error}"
                self.metrics_path = None
        scalars = scalars_of(event) if self.event_file is not None else None
        if scalars:
            try:
                self.event_file.add_scalars(event["global_step"], scalars)
            except OSError as error:
                self.write_failure = self.write_failure or f"cannot write {self.event_file.path}: {error}"
                self.event_file = None
        # With a bar, train events show in it (see train); other lines print above it.
        if self.bar is None or event["event"] != "train":
            self._show(line)

    def _show(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)  # the stream the bar redraws on
            return
        try:
            print(line, flush=True)
        except OSError as error:
            # Nobody reads stdout any more (`mnn-train ... | head`), or it cannot be written
            # (a full disk): the run goes on, and what it prints from now on (and what was
            # buffered) goes to /dev/null. Only the second is news to whoever reads stderr.
            if not isinstance(error, BrokenPipeError):
                kept = f", and {self.metrics_path} keeps every event" if self.metrics_path is not None else ""
                try:
                    print(f"mnn: warning: the output cannot be printed ({error}); training goes on{kept}",
                          file=sys.stderr, flush=True)
                except OSError:
                    pass
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def _metrics_text(loss: float, accuracy: float | None, bits_per_char: float | None = None,
                  loss_too: bool = True) -> str:
    """'test loss 0.1257 | test accuracy 0.9777'; for regression (no accuracy) the loss alone;
    for a text, its bits per character first. The summary line gives the accuracy (or bits)
    alone when there is one (``loss_too=False``)."""
    if bits_per_char is not None:
        return f"test bits/char {bits_per_char:.4f}" + (f" | test loss {loss:.4f}" if loss_too else "")
    if accuracy is None:
        return f"test loss {loss:.4f}"
    if not loss_too:
        return f"test accuracy {accuracy:.4f}"
    return f"test loss {loss:.4f} | test accuracy {accuracy:.4f}"


def json_text(value: Any, **options: Any) -> str:
    """Strict JSON (RFC 8259) of ``value``: a float that is not finite becomes ``null``."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **options)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _events_until(path: Path, global_step: int) -> tuple[list[dict[str, Any]], list[int]]:
    """The events of ``path`` without the step events after ``global_step``, and the
    numbers of the lines dropped because they are not UTF-8 JSON. A last line that does
    not parse (cut short by a crash) is dropped too, without being counted."""
    if not path.exists():
        return [], []
    events, dropped = [], []
    lines = path.read_bytes().splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        try:
            event = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            if number < len(lines) or line.endswith(b"\n"):
                dropped.append(number)
            continue
        if isinstance(event, dict) and not (event.get("event") in _STEP_EVENTS
                                            and event.get("global_step", 0) > global_step):
            events.append(event)
    return events, dropped
