"""Checks of user-given values, shared by the layers, the trainer and the sampler.

Each helper returns the value in its canonical form or raises a ``TypeError`` /
``ValueError`` that names the value and says what was expected and what came::

    width = check_int("n_in", n_in, minimum=1)
    lr = check_float("lr", lr)
    check_choice("optimizer", name, ("sgd", "adam"))

:func:`did_you_mean` is the one place that suggests a name for a mistyped one
(a job file's key, a layer type, a command-line option).
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import numpy as np

__all__ = ["is_int", "check_int", "check_float", "check_choice", "check_float_dtype", "as_generator",
           "did_you_mean"]

# How alike a name must be to a valid one to be suggested: difflib's ratio, 2 * matches / total
# length. 0.6 (difflib's default) takes 'batchsize' for 'batch_size' and 'LinearLayr' for
# 'LinearLayer' but suggests nothing for a word that only shares a few letters with one.
_SUGGESTION_CUTOFF = 0.6


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer, Python or NumPy; a ``bool`` is not
    (it is an int subclass, but ``epochs = true`` is a mistake, not 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int if it is an integer (Python or NumPy, not a bool)
    of at least ``minimum``; else a TypeError/ValueError naming ``name``."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value: Any) -> float:
    """``value`` as a finite Python float (ints are accepted); else an error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a number, got {value!r} ({type(value).__name__})")
    # nan slips through every `<`/`>` range check and inf trains to a nan loss.
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def check_float_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype for ``dtype``, which must be float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
    return dtype


def as_generator(rng: Any) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a Generator, an int seed or ``None``."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or is_int(rng):
        return np.random.default_rng(rng)
    raise TypeError(f"rng: expected a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def did_you_mean(name: Any, valid: Iterable[str]) -> str:
    """The phrase ``(did you mean 'batch_size'?)``, after a space, when one of the
    ``valid`` names is close to ``name`` (the closest), else ``""``: to add after the
    mistyped name in an error message, which still lists the valid names. A ``name``
    that is not a string (``type = 3``) has no suggestion.

    Leading dashes are left out of the comparison: every option has them, and they
    would make ``--bogus`` look like ``--loss``."""
    if not isinstance(name, str):
        return ""
    by_word = {option.lstrip("-"): option for option in valid}
    close = difflib.get_close_matches(name.lstrip("-"), list(by_word), n=1, cutoff=_SUGGESTION_CUTOFF)
    return f" (did you mean {by_word[close[0]]!r}?)" if close else ""
