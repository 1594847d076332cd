"""Optional packages, imported when a feature needs them, with an error that says what needs them and how to get
them."""

import importlib
from typing import Any


def optional_import(name: str, needed_for: str, fix: str, error: type = ImportError) -> Any:
    """Module `name` of an optional package, or `error` saying what needs it and how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise error(f"{needed_for} needs {name.split('.')[0]} ({e}): {fix}") from None
