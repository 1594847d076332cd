"""Evaluating design-space runs: metric backends (DINO, CLIP, the tiny world's), sampling with fixed seeds, the
per-run results table, a training callback, and the analysis of variance with its report.

`backends` (the interface and registry), `metrics`, `sampling`, `evaluate` (runs -> table rows), `table` (the CSV),
`callback` (SubjectFidelity), `anova` and `report`. The command lines are scripts/evaluate.py and scripts/anova.py.
"""
from ldm.evaluation.backends import (EvaluationError, MetricBackend, WeightsNotFoundError, get_backend,  # noqa: F401
                                     register_backend)
