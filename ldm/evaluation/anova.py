"""Analysis of variance of a design-space study (Xiang et al. 2023 use ANOVA to find the factor that matters).

The model of a metric: OLS on the design's factors as categories, plus blocks (the training `seed`, and the `subject`
of a study over several subjects: an additive term that takes out what every run of one seed or subject shares; it
is tested, but it is not a design factor), plus covariates (numeric columns, one slope each, e.g. the trainable
parameters), plus interactions (by default every two-way interaction of the factors, and of each factor with the
subject, that the design has the degrees of freedom for: `auto_interactions`). Type II sums of squares: SS(T | every term that does not contain T), computed by
comparing nested least-squares fits with degrees of freedom from their ranks, so designs where some levels of
different factors only occur together (the 20 position pairs: `attn2c` only with `attn2c`) get the right degrees of
freedom and credit confounded variance to no single term; for full-rank designs this equals statsmodels'
`anova_lm(typ=2)`.

Effect sizes: eta² = SS_T / SS_total, partial eta² = SS_T / (SS_T + SS_residual). The confidence interval of partial
eta² inverts the noncentral F distribution of the term's F statistic (Steiger 2004): the noncentralities lambda at the
interval's ends map to lambda / (lambda + df_T + df_residual + 1), the convention of R's effectsize; the interval for
lambda is exact under the model's normal errors. Its level is 1 - 2 alpha (90 % at alpha 0.05), the two-sided
interval whose lower end is above 0 exactly when the F test is significant at alpha (Steiger 2004). A bootstrap over
runs is not used: with two runs per design point, resampling duplicates runs and shrinks the residual (on the
tiny-world study's results from 0.31 of the variance to a median 0.19 over 300 resamples), which inflates partial
eta². The power column gives the smallest partial eta² (same mapping) that the F test detects with 80 % power at
alpha.
"""
import itertools
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import optimize, stats

ANOVA_COLUMNS = ["term", "kind", "df", "sum_sq", "F", "p", "p_holm", "eta_sq", "partial_eta_sq", "partial_eta_sq_low",
                 "partial_eta_sq_high", "detectable_partial_eta_sq"]
CONSTANT_NOTE = "the metric has the same value in every run: there is no variance for the factors to explain"
RANK_NOTE = ("the design is rank-deficient (some levels of different factors only occur together, or interaction "
             "cells are empty): Type II tests come from nested fits with degrees of freedom from their ranks; "
             "confounded effects are credited to no single term")
POWER = 0.8  # the power at which detectable effects and differences are stated
# Columns taken as blocks when present with two or more levels and not a factor (scripts/anova.py --blocks): the
# training seed, and the subject (a study over several subjects analyses them as a block, i.e. a fixed additive
# effect: the factor tests and comparisons are about these subjects, adjusted for how they differ).
BLOCK_NAMES = ("seed", "subject")
SUBJECT_BLOCKS = ("subject",)  # blocks whose interaction with each factor is tested when the design has the df
MIN_RESIDUAL_DF = 1  # an automatic interaction is kept only when the error term keeps at least this many df
Term = Tuple[str, ...]


class AnalysisError(ValueError):
    """A results table, metric or factor that cannot be analysed as asked."""


def check_alpha(alpha: float) -> float:
    """alpha in (0, 1), or an error that says so."""
    if not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:  # NaN fails both comparisons
        raise AnalysisError(f"the significance level alpha must be between 0 and 1 (exclusive), got {alpha}: "
                            "e.g. --alpha 0.05")
    return float(alpha)


@dataclass
class Fit:
    """A least-squares fit: residual sum of squares, rank, coefficients (minimum norm), (X'X)^+ and the row-space
    projector of X (a contrast c is estimable when c equals its projection)."""
    ssr: float
    rank: int
    df_resid: int
    beta: np.ndarray
    xtx_pinv: np.ndarray
    rowspace: np.ndarray

    @property
    def mse(self) -> float:
        return self.ssr / self.df_resid if self.df_resid > 0 else np.nan


def least_squares(x: np.ndarray, y: np.ndarray) -> Fit:
    """OLS of y on the columns of x through the SVD, rank-deficient designs included."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    rank = int((s > s.max() * max(x.shape) * np.finfo(float).eps).sum()) if s.size else 0
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    beta = vt.T @ ((u.T @ y) / s)
    resid = y - x @ beta
    return Fit(float(resid @ resid), rank, len(y) - rank, beta, (vt.T / s ** 2) @ vt, vt.T @ vt)


def levels_of(values: pd.Series) -> List[str]:
    """Levels in numeric order when they are all numbers, else in order of first appearance (the grid's order)."""
    levels = list(dict.fromkeys(values.astype(str)))
    try:
        return sorted(levels, key=float)
    except ValueError:
        return levels


def design_matrix(frame: pd.DataFrame, terms: Sequence[Term], levels: Dict[str, List[str]],
                  centers: Optional[Dict[str, float]] = None) -> np.ndarray:
    """An intercept and, per term, the indicators of every combination of its factors' levels. Redundant on
    purpose: least squares only needs the span, which equals that of any full coding (treatment, sum) of the same
    terms, and a combination absent from the data is a zero column, so what depends on it is not estimable. A
    covariate (a name in `centers`) is one column: its values minus its center (the runs' mean)."""
    columns = [np.ones((len(frame), 1))]
    for t in terms:
        if centers and t[0] in centers:
            columns.append((frame[t[0]].to_numpy(float) - centers[t[0]])[:, None])
            continue
        cell, size = np.zeros(len(frame), dtype=int), 1
        for name in t:
            position = {lv: i for i, lv in enumerate(levels[name])}
            cell, size = cell * len(position) + frame[name].map(position).to_numpy(int), size * len(position)
        columns.append(np.eye(size)[cell])
    return np.hstack(columns)


@dataclass
class Model:
    """The linear model of one metric: the runs (factor columns as strings), the terms (blocks, factors,
    interactions), and design matrices built once per set of terms."""
    data: pd.DataFrame
    metric: str
    factors: Tuple[str, ...]
    blocks: Tuple[str, ...] = ()
    interactions: Tuple[Term, ...] = ()
    covariates: Tuple[str, ...] = ()  # numeric columns with one slope each (e.g. trainable_parameters)
    _matrices: Dict[Tuple[Term, ...], np.ndarray] = field(default_factory=dict, repr=False)
    _levels: Dict[str, List[str]] = field(default_factory=dict, repr=False)
    _grid: Dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def terms(self) -> List[Term]:
        return ([(b,) for b in self.blocks] + [(c,) for c in self.covariates] + [(f,) for f in self.factors]
                + list(self.interactions))

    @property
    def centers(self) -> Dict[str, float]:
        """The covariates' means: the design codes them centred, and the reference grid holds them there."""
        return {c: float(self.data[c].astype(float).mean()) for c in self.covariates}

    @property
    def y(self) -> np.ndarray:
        return self.data[self.metric].to_numpy(float)

    @property
    def levels(self) -> Dict[str, List[str]]:
        if not self._levels:
            self._levels.update({name: levels_of(self.data[name]) for name in (*self.factors, *self.blocks)})
        return self._levels

    def kind(self, t: Term) -> str:
        if len(t) > 1:
            return "interaction"
        return "block" if t[0] in self.blocks else "covariate" if t[0] in self.covariates else "factor"

    def matrix(self, terms: Sequence[Term]) -> np.ndarray:
        """The design matrix of a set of terms (cached: the design is fixed, the metric values may vary)."""
        key = tuple(terms)
        if key not in self._matrices:
            self._matrices[key] = design_matrix(self.data, terms, self.levels, self.centers)
        return self._matrices[key]

    def fit(self, terms: Optional[Sequence[Term]] = None, y: Optional[np.ndarray] = None) -> Fit:
        return least_squares(self.matrix(self.terms if terms is None else terms), self.y if y is None else y)

    def grid(self) -> Tuple[pd.DataFrame, np.ndarray]:
        """The reference grid (every combination of the levels of the factors and blocks) and its design matrix."""
        if "grid" not in self._grid:
            frame = pd.DataFrame(list(itertools.product(*self.levels.values())), columns=list(self.levels))
            frame = frame.assign(**self.centers)
            self._grid.update(grid=frame, matrix=design_matrix(frame, self.terms, self.levels, self.centers))
        return self._grid["grid"], self._grid["matrix"]

    def full_rank(self) -> bool:
        """Whether the runs estimate as many parameters as a complete grid of the levels would."""
        return self.fit().rank == np.linalg.matrix_rank(self.grid()[1])


def parse_interactions(items: Sequence[str], factors: Sequence[str]) -> List[Term]:
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


def auto_interactions(data: pd.DataFrame, metric: str, factors: Sequence[str], blocks: Sequence[str],
                      covariates: Sequence[str] = (), with_blocks: Sequence[str] = SUBJECT_BLOCKS) -> List[Term]:
    """The two-way interactions the design has the degrees of freedom for: every pair of factors, then every factor
    with each block of `with_blocks` (e.g. subject: does the effect differ between subjects?), each kept when it
    adds a degree of freedom and leaves at least MIN_RESIDUAL_DF for the error term."""
    candidates = list(itertools.combinations(factors, 2))
    candidates += [(f, b) for b in with_blocks if b in blocks for f in factors]
    kept: List[Term] = []
    for term in candidates:
        model = Model(data, metric, tuple(factors), tuple(blocks), tuple(kept), tuple(covariates))
        before = model.fit()
        model = Model(data, metric, tuple(factors), tuple(blocks), tuple(kept + [term]), tuple(covariates))
        after = model.fit()
        if after.rank > before.rank and after.df_resid >= MIN_RESIDUAL_DF:
            kept.append(term)
    return kept


def default_blocks(table: pd.DataFrame, factors: Sequence[str]) -> List[str]:
    """The replicate columns (BLOCK_NAMES, e.g. seed) the table has with two or more levels, when not a factor."""
    return [b for b in BLOCK_NAMES if b in table.columns and b not in factors and table[b].nunique() > 1]


def prepare(table: pd.DataFrame, metric: str, factors: Sequence[str], blocks: Sequence[str] = (),
            covariates: Sequence[str] = ()) -> Tuple[pd.DataFrame, List[str]]:
    """The rows with a value of `metric`, factors and blocks as strings, covariates as numbers; notes on what was
    left out."""
    columns = [metric, *factors, *blocks, *covariates]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise AnalysisError(f"the results table has no column(s) {', '.join(missing)}; it has "
                            f"{', '.join(map(str, table.columns))}")
    if set(factors) & set(blocks) or len(set(columns)) < len(columns):
        raise AnalysisError(f"a column is named twice among the metric, factors, blocks and covariates: "
                            f"{', '.join(columns)}")
    for f in [*factors, *blocks]:
        empty = table[f].isna().to_numpy() | (table[f].astype(str).str.strip() == "").to_numpy()
        if empty.any():
            lines = ", ".join(str(i + 2) for i in np.flatnonzero(empty)[:10])  # as in the file: the header is line 1
            raise AnalysisError(f"column {f} is empty on line(s) {lines} of the results table: every run needs its "
                                "level of each factor and block; fill the cells, or remove the rows")
    data = table[columns].copy()
    data[metric] = numeric_metric(table, metric)
    for c in covariates:
        data[c] = numeric_covariate(table, c)
    notes = []
    dropped = int(data[metric].isna().sum())
    if dropped:
        notes.append(f"{dropped} run(s) without a finite value of {metric} left out")
    data = data.dropna(subset=[metric]).reset_index(drop=True)
    for f in [*factors, *blocks]:
        data[f] = data[f].astype(str)
    single = [f for f in [*factors, *blocks] if data[f].nunique() < 2]
    if single:
        raise AnalysisError(f"column(s) {', '.join(single)} have fewer than 2 levels among the runs with {metric}: "
                            "leave them out of --factors / --blocks")
    return data, notes


def numeric_covariate(table: pd.DataFrame, name: str) -> pd.Series:
    """A covariate column as floats: every run needs a finite number (a run without one cannot be adjusted)."""
    values = pd.to_numeric(table[name], errors="coerce").replace([np.inf, -np.inf], np.nan)
    if values.isna().any():
        i = int(np.flatnonzero(values.isna().to_numpy())[0])
        where = f"run {table['run'].iloc[i]}" if "run" in table.columns else f"row {i + 1}"
        raise AnalysisError(f"covariate {name} is not a finite number in {where} ('{table[name].iloc[i]}'): a "
                            "covariate needs a number in every run; fix the table or leave it out of --covariates")
    if values.nunique() < 2:
        raise AnalysisError(f"covariate {name} has the same value in every run: it explains nothing; leave it out of "
                            "--covariates")
    return values


MISSING_TEXT = ("", "nan", "na", "n/a", "none", "null", "inf", "+inf", "-inf", "infinity", "-infinity")


def numeric_metric(table: pd.DataFrame, metric: str) -> pd.Series:
    """The metric column as floats, empty cells, NaN and infinities as NaN; text in it (a broken or hand-edited
    table) and a column with no finite value at all are errors, never silently left out."""
    raw = table[metric]
    values = pd.to_numeric(raw, errors="coerce").replace([np.inf, -np.inf], np.nan)
    text = raw.notna() & values.isna() & ~raw.astype(str).str.strip().str.lower().isin(MISSING_TEXT)
    if text.any():
        i = int(np.flatnonzero(text.to_numpy())[0])
        where = f"run {table['run'].iloc[i]}" if "run" in table.columns else f"row {i + 1}"
        raise AnalysisError(f"column {metric} holds text ('{raw.iloc[i]}' in {where}): a metric column holds numbers; "
                            "fix the table, or leave the column out of --metrics")
    if not values.notna().any():
        raise AnalysisError(f"{metric} has no finite value in any row: evaluate the runs first, or leave it out of "
                            "--metrics")
    return values


def is_constant(values: np.ndarray) -> bool:
    """Whether every run has the same value, up to float round-off."""
    spread = float(values.max() - values.min())
    return spread <= 1e-9 * max(1.0, float(np.abs(values).max()))


def type2(model: Model, y: Optional[np.ndarray] = None) -> Tuple[pd.DataFrame, Fit]:
    """Type II tests of every term: SS(T | the terms that do not contain T), df from the ranks; and the full fit."""
    y = model.y if y is None else y
    full, rows = model.fit(y=y), []
    for t in model.terms:
        others = [o for o in model.terms if not set(t) <= set(o)]
        without, with_t = model.fit(others, y), model.fit(others + [t], y)
        df = with_t.rank - without.rank
        # A term adds no column of its own (df 0) when it is confounded with the others; then, and for round-off
        # below zero, it explains nothing: SSR can only fall as terms are added.
        ss = max(without.ssr - with_t.ssr, 0.0) if df > 0 else 0.0
        f_value = (ss / df) / full.mse if df > 0 and full.mse > 0 else np.nan
        rows.append({"term": ":".join(t), "kind": model.kind(t), "df": df, "sum_sq": ss, "F": f_value,
                     "p": stats.f.sf(f_value, df, full.df_resid) if np.isfinite(f_value) else np.nan})
    rows.append({"term": "Residual", "kind": "residual", "df": full.df_resid, "sum_sq": full.ssr, "F": np.nan,
                 "p": np.nan})
    return pd.DataFrame(rows), full


def noncentrality_interval(f_value: float, df1: int, df2: int, confidence: float) -> Tuple[float, float]:
    """The confidence interval of the noncentrality of an F statistic: the lambdas at which `f_value` is the
    (1 + confidence) / 2 and (1 - confidence) / 2 quantile of the noncentral F(df1, df2, lambda)."""
    def cdf(nc: float) -> float:
        return float(stats.f.cdf(f_value, df1, df2) if nc == 0 else stats.ncf.cdf(f_value, df1, df2, nc))

    def solve(target: float) -> float:
        if cdf(0.0) <= target:  # even lambda = 0 puts F this high: the end is 0
            return 0.0
        hi = max(10.0, 2 * f_value * df1)
        while cdf(hi) > target:
            hi *= 2
        if not np.isfinite(cdf(hi)):  # F so large (a model that fits every run exactly) that scipy's noncentral F
            return np.nan  # cannot be evaluated there: no interval rather than a crash
        return optimize.brentq(lambda nc: cdf(nc) - target, 0.0, hi, xtol=1e-10)
    return solve((1 + confidence) / 2), solve((1 - confidence) / 2)


def detectable_noncentrality(df1: int, df2: int, alpha: float, power: float = POWER) -> float:
    """The noncentrality at which the F test at `alpha` rejects with probability `power`."""
    critical = stats.f.ppf(1 - alpha, df1, df2)
    hi = 10.0
    while stats.ncf.sf(critical, df1, df2, hi) < power:
        hi *= 2
    return optimize.brentq(lambda nc: stats.ncf.sf(critical, df1, df2, nc) - power, 1e-9, hi, xtol=1e-10)


def partial_eta_sq(noncentrality: float, df1: int, df2: int) -> float:
    """The partial eta² of a noncentrality (Steiger 2004): lambda / (lambda + df1 + df2 + 1)."""
    return noncentrality / (noncentrality + df1 + df2 + 1)


def effect_sizes(table: pd.DataFrame, total: float, alpha: float) -> pd.DataFrame:
    """eta², partial eta² with its (1 - 2 alpha) interval, and the partial eta² the F test detects with POWER."""
    table = table.copy()
    residual = table.loc[table.term == "Residual"].iloc[0]
    table["eta_sq"] = table["sum_sq"] / total
    table["partial_eta_sq"] = table["sum_sq"] / (table["sum_sq"] + residual.sum_sq)
    low, high, detectable = [], [], []
    for row in table.itertuples():
        tested = row.kind != "residual" and row.df > 0 and residual.df > 0 and np.isfinite(row.F)
        nc = noncentrality_interval(row.F, row.df, residual.df, 1 - 2 * alpha) if tested and alpha < 0.5 \
            else (np.nan, np.nan)
        low.append(partial_eta_sq(nc[0], row.df, residual.df))
        high.append(partial_eta_sq(nc[1], row.df, residual.df))
        d = detectable_noncentrality(row.df, residual.df, alpha) if tested else np.nan
        detectable.append(partial_eta_sq(d, row.df, residual.df))
    table["partial_eta_sq_low"], table["partial_eta_sq_high"] = low, high
    table["detectable_partial_eta_sq"] = detectable
    table.loc[table.kind == "residual", ["eta_sq", "partial_eta_sq"]] = np.nan
    return table


def anova_table(model: Model, alpha: float = 0.05) -> Tuple[pd.DataFrame, Fit, List[str]]:
    """The Type II ANOVA of the model's metric with effect sizes, intervals and power; the full fit; notes."""
    table, full = type2(model)
    if full.df_resid < 1:
        raise AnalysisError(f"{len(model.y)} runs are too few to estimate {', '.join(map(':'.join, model.terms))} "
                            "and an error term: add runs (e.g. seeds), or leave factors or blocks out")
    notes = [] if model.full_rank() else [RANK_NOTE]
    table["p_holm"] = np.nan  # filled by the study's Holm adjustment (ldm.evaluation.study.adjust_study)
    y = model.y
    if is_constant(y):  # round-off would pass for sums of squares, F and effect sizes
        table.loc[:, ["sum_sq", "F", "p"]] = [0.0, np.nan, np.nan]
        for c in ANOVA_COLUMNS[7:]:
            table[c] = np.nan
        return table[ANOVA_COLUMNS], full, notes + [CONSTANT_NOTE]
    with warnings.catch_warnings():  # scipy's ncf warns on extreme tails it still evaluates
        warnings.simplefilter("ignore", RuntimeWarning)
        table = effect_sizes(table, float(((y - y.mean()) ** 2).sum()), alpha)
    return table[ANOVA_COLUMNS], full, notes
