"""Comparing the levels of a factor on a fitted model (`ldm.evaluation.anova.Model`), and metrics with each other.

- Level means: the mean of the runs at each level with a (1 - alpha) t interval on the model's residual variance,
  and the estimated marginal mean (EMM: the model's prediction averaged over a reference grid of every combination of
  the other factors' and blocks' levels, as R's emmeans) where the design makes it estimable.
- Pairwise comparisons: differences of EMMs, so each is adjusted for the other factors and the blocks; a difference
  the design cannot separate from another factor (din attn2c against din attn2o when attn2c only meets dout attn2c) is
  marked not estimable instead of being computed. p-values are Holm-adjusted over all estimable pairs of the factor;
  intervals are Bonferroni (simultaneous, at least as wide as Holm's decisions need); `mdd` is the difference the
  comparison detects with 80 % power at the strictest Holm step (alpha / m): the design's minimum detectable difference.
- Correlations between metrics over runs: Pearson r with its Fisher-z interval and p, Holm-adjusted over the pairs.
"""
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from ldm.evaluation.anova import POWER, Fit, Model

LEVEL_COLUMNS = ["level", "n", "mean", "low", "high", "emm", "emm_low", "emm_high"]
PAIR_COLUMNS = ["level_a", "level_b", "estimable", "diff", "se", "p", "p_holm", "low", "high", "mdd", "separated"]
CORRELATION_COLUMNS = ["metric_a", "metric_b", "n", "r", "low", "high", "p", "p_holm", "significant"]


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): the i-th smallest times (m - i), made monotone, at most 1;
    NaN (an untested comparison) stays NaN and does not count in m.

    Equal to statsmodels' `multipletests(p, method="holm")` (tested), which is not called: its Holm branch runs a full
    `gc.collect()` on every call, 1.0-1.3 s in an anova.py process here (it imports torch), and a study's report
    adjusts some fifty families."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    out[order] = np.minimum(np.maximum.accumulate(p[order] * (len(order) - np.arange(len(order)))), 1.0)
    return out


Slice = Dict[str, str]  # {other factor: its level}: the comparisons within that level (simple effects)


def emm_vectors(model: Model, factor: str, at: Optional[Slice] = None) -> Tuple[List[str], np.ndarray]:
    """The levels and the matrix C (one row per level) with EMMs = C @ beta: the mean design row of the grid at that
    level (within the slice `at`, e.g. {"dout": "ffni"}: the cell means there). Within a slice, only the levels with
    runs in it."""
    grid, x = model.grid()
    inside = np.ones(len(grid), dtype=bool)
    for name, level in (at or {}).items():
        inside &= (grid[name] == level).to_numpy()
    levels = model.levels[factor]
    if at:
        seen = model.data[in_slice(model.data, at)][factor]
        levels = [lv for lv in levels if (seen == lv).any()]
    return levels, np.stack([x[(grid[factor] == lv).to_numpy() & inside].mean(axis=0) for lv in levels])


def in_slice(data: pd.DataFrame, at: Optional[Slice]) -> np.ndarray:
    """The runs of the slice `at` (all runs without one)."""
    mask = np.ones(len(data), dtype=bool)
    for name, level in (at or {}).items():
        mask &= (data[name] == level).to_numpy()
    return mask


def contrasts(c: np.ndarray, fit: Fit) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimable, estimate, standard error) of each row c of C: c @ beta is estimable (the same for every
    least-squares solution) when c lies in the row space of X; the others get NaN."""
    ok = np.linalg.norm(c - c @ fit.rowspace, axis=1) <= 1e-8 * np.maximum(1.0, np.linalg.norm(c, axis=1))
    variance = np.einsum("ij,jk,ik->i", c, fit.xtx_pinv, c) * fit.mse
    estimate = np.where(ok, c @ fit.beta, np.nan)
    return ok, estimate, np.where(ok, np.sqrt(np.maximum(variance, 0.0)), np.nan)


def level_table(model: Model, fit: Fit, factor: str, alpha: float, at: Optional[Slice] = None) -> pd.DataFrame:
    """Per level: runs, mean and its interval, and the EMM and its interval (empty when not estimable)."""
    levels, c = emm_vectors(model, factor, at)
    mask = in_slice(model.data, at)
    groups = pd.Series(model.y[mask]).groupby(model.data[factor].to_numpy()[mask])
    n, mean = groups.size()[levels].to_numpy(), groups.mean()[levels].to_numpy()
    t_crit = stats.t.ppf(1 - alpha / 2, fit.df_resid)
    half = t_crit * np.sqrt(fit.mse / n)
    _, emm, se = contrasts(c, fit)
    return pd.DataFrame({"level": levels, "n": n, "mean": mean, "low": mean - half, "high": mean + half, "emm": emm,
                         "emm_low": emm - t_crit * se, "emm_high": emm + t_crit * se}, columns=LEVEL_COLUMNS)


def pairwise(model: Model, fit: Fit, factor: str, alpha: float, at: Optional[Slice] = None) -> pd.DataFrame:
    """Every pair of levels: the EMM difference a - b, Holm-adjusted p, Bonferroni interval, detectable difference."""
    levels, c = emm_vectors(model, factor, at)
    if len(levels) < 2:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    i, j = np.array(list(itertools.combinations(range(len(levels)), 2))).T
    ok, diff, se = contrasts(c[i] - c[j], fit)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(ok & (se > 0), 2 * stats.t.sf(np.abs(diff / se), fit.df_resid), np.nan)
    m = int(np.isfinite(p).sum())
    p_holm = holm(p)
    t_crit = stats.t.ppf(1 - alpha / (2 * max(m, 1)), fit.df_resid)
    return pd.DataFrame({"level_a": np.array(levels)[i], "level_b": np.array(levels)[j], "estimable": ok,
                         "diff": diff, "se": se, "p": p, "p_holm": p_holm, "low": diff - t_crit * se,
                         "high": diff + t_crit * se, "mdd": (t_crit + stats.t.ppf(POWER, fit.df_resid)) * se,
                         "separated": p_holm < alpha}, columns=PAIR_COLUMNS)


def slice_test(model: Model, fit: Fit, factor: str, at: Slice) -> Dict[str, float]:
    """The simple effect of `factor` within the slice `at`: the F test that every estimable difference between its
    levels there is zero (the general linear hypothesis L beta = 0 on the model's fit and residual variance; in a
    rank-deficient design, levels the design cannot compare drop out instead of voiding the test)."""
    levels, c = emm_vectors(model, factor, at)
    nan = {"levels": 0, "df": 0, "F": np.nan, "p": np.nan}
    if len(levels) < 2 or fit.df_resid < 1 or fit.mse <= 0:
        return nan
    i, j = np.array(list(itertools.combinations(range(len(levels)), 2))).T
    ok, _, _ = contrasts(c[i] - c[j], fit)
    lmat = (c[i] - c[j])[ok]
    middle = lmat @ fit.xtx_pinv @ lmat.T
    df = int(np.linalg.matrix_rank(middle)) if len(lmat) else 0
    if df == 0:
        return nan
    est = lmat @ fit.beta
    f_value = float(est @ np.linalg.pinv(middle) @ est) / df / fit.mse
    return {"levels": len(set(i[ok]) | set(j[ok])), "df": df, "F": f_value,
            "p": float(stats.f.sf(f_value, df, fit.df_resid))}


def ranking(levels: pd.DataFrame, pairs: pd.DataFrame, higher_is_better: bool = True) -> Dict:
    """The top level and how it stands against the others: which it is separated from (adjusted p < alpha, in its
    favour), which not, and which the design cannot compare with it. Ranked by EMM when every level has one, else
    by the mean of its runs."""
    by = "emm" if levels.emm.notna().all() else "mean"
    order = levels.sort_values(by, ascending=not higher_is_better, kind="stable").reset_index(drop=True)
    top = order.level[0]
    separated, not_separated, not_comparable = [], [], []
    for other in order.level[1:]:
        row = pairs[((pairs.level_a == top) & (pairs.level_b == other)) | ((pairs.level_a == other) &
                                                                          (pairs.level_b == top))].iloc[0]
        lead = row["diff"] if row.level_a == top else -row["diff"]
        if not row.estimable:
            not_comparable.append(other)
        elif row.separated and (lead > 0) == higher_is_better:
            separated.append(other)
        else:
            not_separated.append(other)
    runner = order.iloc[1]
    return {"by": by, "top": top, "value": order[by][0], "runner_up": runner.level, "runner_up_value": runner[by],
            "separated": separated, "not_separated": not_separated, "not_comparable": not_comparable,
            "best": not not_separated and not not_comparable}


def correlations(table: pd.DataFrame, metrics: Sequence[str], alpha: float) -> pd.DataFrame:
    """Pearson correlation of every pair of metrics over the runs that have both, with interval and Holm p."""
    rows = []
    for a, b in itertools.combinations(metrics, 2):
        both = table[[a, b]].apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan).dropna()
        row = {"metric_a": a, "metric_b": b, "n": len(both), "r": np.nan, "low": np.nan, "high": np.nan, "p": np.nan}
        if len(both) >= 4 and both[a].std() > 0 and both[b].std() > 0:
            result = stats.pearsonr(both[a], both[b])
            interval = result.confidence_interval(1 - alpha)
            row.update(r=float(result.statistic), low=interval.low, high=interval.high, p=float(result.pvalue))
        rows.append(row)
    out = pd.DataFrame(rows, columns=CORRELATION_COLUMNS[:7])
    out["p_holm"] = holm(out.p)
    out["significant"] = out.p_holm < alpha
    return out[CORRELATION_COLUMNS]
