# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""Scalar argument checks, the package's one copy (remote code: the model files import it, and so do the tools,
training, data and serving code).

`bool` is a subclass of `int` in Python, so `isinstance(True, int)` holds: an argument that must be a count has to
refuse `True` explicitly, or `batch_size=True` would run with 1. These helpers say it once; nothing else in the package
spells the guard (`tests/test_checks.py` looks for it).
"""

import math
import numbers


def is_integer(value) -> bool:
    """An `int` that is not a `bool`."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An `int` or `float` that is not a `bool` (what JSON and Python literals give)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number of any kind (Python's, numpy's of every width) that is not a `bool`."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_integer(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """`value`, or a `ValueError` naming `name` unless it is an integer >= `minimum` (and <= `maximum` if given)."""
    if maximum is None and (not is_integer(value) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if maximum is not None and (not is_integer(value) or not minimum <= value <= maximum):
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}.")
    return value


def check_number(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    """`value`, or a `ValueError` naming `name` unless it is a finite number >= `minimum` (> `minimum` if `strict`)."""
    finite = is_integer(value) or (isinstance(value, float) and math.isfinite(value))  # ints of any size are finite
    if not finite or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}.")
    return value


def check_bool(name: str, value) -> bool:
    """`value`, or a `ValueError` naming `name` unless it is `True` or `False` (a string such as `"False"` is truthy
    and must not pass for a flag)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


__all__ = ["is_integer", "is_number", "is_real", "check_integer", "check_number", "check_bool"]
