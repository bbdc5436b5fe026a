"""The argparse number types every entry point shares (mnn.scripts.arguments)."""
import argparse

import pytest

from mnn.scripts.arguments import at_least, int_list, positive


@pytest.mark.parametrize("parse, text, value", [
    (positive(int), "3", 3), (positive(float), "1e-3", 1e-3), (at_least(0), "0", 0), (at_least(0, float), "0", 0.0),
    (at_least(2), "2", 2), (positive(int, at_most=10), "10", 10), (int_list(1, "rank count"), "1,2,4", [1, 2, 4]),
])
def test_numbers_that_fit_are_converted(parse, text, value):
    assert parse(text) == value and type(parse(text)) is type(value)


@pytest.mark.parametrize("parse, text, message", [
    (positive(int), "0", "expected a positive integer, got '0'"),
    (positive(int), "2.5", "expected a positive integer, got '2.5'"),
    (positive(float), "nan", "expected a positive number, got 'nan'"),
    (positive(float, unit="seconds"), "inf", "expected a positive number of seconds, got 'inf'"),
    (positive(int, unit="ranks"), "x", "expected a positive whole number of ranks, got 'x'"),
    (positive(int, at_most=10, unit="ranks"), "11", "expected at most 10 ranks, got 11"),
    (positive(int, at_most=10, unit="ranks"), "9" * 5000, "expected at most 10 ranks, got a number of 5000 digits"),
    (at_least(0), "-1", "expected an integer >= 0, got '-1'"),
    (at_least(0), "9" * 5000, "expected an integer >= 0, got '" + "9" * 40 + "'... (5,000 characters)"),
    (at_least(0, float), "-0.5", "expected a number >= 0, got '-0.5'"),
    (at_least(4), "2", "expected an integer >= 4, got '2'"),
    (int_list(1, "rank count"), "1,x", "expected comma-separated integers, got '1,x'"),
    (int_list(1, "rank count"), ",", "expected comma-separated integers, got ','"),
    (int_list(1, "rank count"), "2,0", "expected every rank count >= 1, got 0"),
])
def test_what_does_not_fit_says_what_was_expected_and_what_came(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)
    assert str(refused.value) == message
