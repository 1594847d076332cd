"""The scripts' logging setup."""

import logging


def setup_logging(timestamps: bool = True) -> None:
    """The scripts' log format: `12:03:04 INFO ldm.sweep.runs: ...` (INFO and above, on stderr)."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s " + fmt if timestamps else fmt, datefmt="%H:%M:%S")
