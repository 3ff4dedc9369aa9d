# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""Scalar argument checks shared by the tools, training and data code.

`bool` is a subclass of `int` in Python, so `isinstance(True, int)` holds: an argument that must be a count has to
refuse `True` explicitly, or `batch_size=True` would run with 1. These helpers say it once. (The remote-code files,
which may import only their siblings, keep their own few checks.)
"""


def is_integer(value) -> bool:
    """An `int` that is not a `bool`."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An `int` or `float` that is not a `bool`."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_integer(name: str, value, minimum: int = 1) -> int:
    """`value`, or a `ValueError` naming `name` unless it is an integer >= `minimum`."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


__all__ = ["is_integer", "is_number", "check_integer"]
