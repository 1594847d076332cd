"""Design-space sweeps: a sweep file's factors expanded into one training run per grid point, and running them.

`spec` reads and expands sweep files, `runs` lays out the sweep folder and tracks each run's state, `launch` runs
them (locally, N at a time, or as a scheduler's job list). The command line is scripts/sweep.py.
"""
from ldm.sweep.spec import SweepError, expand, load_spec, spec_hash  # noqa: F401
