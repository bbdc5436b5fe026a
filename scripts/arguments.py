"""Argparse types for the numbers the command lines take, shared by every entry point.

Each returns a function for ``add_argument(type=...)``: it converts the text or
raises :class:`argparse.ArgumentTypeError` saying what was expected and what came,
which argparse prints after the option's name::

    parser.add_argument("--epochs", type=positive(int))        # expected a positive integer, got '0'
    parser.add_argument("--timeout", type=positive(float, unit="seconds"))
    parser.add_argument("--seed", type=at_least(0))            # expected an integer >= 0, got '-1'
    parser.add_argument("--ranks", type=int_list(1, "rank count"))

A float must be finite (``nan`` and ``inf`` are no count of anything). Text
longer than a line is echoed shortened, so that a mistyped argument of thousands
of characters is still a one-line error. Standard library only: the launcher
imports this before NumPy is there.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

__all__ = ["positive", "at_least", "int_list"]

Number = TypeVar("Number", int, float)

# Longer text is echoed as its start and its length.
_ECHO_CHARS = 40


def positive(kind: type[Number] = int, *, at_most: Number | None = None,
             unit: str = "") -> Callable[[str], Number]:
    """``kind(text)`` greater than zero (and at most ``at_most``); ``unit`` names what is counted."""
    return _number(kind, 0, strict=True, at_most=at_most, unit=unit)


def at_least(minimum: Number, kind: type[Number] = int, *, unit: str = "") -> Callable[[str], Number]:
    """``kind(text)`` of ``minimum`` or more: ``at_least(0)`` is a count that may be zero."""
    return _number(kind, minimum, strict=False, at_most=None, unit=unit)


def int_list(minimum: int, what: str) -> Callable[[str], list[int]]:
    """Comma-separated integers (``1,2,4``), each at least ``minimum``; ``what`` names one of them."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {_echo(text)}")
        too_small = [value for value in values if value < minimum]
        if too_small:
            raise argparse.ArgumentTypeError(f"expected every {what} >= {minimum}, got {too_small[0]}")
        return values
    return parse


def _number(kind: type[Number], minimum: Number, strict: bool, at_most: Number | None,
            unit: str) -> Callable[[str], Number]:
    """``kind(text)``, finite, above ``minimum`` (``strict``) or at least it, and at most ``at_most``."""
    expected = _expected(kind, minimum, strict, unit)

    def parse(text: str) -> Number:
        if kind is int and at_most is not None:
            # By its digits first: thousands of them are neither converted nor echoed back.
            digits = text.strip().lstrip("+").lstrip("0")
            if digits.isdigit() and len(digits) > len(str(at_most)):
                raise argparse.ArgumentTypeError(f"expected at most {at_most:,}{_spaced(unit)}, got a number of "
                                                 f"{len(digits)} digits")
        try:
            value = kind(text)
        except ValueError:  # not a number, or an integer of more digits than Python converts
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or value < minimum \
                or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {_echo(text)}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"expected at most {at_most:,}{_spaced(unit)}, got {value:,}")
        return value
    return parse


def _expected(kind: type, minimum: float, strict: bool, unit: str) -> str:
    """What a number of ``kind`` above (``strict``) or from ``minimum`` is called in an error."""
    if unit:
        noun = f"{'whole ' if kind is int else ''}number of {unit}"
    else:
        noun = "integer" if kind is int else "number"
    if strict and minimum == 0:
        return f"a positive {noun}"
    article = "an" if noun[0] in "aeiou" else "a"
    return f"{article} {noun} {'>' if strict else '>='} {minimum:g}"


def _spaced(unit: str) -> str:
    return f" {unit}" if unit else ""


def _echo(text: str) -> str:
    """``text`` quoted as typed, or its start and length when it is longer than a line wants."""
    if len(text) <= _ECHO_CHARS:
        return repr(text)
    return f"{text[:_ECHO_CHARS]!r}... ({len(text):,} characters)"
