r"""What a job trains and how it is measured: the net, the optimizer and its learning
rate, the targets the loss layer takes, and the evaluation.

The loss is the net's last layer, so the loss choice and everything that
depends on it sit here together. A :class:`Task` is chosen from the loss layer
and the data (:func:`choose_task`):

* class labels (integers) with a loss that takes them (``CrossEntropyLossLayer``,
  ``NllLossLayer``): the labels go to the loss as they are; accuracy is the
  share of samples whose largest output is the label;
* class labels with ``MSELossLayer``: the loss gets one-hot rows of the
  labels, accuracy as above;
* floating-point targets (regression): they go to the loss as they are; the
  loss (mean squared error) is the metric, there is no accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnn import SGD, Adam, CrossEntropyLossLayer, MSELossLayer, NllLossLayer, SequentialLayers
from mnn.datasets import Dataset, Split
from mnn.distributed.comm import Communicator
from mnn.distributed.training.config import TrainConfig
from mnn.distributed.sampler import shard_sizes
from mnn.model import build_net, check_fits

__all__ = ["build_job_net", "build_optimizer", "learning_rate", "Task", "choose_task", "evaluate", "EVAL_BATCH_SIZE"]

# Samples per forward pass during evaluation; any size gives the same metrics.
EVAL_BATCH_SIZE = 1024
# ... for a text, whose samples are windows of many positions each (128 windows
# of 64 characters are already 8192 positions).
EVAL_WINDOWS = 128
# Samples run through the net to check that the data fits it.
_CHECK_SAMPLES = 2


def build_job_net(config: TrainConfig) -> SequentialLayers:
    """The net a job trains: :func:`mnn.model.build_net` of ``config.model_description()``
    (the ``[model]`` table, or the MLP shorthand) in ``config.dtype``.

    Parameters are drawn from one Generator seeded with ``config.seed``, layer by
    layer, so every rank builds the same net.
    """
    return build_net(config.model_description(), dtype=config.dtype, rng=config.seed)


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

    .. math::
        \eta_t = \eta \, (t + 1) / W, \qquad t < W. \tag{1}

    After it, with ``lr_decay = "cosine"`` (Loshchilov and Hutter 2017, without
    restarts) the lr falls along half a cosine from :math:`\eta` at step :math:`W` towards 0 at step
    :math:`T` = epochs x steps_per_epoch, the end of the run; otherwise it stays
    :math:`\eta`:

    .. math::
        \eta_t = \frac{\eta}{2} \left(1 + \cos \frac{\pi (t - W)}{T - W}\right),
        \qquad W \le t < T. \tag{2}

    The lr depends on the step alone, so a resumed or restarted run goes on with
    the lr the uninterrupted run had.
    """
    target = config.lr * (world_size if config.lr_scaling == "linear" else 1)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return target * (step + 1) / warmup_steps  # Eq. (1)
    total_steps = config.epochs * steps_per_epoch
    if config.lr_decay == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return target * 0.5 * (1.0 + math.cos(math.pi * progress))  # Eq. (2)
    return target


@dataclass(frozen=True)
class Task:
    """How a split's ``y`` becomes what the loss layer takes, and how outputs are scored.

    ``n_classes`` is the width of the net's output for class labels, None for
    regression targets; ``one_hot``: the loss takes one-hot rows of the labels;
    ``per_position``: every sample has a label at each of its positions (the next
    character of a text), so accuracy counts positions, and the loss is also told
    in bits per character.
    """

    n_classes: int | None
    one_hot: bool
    dtype: str
    per_position: bool = False

    @property
    def has_accuracy(self) -> bool:
        return self.n_classes is not None

    def targets(self, y: np.ndarray) -> np.ndarray:
        """What the loss layer takes for a batch's labels or targets ``y``."""
        if not self.one_hot:
            return y
        return np.eye(self.n_classes, dtype=self.dtype)[y]

    def correct(self, outputs: np.ndarray, y: np.ndarray) -> int:
        """Samples whose largest output is their label (class labels only)."""
        return int(np.count_nonzero(outputs.argmax(axis=-1) == y))


def choose_task(net: SequentialLayers, dataset: Dataset, dtype: str) -> Task:
    """The :class:`Task` for training ``net`` on ``dataset``, after checking that they fit.

    A few training samples run through the net: a layer that does not fit what
    comes into it, labels outside the net's classes, or targets the loss layer
    cannot take raise ValueError saying so.
    """
    if net.loss_layer is None:
        raise ValueError(f"model: the last layer must be a loss layer to train, got {net.layers[-1].name}")
    x, y = dataset.train.batch(np.arange(min(_CHECK_SAMPLES, len(dataset.train))), dtype)
    with net.evaluating():
        return _checked_task(net, dataset, dtype, x, y)


def _checked_task(net: SequentialLayers, dataset: Dataset, dtype: str, x: np.ndarray, y: np.ndarray) -> Task:
    outputs = check_fits(net, x)
    if dataset.n_classes is None:
        if isinstance(net.loss_layer, (CrossEntropyLossLayer, NllLossLayer)):
            raise ValueError(f"{net.loss_layer.name} takes class labels, but the targets of {dataset.name} "
                             f"are floating-point numbers (regression): give integer labels, or end the "
                             f"net with MSELossLayer")
        task = Task(n_classes=None, one_hot=False, dtype=dtype)
    else:
        n_classes = int(outputs.shape[-1])
        dataset.check_classes(n_classes)
        task = Task(n_classes=n_classes, one_hot=isinstance(net.loss_layer, MSELossLayer), dtype=dtype,
                    per_position=y.ndim > 1)
    check_fits(net, x, task.targets(y))
    return task


def evaluate(net: SequentialLayers, split: Split, task: Task, comm: Communicator) -> dict[str, Any]:
    """Loss (and accuracy, for class labels) over the whole ``split``, sharded over the ranks (collective).

    Each rank evaluates a contiguous part of the split; the ranks then sum the
    loss sums, correct counts and label counts, so the metrics are those of the
    whole split, exactly, whatever the shard sizes (never a mean of means). Each
    batch's mean loss is weighted by its number of labels (positions, for a
    text), which is what the loss layer averages over. Dropout stands aside.
    """
    sizes = shard_sizes(len(split), comm.size)
    start = sum(sizes[:comm.rank])
    indices = np.arange(start, start + sizes[comm.rank])
    totals = np.zeros(4)  # loss sum, correct predictions, labels, samples
    batch_size = EVAL_WINDOWS if task.per_position else EVAL_BATCH_SIZE
    with net.evaluating():
        for offset in range(0, len(indices), batch_size):
            x, y = split.batch(indices[offset:offset + batch_size], task.dtype)
            outputs = net(x)  # without targets: the prediction, before the loss layer
            mean_loss = net.loss_layer.forward(outputs, task.targets(y))
            correct = task.correct(outputs, y) if task.has_accuracy else 0
            totals += (float(mean_loss) * y.size, correct, y.size, len(y))
    comm.allreduce(totals)
    loss_sum, correct, labels, samples = totals
    metrics = {"loss": loss_sum / labels, "accuracy": correct / labels if task.has_accuracy else None,
               "samples": int(samples)}
    if task.per_position:
        metrics["bits_per_char"] = metrics["loss"] / math.log(2)
    return metrics
