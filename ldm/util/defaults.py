"""The CompVis one-liners for optional arguments."""

from inspect import isfunction
from typing import Any


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """`val` if it is set, else `d` (called first when it is a function)."""
    if exists(val):
        return val
    return d() if isfunction(d) else d
