"""Where a training run is: the small value that the loop advances and a checkpoint stores.

A run is always between two optimizer steps. It is told one way everywhere
(lines, metrics.jsonl, messages): ``epoch`` is the 1-based epoch trained in
and ``step`` the global batches of it done so far, so the end of epoch 2 is
epoch 2, step S/S (never epoch 3, step 0); ``epochs_done`` counts complete
epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Position"]


@dataclass(frozen=True)
class Position:
    """A run's place between two optimizer steps.

    ``epochs_done``: complete epochs, so the 0-based index of the epoch being
    trained; ``step_in_epoch``: global batches of that epoch done (it equals
    the steps per epoch right after an epoch's last step, until
    :meth:`after_epoch`); ``global_step``: optimizer steps since the run began;
    ``samples_seen``: training samples in those steps, over all ranks.
    """

    epochs_done: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0

    def after_step(self, global_batch_size: int) -> Position:
        """The position after one more step on a global batch of that size."""
        return replace(self, step_in_epoch=self.step_in_epoch + 1, global_step=self.global_step + 1,
                       samples_seen=self.samples_seen + global_batch_size)

    def after_epoch(self) -> Position:
        """The position once the epoch's last step is booked: the next epoch, at its start."""
        return replace(self, epochs_done=self.epochs_done + 1, step_in_epoch=0)

    def shown(self, steps_per_epoch: int) -> tuple[int, int]:
        """``(epoch, step)``: the 1-based epoch last trained in and its steps done.
        The end of epoch 2 is ``(2, steps_per_epoch)``, not ``(3, 0)``; before any step ``(1, 0)``."""
        if self.step_in_epoch == 0 and self.epochs_done > 0:
            return self.epochs_done, steps_per_epoch
        return self.epochs_done + 1, self.step_in_epoch

    def text(self, steps_per_epoch: int, epochs: int) -> str:
        """'the end of epoch 2/10', or 'epoch 3/10 step 7/23' within an epoch."""
        epoch, step = self.shown(steps_per_epoch)
        if step == steps_per_epoch:
            return f"the end of epoch {epoch}/{epochs}"
        return f"epoch {epoch}/{epochs} step {step}/{steps_per_epoch}"
