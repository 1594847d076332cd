"""The sentences of a design-space report, generated from the numbers so that no claim outruns its uncertainty.

- A factor "drives" a metric only when its Type II test is significant at alpha after the Holm adjustment over all
  the study's tests; the sentence gives F, the unadjusted and the adjusted p, eta² and partial eta² with its
  interval. A test significant only before the correction is said to be so, and not called a driver; otherwise the
  sentence says what effect the test could detect.
- Where an interaction is significant, the main-effect sentences of its factors say so, and the claims about levels
  are made within each level of the other factor (simple effects) instead of on the average.
- A level (or design point) is called "best" only when its adjusted comparisons separate it from every other one;
  otherwise it is the "top" one, "not separated from" the others it cannot be told from, with its lead over the
  runner-up and the difference that comparison could detect.
- Two sets of runs (e.g. the whole UNet against an adapter) are called higher or lower only when Welch's interval of
  their difference excludes 0.
- Two metrics are called correlated only when the Holm-adjusted p of their Pearson r is below alpha, with r, its
  interval and p.
"""
from typing import List, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ldm.evaluation.anova import CONSTANT_NOTE
from ldm.evaluation.comparisons import ranking
from ldm.evaluation.study import POINT, MetricAnalysis, SimpleEffect, significant
from ldm.evaluation.metrics import metric_of_column
from ldm.evaluation.table import higher_is_better

FACTOR_KINDS = ("factor", "covariate", "interaction")


def num(value: float, digits: int = 3) -> str:
    """A number in a sentence: `digits` significant digits, scientific below 1e-3."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits - 1}e}" if value != 0 and abs(value) < 1e-3 else f"{value:.{digits}g}"


def share(value: float) -> str:
    """An effect size (a share of variance) to 2 decimals."""
    return f"{value:.2f}" if value is not None and np.isfinite(value) else "n/a"


def p_text(p: float) -> str:
    return "p < 1e-12" if np.isfinite(p) and p < 1e-12 else f"p = {num(p, 2)}"


def confidence(alpha: float) -> str:
    return f"{num(100 * (1 - alpha), 3)}%"


def describe_metric(metric: str) -> str:
    """'tinyworld_i' -> 'subject fidelity, higher is better'."""
    found = metric_of_column(metric)
    kind = found.title if found else ""
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    return f"{kind}, {direction}" if kind else direction


def holm_text(r: MetricAnalysis, p: float) -> str:
    return f"Holm-adjusted over the study's {r.family} tests {num(p, 2)}"


def term_sentence(r: MetricAnalysis, row: pd.Series) -> str:
    """Whether a factor, covariate or interaction drives the metric, with the numbers that say so."""
    name = f"the {row.term} interaction" if row.kind == "interaction" else row.term
    if row.df == 0:
        return f"- {name}: no degree of freedom of its own (confounded with the other terms), so not tested."
    test = f"F({int(row.df)}, {int(r.term('Residual').df)}) = {num(row.F)}, {p_text(row.p)}, {holm_text(r, row.p_holm)}"
    if row.p_holm < r.alpha:
        interval = (f" ({confidence(2 * r.alpha)} CI {share(row.partial_eta_sq_low)} to "
                    f"{share(row.partial_eta_sq_high)})") if r.alpha < 0.5 else ""
        what = (f"is significant for {r.metric}: the effect of {row.term.split(':')[0]} depends on "
                f"{' and '.join(row.term.split(':')[1:])}") if row.kind == "interaction" else f"drives {r.metric}"
        return (f"- **{name} {what}**: {test}; eta² {share(row.eta_sq)}, partial eta² "
                f"{share(row.partial_eta_sq)}{interval}.{depends_text(r, row)}")
    if row.p < r.alpha:
        return (f"- {name}: significant only before the correction for the study's {r.family} tests ({test}), so no "
                f"claim is made on it.{depends_text(r, row)}")
    return (f"- {name}: not significant ({test}; eta² {share(row.eta_sq)}); with these runs the F test detects "
            f"(80% power) effects of partial eta² {share(row.detectable_partial_eta_sq)} or more."
            f"{depends_text(r, row)}")


def interacting(r: MetricAnalysis, factor: str) -> List[str]:
    """The other terms of the significant two-way interactions that contain `factor`."""
    return [b for (a, b) in r.simple if a == factor]


def depends_text(r: MetricAnalysis, row: pd.Series) -> str:
    """For a main effect whose factor is in a significant interaction: say so, and where its claims are."""
    others = interacting(r, row.term) if row.kind == "factor" else []
    if not others:
        return ""
    return (f" Its effect depends on {' and '.join(others)} (significant interaction), so this test averages over "
            f"{'them' if len(others) > 1 else 'its levels'}; its levels are compared within each level of "
            f"{' and '.join(others)} below (simple effects).")


def simple_lines(r: MetricAnalysis, factor: str, by: str, slices: Sequence[SimpleEffect]) -> List[str]:
    """The simple effects of `factor` within each level of `by`, and the top level within each significant one."""
    df2 = int(r.term("Residual").df)
    parts = [f"{s.where}: F({int(s.test['df'])}, {df2}) = {num(s.test['F'])}, {p_text(s.test['p'])}, Holm "
             f"{num(s.test['p_holm'], 2)}{' (significant)' if s.test['p_holm'] < r.alpha else ''}" for s in slices]
    lines = [f"- Simple effects of {factor} within each level of {by} (Holm-adjusted over the {len(slices)} levels "
             f"where {factor} varies): " + "; ".join(parts) + "."]
    for s in slices:
        if s.test["p_holm"] < r.alpha and len(s.levels) > 1:
            lines.append("  " + ranking_sentence(r, f"{factor} within {s.where}", s.levels, s.pairs))
    return lines


def block_sentence(r: MetricAnalysis, row: pd.Series) -> str:
    if row.p < r.alpha:
        return (f"- Block {row.term}: significant ({p_text(row.p)}, eta² {share(row.eta_sq)}): runs that share a "
                f"{row.term} share a shift, which the model takes out of every comparison.")
    return f"- Block {row.term}: not significant ({p_text(row.p)}, eta² {share(row.eta_sq)})."


def names(levels: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(levels[:limit])
    return shown + (f" and {len(levels) - limit} more" if len(levels) > limit else "")


def ranking_sentence(r: MetricAnalysis, what: str, levels: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """'Best X' when separated from every other level, else 'Top X, not separated from N others'."""
    rank = ranking(levels, pairs, r.higher_is_better)
    top = levels[levels.level == rank["top"]].iloc[0]
    value = ("EMM" if rank["by"] == "emm" else "mean of its runs")
    low, high = (top.emm_low, top.emm_high) if rank["by"] == "emm" else (top.low, top.high)
    head = (f"{rank['top']} ({value} {num(top[rank['by']], 4)}, {confidence(r.alpha)} CI {num(low, 4)} to "
            f"{num(high, 4)})")
    others = len(levels) - 1
    if rank["best"]:
        return f"- **Best {what}: {head}**, separated from each of the other {others} (Holm-adjusted p < {r.alpha})."
    parts = []
    if rank["not_separated"]:
        parts.append(f"not separated from {len(rank['not_separated'])} of the other {others} "
                     f"({names(rank['not_separated'])})")
    if rank["not_comparable"]:
        parts.append(f"not comparable with {len(rank['not_comparable'])} that the design confounds with another "
                     f"factor ({names(rank['not_comparable'])})")
    if rank["separated"]:
        parts.append(f"separated from {len(rank['separated'])} ({names(rank['separated'])})")
    return f"- Top {what}: {head}, {'; '.join(parts)}.{lead_text(rank, pairs)}"


def lead_text(rank: dict, pairs: pd.DataFrame) -> str:
    """The top one's lead over the runner-up and the difference their comparison detects with 80 % power."""
    a, b = rank["top"], rank["runner_up"]
    row = pairs[((pairs.level_a == a) & (pairs.level_b == b)) | ((pairs.level_a == b) & (pairs.level_b == a))]
    lead = abs(rank["value"] - rank["runner_up_value"])
    text = f" Its lead over the runner-up {b} is {num(lead, 2)}"
    if row.estimable.iloc[0]:
        text += f"; that comparison detects differences of {num(row.mdd.iloc[0], 2)} or more (80% power)"
    return text + "."


def separated_sentence(what: str, pairs: pd.DataFrame, alpha: float, limit: int = 12) -> str:
    """How many pairs of levels the adjusted comparisons separate, and (up to `limit`) which, larger first."""
    tested = pairs[pairs.estimable]
    hits = tested[tested.separated].sort_values("p_holm", kind="stable")
    scope = f"the {len(tested)} estimable pairs" + \
        (f" ({len(pairs) - len(tested)} more are not estimable)" if len(tested) < len(pairs) else "")
    if hits.empty:
        return f"- {what}: none of {scope} is separated (Holm-adjusted p < {alpha})."
    shown = [f"{a} > {b} by {num(d, 2)}" if d > 0 else f"{b} > {a} by {num(-d, 2)}"
             for a, b, d in zip(hits.level_a, hits.level_b, hits["diff"])][:limit]
    listed = f": {'; '.join(shown)}" + (f"; and {len(hits) - len(shown)} more" if len(hits) > len(shown) else "")
    return f"- {what}: {len(hits)} of {scope} separated (Holm-adjusted p < {alpha}){listed if shown else ''}."


def metric_findings(r: MetricAnalysis) -> List[str]:
    """The sentences about one metric."""
    lines = [f"**{r.metric}** ({describe_metric(r.metric)}; {r.n} runs):", ""]
    if r.constant:
        return lines + [f"- {CONSTANT_NOTE}.", ""]
    terms = r.anova[r.anova.kind.isin(FACTOR_KINDS)].sort_values("eta_sq", ascending=False, kind="stable")
    lines += [term_sentence(r, row) for _, row in terms.iterrows()]
    lines += [block_sentence(r, row) for _, row in r.anova[r.anova.kind == "block"].iterrows()]
    for f in r.model.factors:
        if interacting(r, f):
            for by in interacting(r, f):
                lines += simple_lines(r, f, by, r.simple[(f, by)])
        elif significant(r, f):
            lines.append(ranking_sentence(r, f, r.levels[f], r.pairs[f]))
            lines.append(separated_sentence(f"Pairs of {f}", r.pairs[f], r.alpha))
    if r.points is not None:
        test = r.point_test
        verdict = "differ" if test.p_holm < r.alpha else "do not differ significantly"
        what = ' / '.join(r.model.factors)
        lines.append(f"- The {len(r.points)} design points ({what}) {verdict} (one-way F({int(test.df)}, "
                     f"{int(test.df_resid)}) = {num(test.F)}, {p_text(test.p)}, {holm_text(r, test.p_holm)}).")
        lines.append(ranking_sentence(r, f"{POINT} ({what})", r.points, r.point_pairs))
        if test.p_holm < r.alpha:
            lines.append(separated_sentence("Pairs of design points", r.point_pairs, r.alpha, limit=0))
    return lines + [""]


def correlation_sentences(table: pd.DataFrame, alpha: float) -> List[str]:
    """One sentence per pair of metrics: correlated only when the Holm-adjusted p is below alpha."""
    lines = []
    for row in table.itertuples():
        if not np.isfinite(row.r):
            lines.append(f"- {row.metric_a} and {row.metric_b}: no correlation computable ({row.n} runs with both, "
                         "or a constant metric).")
            continue
        numbers = (f"r = {num(row.r, 2)}, {confidence(alpha)} CI {num(row.low, 2)} to {num(row.high, 2)}, "
                   f"{p_text(row.p)}, Holm-adjusted {num(row.p_holm, 2)}, {row.n} runs")
        if row.significant:
            sign = "positively" if row.r > 0 else "negatively"
            lines.append(f"- **{row.metric_a} and {row.metric_b} are {sign} correlated**: {numbers}.")
        else:
            lines.append(f"- {row.metric_a} and {row.metric_b}: no significant correlation ({numbers}).")
    return lines


def difference_sentence(metric: str, a_name: str, a: Sequence[float], b_name: str, b: Sequence[float],
                        alpha: float = 0.05) -> str:
    """Two sets of runs compared on one metric (e.g. the whole UNet against an adapter, one value per training seed):
    the difference of means with Welch's t interval and p; "higher" or "lower" only when the interval excludes 0,
    otherwise "not separated", with what the runs could show."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return (f"- {a_name} vs {b_name} on {metric}: {len(a)} and {len(b)} run(s), too few for an interval "
                "(2 or more each).")
    test = stats.ttest_ind(a, b, equal_var=False)
    low, high = test.confidence_interval(1 - alpha)
    diff = a.mean() - b.mean()
    numbers = (f"difference {num(diff)} ({confidence(alpha)} CI {num(low)} to {num(high)}, Welch t({num(test.df)}) = "
               f"{num(test.statistic)}, {p_text(test.pvalue)}; {len(a)} vs {len(b)} runs)")
    if low > 0 or high < 0:
        return f"- **{a_name} is {'higher' if diff > 0 else 'lower'} than {b_name} on {metric}**: {numbers}."
    return f"- {a_name} and {b_name} are not separated on {metric}: {numbers}."
