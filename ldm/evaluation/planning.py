"""Planning a study from a pilot: how many subjects and training seeds detect a given difference between design points.

From the pilot's analysis of a metric come two variances:
- sigma² (seed to seed): the residual mean square of the pilot's model, i.e. how much runs of one design point and
  subject differ between training seeds;
- tau² (subject to subject, per design point): how much the difference between design points changes from one
  subject to another, from the design point x subject interaction, tau² = max(0, (MS_interaction - sigma²) / r) with
  r the pilot's seeds per cell. A pilot with one subject cannot estimate it; it is then taken as 0 and the plan says
  so (more seeds could then seem to replace subjects, which they cannot when subjects differ).

A comparison of two design points, each run on S subjects x R seeds, has the standard error
SE = sqrt(2 (tau² / S + sigma² / (S R))); it detects (80 % power, two-sided, Holm's strictest step alpha / m over the
m pairs of design points) a difference of mdd = (t(1 - alpha / 2m) + t(power)) SE on the design's error degrees of
freedom, the same formula as the comparisons' `mdd` column. The error df of a plan is P S R - P S - R + 1 (cells of
design point x subject and the seed block) when tau² counts, else P S R - P - S - R + 2 (additive model).
"""
import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ldm.evaluation.anova import POWER, AnalysisError, Model, type2
from ldm.evaluation.study import POINT, MetricAnalysis, point_model

PLAN_COLUMNS = ["subjects", "seeds", "runs", "df", "se", "mdd", "detects"]
SUBJECTS = (1, 2, 4, 6, 8)
SEEDS = (2, 3, 4, 6, 8)


@dataclass
class Pilot:
    """The variances a plan rests on, and what they were estimated from."""
    metric: str
    points: int          # design points compared
    sigma2: float        # seed-to-seed variance
    tau2: Optional[float]  # subject-to-subject variance of a design point's effect; None: not estimable
    subjects: int
    seeds: float         # the pilot's runs per design point and subject


def pilot(r: MetricAnalysis, subject: str = "subject") -> Pilot:
    """The variances of one metric's pilot analysis (its design points: the combinations of its factors)."""
    data = r.model.data
    points = point_model(r.model)
    n_points = points.data[POINT].nunique()
    blocks = tuple(b for b in r.model.blocks if b != subject)
    has_subject = subject in r.model.blocks
    terms = ((subject, POINT),) if has_subject else ()
    model = Model(points.data, r.metric, (POINT,), blocks + ((subject,) if has_subject else ()), terms)
    table, fit = type2(model)
    if fit.df_resid < 1:
        raise AnalysisError(f"the pilot of {r.metric} has no error degrees of freedom: it needs 2 or more seeds per "
                            "design point")
    sigma2 = fit.mse
    cells = data.groupby([*r.model.factors, *([subject] if has_subject else [])]).size()
    seeds = float(cells.mean())
    tau2 = None
    if has_subject:
        row = table[table.term == f"{subject}:{POINT}"].iloc[0]
        if row.df > 0:
            tau2 = max(0.0, (row.sum_sq / row.df - sigma2) / seeds)
    return Pilot(r.metric, int(n_points), float(sigma2), tau2,
                 int(data[subject].nunique()) if has_subject else 1, seeds)


def plan_row(p: Pilot, subjects: int, seeds: int, alpha: float, power: float = POWER) -> dict:
    """The standard error and detectable difference of a comparison of two design points with this many subjects
    and seeds, on the plan's error df."""
    tau2 = p.tau2 or 0.0
    runs = p.points * subjects * seeds
    df = runs - p.points * subjects - seeds + 1 if tau2 > 0 and subjects > 1 else \
        runs - p.points - subjects - seeds + 2
    se = float(np.sqrt(2 * (tau2 / subjects + p.sigma2 / (subjects * seeds))))
    m = max(1, p.points * (p.points - 1) // 2)
    mdd = (stats.t.ppf(1 - alpha / (2 * m), df) + stats.t.ppf(power, df)) * se if df >= 1 else np.nan
    return {"subjects": subjects, "seeds": seeds, "runs": runs, "df": df, "se": se, "mdd": float(mdd)}


def plan_table(p: Pilot, alpha: float, subjects: Sequence[int] = SUBJECTS, seeds: Sequence[int] = SEEDS,
               diff: Optional[float] = None) -> pd.DataFrame:
    """The detectable difference for each number of subjects and seeds (and whether it reaches `diff`)."""
    rows = [plan_row(p, s, r, alpha) for s, r in itertools.product(subjects, seeds)]
    table = pd.DataFrame(rows)
    table["detects"] = table.mdd <= diff if diff is not None else np.nan
    return table[PLAN_COLUMNS]


def smallest_plans(p: Pilot, diff: float, alpha: float, subjects: Sequence[int] = range(1, 13),
                   max_seeds: int = 64) -> pd.DataFrame:
    """For each number of subjects, the fewest seeds whose plan detects `diff` (none when even max_seeds does not)."""
    check_difference(diff)
    rows: List[dict] = []
    for s in subjects:
        found = next((plan_row(p, s, r, alpha) for r in range(2, max_seeds + 1)
                      if plan_row(p, s, r, alpha)["mdd"] <= diff), None)
        rows.append({**(found or {"subjects": s, "seeds": np.nan, "runs": np.nan, "df": np.nan, "se": np.nan,
                                  "mdd": np.nan}), "detects": found is not None})
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def check_difference(diff: float) -> float:
    """A difference to plan for: a positive finite number."""
    if not isinstance(diff, (int, float)) or not np.isfinite(diff) or diff <= 0:
        raise AnalysisError(f"the difference to detect must be a positive number, got {diff}: e.g. --plan 0.015")
    return float(diff)


def pilot_text(p: Pilot) -> str:
    """What the plan assumes, in words."""
    tau = (f"subject-to-subject sd of a design point's effect {np.sqrt(p.tau2):.3g} (from {p.subjects} subjects)"
           if p.tau2 is not None else "no subject-to-subject variance (the pilot has one subject, or no df to "
           "estimate it): assumed 0, so the plan is a lower bound on the subjects needed")
    return (f"{p.metric}: {p.points} design points; seed-to-seed sd {np.sqrt(p.sigma2):.3g} (the pilot's residual, "
            f"{p.seeds:.3g} seeds per design point and subject); {tau}")
