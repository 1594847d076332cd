"""The report of a design-space analysis: the findings as sentences generated from the numbers (`findings`), the plan
of a next study from this one's variances (`planning`), tables as Markdown and CSV, plots as PNG (matplotlib, Agg),
one report.md that links them all with relative paths, and findings.md with the generated findings alone (what the
docs link to instead of quoting numbers by hand). Every file is written atomically."""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ldm.checkpoint import atomic_write
from ldm.evaluation.anova import AnalysisError, levels_of
from ldm.evaluation.comparisons import correlations
from ldm.evaluation.findings import confidence, correlation_sentences, metric_findings, num
from ldm.evaluation.planning import pilot, pilot_text, plan_table, smallest_plans
from ldm.evaluation.study import POINT, MetricAnalysis

PARAMETERS = "trainable_parameters"


# ---- tables -----------------------------------------------------------------------------------------------------
def fmt(value) -> str:
    """A table cell: p-values and small numbers in scientific notation, others to 4 significant digits."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return ""
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> Path:
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))
    return path


def write_table(table: pd.DataFrame, path: Path) -> None:
    """`path`.csv and `path`.md."""
    write_text(path.with_suffix(".csv"), table.to_csv(index=False))
    write_text(path.with_suffix(".md"), markdown_table(table) + "\n")


def file_stem(name: str) -> str:
    return name.replace(" ", "-").replace("/", "-")


# ---- plots ------------------------------------------------------------------------------------------------------
def plot_levels(table: pd.DataFrame, metric: str, factor: str, path: Path,
                levels: Optional[pd.DataFrame] = None, interval: str = "95%") -> Path:
    """The metric by level of one factor: a box per level, every run as a dot, the mean as a diamond with its
    confidence interval (from the level table) beside it."""
    data = table.dropna(subset=[metric])
    order = levels_of(data[factor])
    groups = [data.loc[data[factor].astype(str) == lv, metric].astype(float).to_numpy() for lv in order]
    fig, ax = _figure(figsize=(max(4.0, 0.7 * len(order) + 2), 3.6))
    ax.boxplot(groups, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)
    for i, g in enumerate(groups, start=1):
        ax.scatter(i + jitter.uniform(-0.12, 0.12, len(g)), g, s=14, alpha=0.7, color="tab:blue", zorder=3)
        ax.scatter([i], [g.mean()], marker="D", s=30, color="tab:red", zorder=4)
    if levels is not None:
        ci = levels.set_index("level").loc[order]
        ax.errorbar(np.arange(1, len(order) + 1) + 0.3, ci["mean"], yerr=[ci["mean"] - ci["low"],
                    ci["high"] - ci["mean"]], fmt="none", ecolor="tab:red", capsize=3, zorder=4)
    rotate = len(order) > 4
    ax.set_xticks(range(1, len(order) + 1), order, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    title = f"{metric} by {factor}" + (f" (red: mean, {interval} interval)" if levels is not None else "")
    ax.set(xlabel=factor, ylabel=metric, title=title)
    return save(fig, path)


def plot_interaction(table: pd.DataFrame, metric: str, f1: str, f2: str, path: Path) -> Path:
    """Mean metric by level of f1, one line per level of f2 (non-parallel lines: an interaction)."""
    data = table.dropna(subset=[metric]).astype({f1: str, f2: str})
    x_levels = levels_of(data[f1])
    means = data.groupby([f2, f1])[metric].mean()
    fig, ax = _figure(figsize=(max(4.5, 0.7 * len(x_levels) + 2.5), 3.6))
    for lv in levels_of(data[f2]):
        ys = [means.get((lv, x), np.nan) for x in x_levels]
        ax.plot(range(len(x_levels)), ys, marker="o", label=f"{f2}={lv}")
    ax.set_xticks(range(len(x_levels)), x_levels, rotation=45 if len(x_levels) > 4 else 0)
    ax.set(xlabel=f1, ylabel=f"mean {metric}", title=f"{metric}: {f1} x {f2}")
    ax.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return save(fig, path)


def plot_parameters(table: pd.DataFrame, metric: str, color_by: Optional[str], path: Path) -> Path:
    """The metric against trainable parameters, one dot per run, coloured by a factor's levels."""
    data = table.dropna(subset=[metric, PARAMETERS])
    fig, ax = _figure(figsize=(5.5, 3.8))
    groups = [(str(lv), data[data[color_by].astype(str) == lv]) for lv in levels_of(data[color_by])] \
        if color_by else [("runs", data)]
    for label, g in groups:
        ax.scatter(g[PARAMETERS].astype(float), g[metric].astype(float), s=18, label=label)
    params = data[PARAMETERS].astype(float)
    if len(params) and params.min() > 0 and params.max() / params.min() > 10:
        ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=metric, title=f"{metric} vs parameters")
    if color_by:
        ax.legend(title=color_by, fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return save(fig, path)


def _figure(figsize: Tuple[float, float]) -> Tuple[Figure, Axes]:
    """A figure and its axes, drawn straight to a file by Agg (no pyplot, no display, no global backend switch)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def save(fig, path: Path) -> Path:
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    return path


# ---- the report -------------------------------------------------------------------------------------------------
def comparison_lines(r: MetricAnalysis, name: str, levels: pd.DataFrame, pairs: pd.DataFrame,
                     outdir: Path) -> List[str]:
    """The level table and the pairwise comparisons of one factor (or of the design points)."""
    stem = file_stem(f"{r.metric}-{name}")
    order = levels.sort_values("emm" if levels.emm.notna().all() else "mean", ascending=not r.higher_is_better)
    write_table(order, outdir / f"levels-{stem}")
    write_table(pairs, outdir / f"pairs-{stem}")
    shown = pairs[pairs.estimable].sort_values("p_holm", kind="stable")
    if name == POINT:  # 190 pairs for 20 points: the report shows the top one's, the CSV has all
        top = order.level.iloc[0]
        shown = shown[(shown.level_a == top) | (shown.level_b == top)]
    lines = [f"Levels of {name}, mean of the runs and EMM with {confidence(r.alpha)} intervals "
             f"(`levels-{stem}.csv`):", "", markdown_table(order), "",
             f"Pairwise comparisons of {name} (diff = a - b of the EMMs, adjusted for the other terms; p_holm "
             f"decides `separated`; low/high: the simultaneous Bonferroni interval, which can be wider than Holm's "
             f"decisions; mdd: the difference detected with 80% power) (`pairs-{stem}.csv`"
             f"{', all pairs' if name == POINT else ''}):", "", markdown_table(shown), ""]
    hidden = int((~pairs.estimable).sum())
    if hidden:
        lines += [f"{hidden} pair(s) of levels are not estimable in this design (confounded with another factor): "
                  f"listed in `pairs-{stem}.csv`.", ""]
    return lines


def metric_section(table: pd.DataFrame, r: MetricAnalysis, outdir: Path) -> List[str]:
    """The Markdown of one metric: ANOVA, levels and comparisons, design points, plots; writes their files."""
    m, factors = r.metric, r.model.factors
    write_table(r.anova, outdir / f"anova-{m}")
    blocks = f" with block(s) {', '.join(r.model.blocks)}" if r.model.blocks else ""
    lines = [f"## {m}", "", f"Type II ANOVA on {r.n} runs{blocks} (`anova-{m}.csv`):", "", markdown_table(r.anova),
             ""]
    lines += [f"> Note: {n}" for n in r.notes] + ([""] if r.notes else [])
    lines += simple_effect_lines(r, outdir)
    for f in factors if not r.constant else ():
        lines += comparison_lines(r, f, r.levels[f], r.pairs[f], outdir)
    if r.points is not None:
        lines += comparison_lines(r, POINT, r.points, r.point_pairs, outdir)
    plots = [plot_levels(table, m, f, outdir / "plots" / f"{m}-by-{f}.png", r.levels.get(f), confidence(r.alpha))
             for f in factors]
    pairs = [t for t in r.model.interactions if len(t) == 2] or ([factors[:2]] if len(factors) > 1 else [])
    plots += [plot_interaction(table, m, a, b, outdir / "plots" / f"{m}-{a}-x-{b}.png") for a, b in pairs]
    if PARAMETERS in table.columns:
        plots.append(plot_parameters(table, m, factors[0], outdir / "plots" / f"{m}-vs-parameters.png"))
    lines += [f"![{p.stem}]({p.relative_to(outdir).as_posix()})" for p in plots] + [""]
    return lines


METHOD = """How to read it: each metric is fitted by least squares on the factors as categories{blocks}{covariates},
with the two-way interactions {interactions}. The study's {family} tests (every factor, covariate and interaction test
and the design-point test of every metric) are one family: their p-values are Holm-adjusted together, and a factor
*drives* a metric only when its Type II F test is significant at alpha after that correction (the unadjusted p is
given beside it). eta² is a term's share of the metric's variance, partial eta² its share after the other terms, with
a 1 - 2 alpha interval from the noncentral F distribution (above 0 exactly when the unadjusted test is significant).
Where an interaction is significant, a main effect averages over the other factor, so its levels are compared within
each level of the other factor instead (simple effects: an F test per level, Holm-adjusted over the levels). A level
is called *best* only when its comparisons (differences of estimated marginal means on the model with the
significant interactions, adjusted for the other terms, Holm-adjusted over the factor's pairs) separate it from every
other level; otherwise it is the *top* one, not separated from the others. Pairs the design cannot estimate (levels
that only occur together with one level of another factor) are reported as such. Correlations are Pearson's r over
runs, Holm-adjusted over the pairs of metrics."""
BLOCK_TEXT = {"seed": "the training seed: replicates", "subject": "the subject: a fixed block, so the claims are about "
              "these subjects, and a factor x subject interaction tests whether an effect differs between them"}


def method_text(results: Sequence[MetricAnalysis]) -> str:
    """METHOD filled in for this study."""
    model = results[0].model
    blocks = "; ".join(BLOCK_TEXT.get(b, b) for b in model.blocks)
    interactions = sorted({":".join(t) for r in results for t in r.model.interactions})
    return METHOD.format(
        blocks=f" plus the block(s) {', '.join(model.blocks)} (an additive shift per level, tested but not a design "
               f"factor: {blocks})" if model.blocks else "",
        covariates=f", and the covariate(s) {', '.join(model.covariates)} (one slope each)" if model.covariates else "",
        interactions=(f"{', '.join(interactions)} (every one the design has the degrees of freedom for, unless "
                      "--interactions names them)") if interactions else "none (additive model)",
        family=results[0].family).replace("\n", " ")


def findings_lines(table: pd.DataFrame, results: Sequence[MetricAnalysis], alpha: float, outdir: Path,
                   diff: Optional[float] = None) -> List[str]:
    """The generated findings: per metric, the correlations, and the plan from this study as a pilot."""
    lines = [line for r in results for line in metric_findings(r)]
    if len(results) > 1:
        corr = correlations(table, [r.metric for r in results], alpha)
        write_table(corr, outdir / "correlations")
        lines += ["**Correlations between metrics** over runs (`correlations.csv`):", "",
                  *correlation_sentences(corr, alpha), ""]
    return lines + planning_lines(results, alpha, outdir, diff)


def planning_lines(results: Sequence[MetricAnalysis], alpha: float, outdir: Path,
                   diff: Optional[float] = None) -> List[str]:
    """This study as a pilot: the difference between two design points that S subjects x R seeds detect."""
    lines = ["## Planning the next study", "", PLANNING.replace("\n", " "), ""]
    for r in results:
        if r.constant:
            continue
        try:
            p = pilot(r)
        except AnalysisError as e:
            lines += [f"- {r.metric}: {e}.", ""]
            continue
        grid = plan_table(p, alpha, diff=diff)
        write_table(grid, outdir / f"plan-{r.metric}")
        lines += [f"- {pilot_text(p)}.", "", markdown_table(grid.pivot(index="subjects", columns="seeds",
                                                                       values="mdd").reset_index()), ""]
        if diff is not None:
            lines += plan_sentences(p, diff, alpha) + [""]
    return lines


PLANNING = """The differences between two design points (mdd, 80% power, Holm's strictest step over all pairs of
design points) that a study with S subjects (rows) x R training seeds (columns) per design point detects, from this
study's seed-to-seed and subject-to-subject variances (`ldm/evaluation/planning.py` states the formula; `plan-*.csv`
has the standard errors and degrees of freedom)."""


def plan_sentences(p, diff: float, alpha: float, subjects: Sequence[int] = (1, 2, 3, 4, 6, 8, 12)) -> List[str]:
    """The fewest seeds for each number of subjects that detect `diff`."""
    plans = smallest_plans(p, diff, alpha, subjects)
    found = plans[plans.detects]
    if found.empty:
        return [f"- To detect {num(diff)} on {p.metric}: no plan with up to {max(subjects)} subjects and 64 seeds "
                "per design point does."]
    listed = "; ".join(f"{int(r.subjects)} subject(s) x {int(r.seeds)} seeds ({int(r.runs)} runs, mdd {num(r.mdd)})"
                       for r in found.itertuples())
    assumed = "" if p.tau2 is not None else " (no subject-to-subject variance in the pilot: taken as 0)"
    return [f"- To detect {num(diff)} on {p.metric} between two design points{assumed}: {listed}."]


def simple_effect_lines(r: MetricAnalysis, outdir: Path) -> List[str]:
    """The simple-effect tests of a metric, one table per (factor, other term), and their levels and pairs."""
    lines = []
    for (factor, by), slices in r.simple.items():
        stem = file_stem(f"{r.metric}-{factor}-within-{by}")
        tests = pd.DataFrame([{by: s.at[by], **s.test} for s in slices])
        write_table(tests, outdir / f"simple-{stem}")
        write_table(pd.concat([s.levels.assign(**{by: s.at[by]}) for s in slices]), outdir / f"levels-{stem}")
        write_table(pd.concat([s.pairs.assign(**{by: s.at[by]}) for s in slices]), outdir / f"pairs-{stem}")
        lines += [f"Simple effects of {factor} within each level of {by} (F test of {factor}'s cell means there on "
                  f"the model with the significant interactions, Holm over the levels; `simple-{stem}.csv`, levels "
                  f"and pairs within each in `levels-{stem}.csv`, `pairs-{stem}.csv`):", "", markdown_table(tests), ""]
    return lines


def write_report(table: pd.DataFrame, results: Sequence[MetricAnalysis], outdir: Path, source: str = "",
                 alpha: float = 0.05, diff: Optional[float] = None) -> Path:
    """report.md (and findings.md, its generated findings alone) with every table and plot under `outdir`; returns
    report.md's path."""
    outdir.mkdir(parents=True, exist_ok=True)
    model = results[0].model
    header = [f"Results: {source or 'the results table'} ({len(table)} runs). Factors: {', '.join(model.factors)}. "
              f"Blocks: {', '.join(model.blocks) or 'none'}. Covariates: {', '.join(model.covariates) or 'none'}. "
              f"Significance level {alpha}; intervals at {confidence(alpha)}.", "", method_text(results), ""]
    findings = findings_lines(table, results, alpha, outdir, diff)
    write_text(outdir / "findings.md", "\n".join(["# Findings (generated from the numbers by scripts/anova.py)", "",
                                                  *header, "## Findings", "", *findings]))
    lines = ["# Design-space analysis", "", *header, "## Findings", "", *findings]
    for r in results:
        lines += metric_section(table, r, outdir)
    return write_text(outdir / "report.md", "\n".join(lines))
