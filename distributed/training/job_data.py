"""The data a job names: its ``dataset`` setting read as a dataset, a text, or arrays from Python.

``dataset`` is the name of a dataset of :mod:`mnn.datasets` (``"digits"``, a
folder), ``"text"`` or ``"text:PATH"`` for a character text cut into windows as
long as the model's context, or ``"arrays"`` for a run given its arrays from
Python. Training (:mod:`.preflight`) loads the data this way, and so does
whatever reads a run afterwards (``mnn-generate`` reading the text of a
checkpoint's job), so that both take the same text with the same windows.
"""
from __future__ import annotations

from mnn.datasets import Dataset, load_dataset
from mnn.model import GPT_KEYS
from mnn.text import load_text
from mnn.distributed.training.config import TrainConfig

__all__ = ["ARRAYS_DATASET", "TEXT_DATASET", "TEXT_EPOCH_STEPS", "load_job_dataset", "is_text_job", "text_context",
           "text_epoch_steps"]

# The dataset setting of a job whose arrays came from Python (train(..., data=...)).
ARRAYS_DATASET = "arrays"
# The dataset setting of a character text: "text" (the standard library's sources) or "text:PATH".
TEXT_DATASET = "text"
# Steps in an "epoch" of text windows drawn at random, unless steps_per_epoch says.
TEXT_EPOCH_STEPS = 200


def load_job_dataset(config: TrainConfig) -> Dataset:
    """The dataset ``config.dataset`` names (a text cut into windows of the model's context)."""
    spec = config.dataset
    if spec == ARRAYS_DATASET:
        raise ValueError(f"dataset {ARRAYS_DATASET!r}: the run was given its data as arrays from Python "
                         f"(train(..., data=...)); pass them again, or name a dataset")
    if is_text_job(config):
        return load_text(spec.partition(":")[2] or None, context=text_context(config))
    return load_dataset(spec)


def is_text_job(config: TrainConfig) -> bool:
    """Whether the job trains on a character text (``dataset`` is ``"text"`` or ``"text:PATH"``)."""
    return config.dataset == TEXT_DATASET or config.dataset.startswith(TEXT_DATASET + ":")


def text_epoch_steps(config: TrainConfig) -> int:
    """The steps of an epoch of a text job (whose windows are drawn at random)."""
    return config.steps_per_epoch or TEXT_EPOCH_STEPS


def text_context(config: TrainConfig) -> int:
    """The window a text dataset cuts for the model: a GPT's context, or the context of the
    positional embedding in a layer description."""
    model = config.model or {}
    if "gpt" in model:
        return model["gpt"].get("context", GPT_KEYS["context"])
    for layer in model.get("layers", []):
        if layer.get("type") == "PositionalEmbeddingLayer":
            return layer["context"]
    raise ValueError(f"dataset {config.dataset!r}: a text is cut into windows as long as the model's context; "
                     f"describe a model with one ([model.gpt] context = 64, or a PositionalEmbeddingLayer)")
