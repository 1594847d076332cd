"""The analysis of a design-space study's results table: for each metric the ANOVA (`anova`), the levels of every
factor with adjusted pairwise comparisons (`comparisons`), and the design points (the combinations of the factors'
levels, e.g. the 20 position pairs) compared with each other on a one-way model with the same blocks; and the
correlations between the metrics. `findings` turns it into sentences, `report` into files."""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from ldm.evaluation.anova import (CONSTANT_NOTE, AnalysisError, Model, Term, anova_table, check_alpha, default_blocks,
                                  parse_interactions, prepare, type2)
from ldm.evaluation.comparisons import level_table, pairwise
from ldm.evaluation.table import higher_is_better, is_metric_column

log = logging.getLogger(__name__)

POINT = "design point"  # the column of the one-way model over the combinations of the factors' levels


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
    point_test: Optional[pd.Series] = None  # the one-way F test over the design points (with df_resid)
    notes: List[str] = field(default_factory=list)

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
    """The factors of the sweep whose folder holds the table, without seed (replicates, not a design factor)."""
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
    return [f for f in factors if f != "seed"]


def point_model(model: Model) -> Model:
    """The one-way model over the design points (every observed combination of the factors' levels) with the blocks."""
    data = model.data.copy()
    data[POINT] = data[list(model.factors)].agg(" / ".join, axis=1)
    return Model(data, model.metric, (POINT,), model.blocks)


def analyse_metric(table: pd.DataFrame, metric: str, factors: Sequence[str], interactions: Sequence[Term] = (),
                   alpha: float = 0.05, blocks: Sequence[str] = ()) -> MetricAnalysis:
    """The ANOVA of one metric, every factor's levels and adjusted comparisons, and the design points."""
    alpha = check_alpha(alpha)
    data, notes = prepare(table, metric, factors, blocks)
    model = Model(data, metric, tuple(factors), tuple(blocks), tuple(tuple(i) for i in interactions))
    anova, fit, more = anova_table(model, alpha)
    result = MetricAnalysis(metric, model, anova, alpha, notes=notes + more)
    if result.constant:
        return result
    for f in factors:
        result.levels[f], result.pairs[f] = level_table(model, fit, f, alpha), pairwise(model, fit, f, alpha)
    if len(factors) > 1:
        points = point_model(model)
        tests, point_fit = type2(points)
        if point_fit.df_resid > 0:
            result.point_test = pd.concat([tests[tests.term == POINT].iloc[0],
                                           pd.Series({"df_resid": point_fit.df_resid})])
            result.points = level_table(points, point_fit, POINT, alpha)
            result.point_pairs = pairwise(points, point_fit, POINT, alpha)
    return result


def default_metrics(table: pd.DataFrame) -> List[str]:
    """The metric columns evaluate.py writes (ldm.evaluation.table)."""
    return [c for c in table.columns if is_metric_column(str(c))]


def analyse(table: pd.DataFrame, metrics: Optional[Sequence[str]], factors: Sequence[str],
            interactions: Sequence[str] = (), alpha: float = 0.05, blocks: Optional[Sequence[str]] = None
            ) -> List[MetricAnalysis]:
    """The analysis of each metric (default: every metric column); blocks default to the table's seed column."""
    alpha = check_alpha(alpha)
    if not factors:
        raise AnalysisError("no factors to analyse: pass --factors (columns of the results table)")
    metrics = list(metrics or default_metrics(table))
    if not metrics:
        raise AnalysisError(f"no metric columns (<backend>_i, <backend>_t, <backend>_prior, fid) in the table: pass "
                            f"--metrics; columns: {', '.join(map(str, table.columns))}")
    blocks = default_blocks(table, factors) if blocks is None else list(blocks)
    pairs = parse_interactions(interactions, factors)
    return [analyse_metric(table, m, factors, pairs, alpha, blocks) for m in metrics]
