"""Analysis of variance of a design-space study (Xiang et al. 2023 use ANOVA to find the factor that matters): OLS on
the factors as categories, Type II sums of squares for main effects and chosen interactions, effect sizes, and Tukey
HSD comparisons of the levels of the significant factors (statsmodels).

eta² = SS_term / SS_total (the share of the metric's variance a term explains); partial eta² = SS_term / (SS_term +
SS_residual). Designs where some levels only occur together (din attn2c always has dout attn2c) are rank-deficient:
statsmodels' anova_lm would report nominal degrees of freedom there, so their Type II tests are computed by comparing
nested OLS fits (SS and df from the fits' residuals and ranks) and the report says so.
"""
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multicomp import pairwise_tukeyhsd
from statsmodels.tools.sm_exceptions import SingularMatrixWarning

ANOVA_COLUMNS = ["term", "df", "sum_sq", "F", "p", "eta_sq", "partial_eta_sq"]
CONSTANT_NOTE = "the metric has the same value in every run: there is no variance for the factors to explain"


class AnalysisError(ValueError):
    """A results table, metric or factor that cannot be analysed as asked."""


@dataclass
class MetricAnalysis:
    """The analysis of one metric: the ANOVA table, Tukey HSD tables of the significant factors, and notes."""
    metric: str
    anova: pd.DataFrame
    tukey: Dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    n: int = 0


def term(names: Sequence[str]) -> str:
    """The patsy term of factors as categories, e.g. C(Q("din")):C(Q("dout"))."""
    return ":".join(f'C(Q("{n}"))' for n in names)


def parse_interactions(items: Sequence[str], factors: Sequence[str]) -> List[Tuple[str, ...]]:
    """'din:dout' -> ('din', 'dout'); every part must be one of the factors."""
    out = []
    for item in items:
        parts = tuple(p.strip() for p in item.split(":") if p.strip())
        unknown = [p for p in parts if p not in factors]
        if len(parts) < 2 or unknown:
            raise AnalysisError(f"interaction '{item}' must join two or more of the factors ({', '.join(factors)}) "
                                "with ':', e.g. din:dout")
        out.append(parts)
    return out


def prepare(table: pd.DataFrame, metric: str, factors: Sequence[str]) -> Tuple[pd.DataFrame, List[str]]:
    """The rows with a value of `metric`, factors as strings; notes on what was left out."""
    missing = [c for c in [metric, *factors] if c not in table.columns]
    if missing:
        raise AnalysisError(f"the results table has no column(s) {', '.join(missing)}; it has "
                            f"{', '.join(map(str, table.columns))}")
    data = table[[metric, *factors]].copy()
    data[metric] = pd.to_numeric(data[metric], errors="coerce")
    notes = []
    dropped = int(data[metric].isna().sum())
    if dropped:
        notes.append(f"{dropped} run(s) without a value of {metric} left out")
    data = data.dropna(subset=[metric])
    for f in factors:
        data[f] = data[f].astype(str)
    single = [f for f in factors if data[f].nunique() < 2]
    if single:
        raise AnalysisError(f"factor(s) {', '.join(single)} have fewer than 2 levels among the runs with {metric}: "
                            "leave them out of --factors")
    if len(data) <= sum(data[f].nunique() - 1 for f in factors) + 1:
        raise AnalysisError(f"{len(data)} runs are too few to estimate {len(factors)} factor(s) and an error term: "
                            "add runs (e.g. seeds) or factors' levels")
    return data, notes


def fit(data: pd.DataFrame, metric: str, terms: Sequence[Tuple[str, ...]]):
    """OLS of the metric on the terms; a rank-deficient design is detected and noted by `anova_table`."""
    rhs = " + ".join(term(t) for t in terms) or "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularMatrixWarning)
        return smf.ols(f'Q("{metric}") ~ {rhs}', data).fit()


def is_full_rank(model) -> bool:
    exog = model.model.exog
    return np.linalg.matrix_rank(exog) == exog.shape[1]


def type2_by_comparison(data: pd.DataFrame, metric: str, terms: Sequence[Tuple[str, ...]], full) -> pd.DataFrame:
    """Type II tests as nested-model comparisons: SS(T | the terms that do not contain T), df from the ranks."""
    mse, rows = full.ssr / full.df_resid, []
    for t in terms:
        others = [o for o in terms if not set(t) <= set(o)]
        without, with_t = fit(data, metric, others), fit(data, metric, others + [t])
        df = without.df_resid - with_t.df_resid
        # A term adds no column of its own (df 0) when it is confounded with the others; then, and for round-off
        # below zero, it explains nothing: SSR can only fall as terms are added.
        ss = max(without.ssr - with_t.ssr, 0.0) if df > 0 else 0.0
        f_value = (ss / df) / mse if df > 0 and mse > 0 else np.nan
        rows.append({"term": ":".join(t), "df": df, "sum_sq": ss, "F": f_value,
                     "p": stats.f.sf(f_value, df, full.df_resid) if df > 0 else np.nan})
    rows.append({"term": "Residual", "df": full.df_resid, "sum_sq": full.ssr, "F": np.nan, "p": np.nan})
    return pd.DataFrame(rows)


def type2_statsmodels(full, terms: Sequence[Tuple[str, ...]]) -> pd.DataFrame:
    table = anova_lm(full, typ=2)
    names = {term(t): ":".join(t) for t in terms}
    return pd.DataFrame({"term": [names.get(i, i) for i in table.index], "df": table["df"].values,
                         "sum_sq": table["sum_sq"].values, "F": table["F"].values, "p": table["PR(>F)"].values})


def anova_table(data: pd.DataFrame, metric: str, factors: Sequence[str],
                interactions: Sequence[Tuple[str, ...]] = ()) -> Tuple[pd.DataFrame, List[str]]:
    """Type II ANOVA of `metric` on the factors (and interactions) with eta² and partial eta²; plus notes."""
    terms = [(f,) for f in factors] + [tuple(i) for i in interactions]
    full = fit(data, metric, terms)
    notes = []
    if is_full_rank(full):
        table = type2_statsmodels(full, terms)
    else:
        table = type2_by_comparison(data, metric, terms, full)
        notes.append("the design is rank-deficient (some levels of different factors only occur together, or "
                     "interaction cells are empty): Type II tests come from nested OLS fits with degrees of freedom "
                     "from their ranks; confounded effects are credited to no single term")
    total = float(((data[metric] - data[metric].mean()) ** 2).sum())
    residual = float(table.loc[table.term == "Residual", "sum_sq"].iloc[0])
    if is_constant(data[metric]):  # round-off would pass for sums of squares, F and effect sizes
        notes.append(CONSTANT_NOTE)
        table.loc[:, ["sum_sq", "F", "p"]] = [0.0, np.nan, np.nan]
        table["eta_sq"] = table["partial_eta_sq"] = np.nan
        return table[ANOVA_COLUMNS], notes
    table["eta_sq"] = table["sum_sq"] / total
    table["partial_eta_sq"] = table["sum_sq"] / (table["sum_sq"] + residual)
    table.loc[table.term == "Residual", ["eta_sq", "partial_eta_sq"]] = np.nan
    return table[ANOVA_COLUMNS], notes


def is_constant(values: pd.Series) -> bool:
    """Whether every run has the same value, up to float round-off."""
    spread = float(values.max() - values.min())
    return spread <= 1e-9 * max(1.0, float(values.abs().max()))


def tukey_table(data: pd.DataFrame, metric: str, factor: str, alpha: float = 0.05) -> pd.DataFrame:
    """Tukey HSD of all pairs of levels of `factor`: mean difference (group2 - group1), adjusted p, confidence
    interval, reject; most significant first."""
    result = pairwise_tukeyhsd(data[metric].to_numpy(float), data[factor].to_numpy(str), alpha=alpha)
    pairs = list(itertools.combinations(result.groupsunique, 2))  # statsmodels' order of the comparisons
    table = pd.DataFrame({"group1": [a for a, _ in pairs], "group2": [b for _, b in pairs],
                          "meandiff": result.meandiffs, "p_adj": result.pvalues, "lower": result.confint[:, 0],
                          "upper": result.confint[:, 1], "reject": result.reject})
    return table.sort_values("p_adj", kind="stable").reset_index(drop=True)


def analyse_metric(table: pd.DataFrame, metric: str, factors: Sequence[str],
                   interactions: Sequence[Tuple[str, ...]] = (), alpha: float = 0.05) -> MetricAnalysis:
    """ANOVA of one metric and Tukey HSD for each factor whose main effect has p < alpha."""
    data, notes = prepare(table, metric, factors)
    anova, more = anova_table(data, metric, factors, interactions)
    result = MetricAnalysis(metric, anova, notes=notes + more, n=len(data))
    for f in factors:
        p = anova.loc[anova.term == f, "p"].iloc[0]
        if np.isfinite(p) and p < alpha:
            result.tukey[f] = tukey_table(data, metric, f, alpha)
    return result


def default_metrics(table: pd.DataFrame) -> List[str]:
    """The metric columns evaluate.py writes: <backend>_i, <backend>_t, <backend>_prior and fid."""
    return [c for c in table.columns if c.endswith(("_i", "_t", "_prior")) or c == "fid"]


def analyse(table: pd.DataFrame, metrics: Optional[Sequence[str]], factors: Sequence[str],
            interactions: Sequence[str] = (), alpha: float = 0.05) -> List[MetricAnalysis]:
    """The analysis of each metric (default: every metric column of the table)."""
    if not factors:
        raise AnalysisError("no factors to analyse: pass --factors (columns of the results table)")
    metrics = list(metrics or default_metrics(table))
    if not metrics:
        raise AnalysisError(f"no metric columns (<backend>_i, <backend>_t, fid) in the table: pass --metrics; "
                            f"columns: {', '.join(map(str, table.columns))}")
    pairs = parse_interactions(interactions, factors)
    return [analyse_metric(table, m, factors, pairs, alpha) for m in metrics]
