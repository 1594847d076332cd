"""The analysis of a design-space study's results table: for each metric the ANOVA (`anova`), the levels of every
factor with adjusted pairwise comparisons (`comparisons`), and the design points (the combinations of the factors'
levels, e.g. the 20 position pairs) compared with each other on a one-way model with the same blocks; and the
correlations between the metrics. `findings` turns it into sentences, `report` into files.

The study is one family of tests: the p-values of every factor, covariate and interaction test and every
design-point test of every metric are Holm-adjusted together (`p_holm`, the unadjusted p beside it), and a claim is
made only on the adjusted p. Interactions default to every two-way interaction the design has the degrees of freedom
for (`anova.auto_interactions`); where one is significant, its factors' effects are also tested within each level of
the other factor (simple effects: `slices`, Holm-adjusted over the slices of that factor), and the findings speak of
those instead of the main effect."""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

import numpy as np

from ldm.evaluation.anova import (BLOCK_NAMES, CONSTANT_NOTE, AnalysisError, Fit, Model, Term, anova_table, auto_interactions,
                                  check_alpha, default_blocks, parse_interactions, prepare, type2)
from ldm.evaluation.comparisons import Slice, holm, level_table, pairwise, slice_test
from ldm.evaluation.table import higher_is_better, is_metric_column

log = logging.getLogger(__name__)

POINT = "design point"  # the column of the one-way model over the combinations of the factors' levels
TESTED = ("factor", "covariate", "interaction")  # the ANOVA rows in the study's family of tests


@dataclass
class SimpleEffect:
    """The effect of `factor` within one level of another (`at`): its F test on the full model, Holm-adjusted over the
    factor's slices, and its levels and pairwise comparisons there."""
    factor: str
    at: Slice
    test: Dict[str, float]
    levels: pd.DataFrame
    pairs: pd.DataFrame

    @property
    def where(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.at.items())


@dataclass
class MetricAnalysis:
    """One metric: its model, ANOVA, level tables and pairwise comparisons per factor, and the design points."""
    metric: str
    model: Model
    anova: pd.DataFrame
    alpha: float
    levels: Dict[str, pd.DataFrame] = field(default_factory=dict)
    pairs: Dict[str, pd.DataFrame] = field(default_factory=dict)
    points: Optional[pd.DataFrame] = None
    point_pairs: Optional[pd.DataFrame] = None
    point_test: Optional[pd.Series] = None  # the one-way F test over the design points (with df_resid, p_holm)
    notes: List[str] = field(default_factory=list)
    fit: Optional[Fit] = None
    family: int = 0  # the number of tests Holm adjusts together (the whole study's)
    simple: Dict[Tuple[str, str], List[SimpleEffect]] = field(default_factory=dict)  # (factor, by) -> slices

    @property
    def n(self) -> int:
        return len(self.model.data)

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.metric)

    @property
    def constant(self) -> bool:
        return CONSTANT_NOTE in self.notes

    def term(self, name: str) -> pd.Series:
        return self.anova[self.anova.term == name].iloc[0]


def read_table(path: Path) -> pd.DataFrame:
    """The results table at `path`, with an error that names what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        raise AnalysisError(f"'{path}' is a folder, not a results table: pass the CSV (e.g. {path / 'results.csv'})")
    if not path.is_file():
        raise AnalysisError(f"results table not found: '{path}' (scripts/evaluate.py writes it)")
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise AnalysisError(f"results table '{path}' is empty: scripts/evaluate.py writes one row per run") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise AnalysisError(f"'{path}' is not a CSV table ({str(e).splitlines()[0][:160]})") from None
    if table.empty:
        raise AnalysisError(f"results table '{path}' has no rows: evaluate some runs first")
    check_rows(table, path)
    return without_infinities(table, path)


def check_rows(table: pd.DataFrame, path: Path) -> None:
    """Refuse a table that lists a run twice (it would be analysed as two runs), naming the rows (counted as in the
    file, the header being line 1)."""
    if "run" not in table.columns:
        return
    repeated = table[table["run"].duplicated(keep=False)]
    if not repeated.empty:
        run = repeated["run"].iloc[0]
        lines = [str(i + 2) for i in repeated.index[repeated["run"] == run]]
        more = repeated["run"].nunique() - 1
        raise AnalysisError(f"results table '{path}' lists run {run} on lines {', '.join(lines)}"
                            + (f" (and {more} more run(s) twice)" if more else "") + ": a run counts once; remove "
                            "the repeated rows")


def without_infinities(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The table with infinite numbers as missing values (left out of each analysis, as an empty cell is), each
    column that held one named in a warning with its runs."""
    numeric = table.select_dtypes("number")
    infinite = numeric.apply(lambda column: column.abs() == float("inf"))
    for column in infinite.columns[infinite.any()]:
        rows = table.index[infinite[column]]
        runs = ", ".join(str(table["run"].iloc[i]) if "run" in table.columns else f"line {i + 2}" for i in rows)
        log.warning("%s: %s is infinite in %d row(s) (%s): left out of its analysis, as a missing value", path,
                    column, len(rows), runs)
    return table.mask(infinite.reindex(columns=table.columns, fill_value=False))


def sweep_factors(table: Path) -> List[str]:
    """The factors of the sweep whose folder holds the table, without seed and subject (blocks, not design
    factors)."""
    manifest = Path(table).parent / "sweep.json"
    if not manifest.is_file():
        raise AnalysisError(f"no --factors and no sweep.json beside '{table}': pass --factors")
    try:
        factors = json.loads(manifest.read_text())["spec"]["factors"]
    except (ValueError, UnicodeDecodeError) as e:
        raise AnalysisError(f"'{manifest}' is not valid JSON ({e}): pass --factors") from None
    except (KeyError, TypeError):
        raise AnalysisError(f"'{manifest}' has no spec.factors (it is not a sweep manifest): pass --factors") from None
    if not isinstance(factors, dict):
        raise AnalysisError(f"'{manifest}' has no spec.factors mapping (it is not a sweep manifest): pass --factors")
    return [f for f in factors if f not in BLOCK_NAMES]


def point_model(model: Model) -> Model:
    """The one-way model over the design points (every observed combination of the factors' levels) with the blocks."""
    data = model.data.copy()
    data[POINT] = data[list(model.factors)].agg(" / ".join, axis=1)
    return Model(data, model.metric, (POINT,), model.blocks)


def analyse_metric(table: pd.DataFrame, metric: str, factors: Sequence[str],
                   interactions: Optional[Sequence[Term]] = (), alpha: float = 0.05, blocks: Sequence[str] = (),
                   covariates: Sequence[str] = (), adjust: bool = True) -> MetricAnalysis:
    """The ANOVA of one metric, every factor's levels and adjusted comparisons, and the design points; interactions
    None: every two-way interaction the design has the df for. `adjust`: Holm over this metric's tests alone (a study
    adjusts over all its metrics, `analyse`)."""
    alpha = check_alpha(alpha)
    data, notes = prepare(table, metric, factors, blocks, covariates)
    if interactions is None:
        interactions = auto_interactions(data, metric, factors, blocks, covariates)
    model = Model(data, metric, tuple(factors), tuple(blocks), tuple(tuple(i) for i in interactions),
                  tuple(covariates))
    anova, fit, more = anova_table(model, alpha)
    result = MetricAnalysis(metric, model, anova, alpha, notes=notes + more, fit=fit)
    if not result.constant and len(factors) > 1:
        points = point_model(model)
        tests, point_fit = type2(points)
        if point_fit.df_resid > 0:
            result.point_test = pd.concat([tests[tests.term == POINT].iloc[0],
                                           pd.Series({"df_resid": point_fit.df_resid})])
            result.points = level_table(points, point_fit, POINT, alpha)
            result.point_pairs = pairwise(points, point_fit, POINT, alpha)
    if adjust:
        adjust_study([result])
    return result


def adjust_study(results: Sequence[MetricAnalysis]) -> None:
    """Holm over every factor, covariate and interaction test and every design-point test of the study; then the
    simple effects of each significant interaction."""
    slots = [(r, i) for r in results for i in r.anova.index[r.anova.kind.isin(TESTED) & r.anova.p.notna()]]
    points = [r for r in results if r.point_test is not None and np.isfinite(r.point_test.p)]
    adjusted = holm([r.anova.at[i, "p"] for r, i in slots] + [r.point_test.p for r in points])
    for r in results:
        r.anova["p_holm"] = np.nan
        r.family = len(adjusted)
    for (r, i), p in zip(slots, adjusted):
        r.anova.at[i, "p_holm"] = p
    for r, p in zip(points, adjusted[len(slots):]):
        r.point_test["p_holm"] = p
    for r in results:
        if not r.constant:
            compare(r)


def compare(r: MetricAnalysis) -> None:
    """Levels and adjusted pairwise comparisons of every factor, on the model with the interactions that are
    significant after the study's correction (the others are pooled into the error, so the comparisons of an
    additive study are those of the additive model), and the simple effects of the significant interactions."""
    kept = tuple(t for t in r.model.interactions if significant(r, ":".join(t)))
    model = Model(r.model.data, r.metric, r.model.factors, r.model.blocks, kept, r.model.covariates)
    fit = model.fit()
    for f in r.model.factors:
        r.levels[f], r.pairs[f] = level_table(model, fit, f, r.alpha), pairwise(model, fit, f, r.alpha)
    r.simple = simple_effects(r, model, fit)


def significant(r: MetricAnalysis, term: str) -> bool:
    """Whether a term's study-adjusted test is significant."""
    row = r.anova[r.anova.term == term]
    return bool(len(row)) and bool(row.p_holm.iloc[0] < r.alpha)


def simple_effects(r: MetricAnalysis, model: Model, fit: Fit) -> Dict[Tuple[str, str], List[SimpleEffect]]:
    """For each two-way interaction of `model` (the significant ones), the effect of each factor of it within every
    level of the other term, Holm-adjusted over those slices."""
    out: Dict[Tuple[str, str], List[SimpleEffect]] = {}
    for term in model.interactions:
        if len(term) != 2:
            continue
        for factor, by in (term, term[::-1]):
            if factor not in model.factors:
                continue  # a block's differences within each factor level are not a claim of the study
            slices = [SimpleEffect(factor, {by: lv}, slice_test(model, fit, factor, {by: lv}),
                                   level_table(model, fit, factor, r.alpha, {by: lv}),
                                   pairwise(model, fit, factor, r.alpha, {by: lv}))
                      for lv in model.levels[by]]
            slices = [s for s in slices if s.test["df"] > 0]
            for s, p in zip(slices, holm([s.test["p"] for s in slices])):
                s.test["p_holm"] = p
            if slices:
                out[(factor, by)] = slices
    return out


def default_metrics(table: pd.DataFrame) -> List[str]:
    """The metric columns evaluate.py writes (the registry of ldm.evaluation.metrics)."""
    return [c for c in table.columns if is_metric_column(str(c))]


def analyse(table: pd.DataFrame, metrics: Optional[Sequence[str]], factors: Sequence[str],
            interactions: Optional[Sequence[str]] = None, alpha: float = 0.05,
            blocks: Optional[Sequence[str]] = None, covariates: Sequence[str] = ()) -> List[MetricAnalysis]:
    """The analysis of each metric (default: every metric column), adjusted as one study; blocks default to the
    table's seed and subject columns, interactions (None) to every two-way interaction the design has the df for."""
    alpha = check_alpha(alpha)
    if not factors:
        raise AnalysisError("no factors to analyse: pass --factors (columns of the results table)")
    metrics = list(metrics or default_metrics(table))
    if not metrics:
        raise AnalysisError(f"no metric columns (<backend>_i, <backend>_t, <backend>_prior, fid, ...) in the table: "
                            f"pass --metrics; columns: {', '.join(map(str, table.columns))}")
    blocks = default_blocks(table, factors) if blocks is None else list(blocks)
    overlap = set(covariates) & (set(factors) | set(blocks))
    if overlap:
        raise AnalysisError(f"{', '.join(sorted(overlap))} cannot be a covariate and a factor or block at once")
    pairs = None if interactions is None else parse_interactions(interactions, factors)
    results = [analyse_metric(table, m, factors, pairs, alpha, blocks, covariates, adjust=False) for m in metrics]
    adjust_study(results)
    return results
