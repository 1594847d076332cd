"""Evaluating design-space runs: metric backends (DINO, CLIP, the tiny world's), sampling with fixed seeds, the
per-run results table, a training callback, and the analysis of variance with its report.

`backends` (the interface and the backend registry), `preprocess` (the models' preprocessing from their
preprocessor_config.json), `metrics` (the evaluation protocol: the metric registry and `measure`), `fid` (FID as
torch-fidelity computes it), `sampling`, `evaluate` (runs -> table rows), `table` (the CSV), `callback` (the protocol
during training); the analysis: `anova` (the model and Type II tests),
`comparisons` (levels, adjusted pairs, correlations), `study` (per metric), `findings` (sentences from the numbers)
and `report` (files). The command lines are scripts/evaluate.py and scripts/anova.py.
"""
from ldm.evaluation.backends import EvaluationError, MetricBackend, WeightsNotFoundError, get_backend  # noqa: F401
