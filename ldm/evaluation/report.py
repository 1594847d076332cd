"""The report of a design-space analysis: tables as Markdown and CSV, plots as PNG (matplotlib, Agg), and one
report.md that links them all with relative paths."""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ldm.evaluation.anova import CONSTANT_NOTE, MetricAnalysis

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


def write_table(table: pd.DataFrame, path: Path) -> None:
    """`path`.csv and `path`.md."""
    table.to_csv(path.with_suffix(".csv"), index=False)
    path.with_suffix(".md").write_text(markdown_table(table) + "\n")


# ---- plots ------------------------------------------------------------------------------------------------------
def level_order(values: pd.Series) -> List[str]:
    """Levels in numeric order when they are all numbers, else in order of first appearance (the grid's order)."""
    levels = list(dict.fromkeys(values.astype(str)))
    try:
        return sorted(levels, key=float)
    except ValueError:
        return levels


def plot_levels(table: pd.DataFrame, metric: str, factor: str, path: Path) -> Path:
    """The metric by level of one factor: a box per level, every run as a dot, the mean as a diamond."""
    data = table.dropna(subset=[metric])
    levels = level_order(data[factor])
    groups = [data.loc[data[factor].astype(str) == lv, metric].astype(float).to_numpy() for lv in levels]
    fig, ax = _figure(figsize=(max(4.0, 0.7 * len(levels) + 2), 3.6))
    ax.boxplot(groups, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)
    for i, g in enumerate(groups, start=1):
        ax.scatter(i + jitter.uniform(-0.12, 0.12, len(g)), g, s=14, alpha=0.7, color="tab:blue", zorder=3)
        ax.scatter([i], [g.mean()], marker="D", s=30, color="tab:red", zorder=4)
    ax.set_xticks(range(1, len(levels) + 1), levels, rotation=45 if len(levels) > 4 else 0, ha="right"
                  if len(levels) > 4 else "center")
    ax.set(xlabel=factor, ylabel=metric, title=f"{metric} by {factor}")
    return save(fig, path)


def plot_interaction(table: pd.DataFrame, metric: str, f1: str, f2: str, path: Path) -> Path:
    """Mean metric by level of f1, one line per level of f2 (non-parallel lines: an interaction)."""
    data = table.dropna(subset=[metric]).astype({f1: str, f2: str})
    x_levels = level_order(data[f1])
    means = data.groupby([f2, f1])[metric].mean()
    fig, ax = _figure(figsize=(max(4.5, 0.7 * len(x_levels) + 2.5), 3.6))
    for lv in level_order(data[f2]):
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
    groups = [(str(lv), data[data[color_by].astype(str) == lv]) for lv in level_order(data[color_by])] \
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


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ---- the report -------------------------------------------------------------------------------------------------
def metric_section(table: pd.DataFrame, result: MetricAnalysis, factors: Sequence[str],
                   pairs: Sequence[Tuple[str, str]], outdir: Path) -> List[str]:
    """The Markdown of one metric: ANOVA, Tukey tables, plots; writes their files under `outdir`."""
    m = result.metric
    write_table(result.anova, outdir / f"anova-{m}")
    lines = [f"## {m}", "", f"Type II ANOVA on {result.n} runs (`anova-{m}.csv`):", "",
             markdown_table(result.anova), ""]
    lines += [f"> Note: {n}" for n in result.notes] + ([""] if result.notes else [])
    for f, tukey in result.tukey.items():
        write_table(tukey, outdir / f"tukey-{m}-{f}")
        lines += [f"Tukey HSD for {f} (`tukey-{m}-{f}.csv`):", "", markdown_table(tukey), ""]
    plots = [plot_levels(table, m, f, outdir / "plots" / f"{m}-by-{f}.png") for f in factors]
    plots += [plot_interaction(table, m, a, b, outdir / "plots" / f"{m}-{a}-x-{b}.png") for a, b in pairs]
    if PARAMETERS in table.columns:
        plots.append(plot_parameters(table, m, factors[0] if factors else None,
                                     outdir / "plots" / f"{m}-vs-parameters.png"))
    lines += [f"![{p.stem}]({p.relative_to(outdir).as_posix()})" for p in plots] + [""]
    return lines


def summary_lines(results: Sequence[MetricAnalysis], factors: Sequence[str]) -> List[str]:
    """One line per metric: the factors ranked by eta², with p."""
    lines = []
    for r in results:
        if CONSTANT_NOTE in r.notes:
            lines.append(f"- **{r.metric}**: {CONSTANT_NOTE}")
            continue
        main = r.anova[r.anova.term.isin(factors)].sort_values("eta_sq", ascending=False)
        ranked = ", ".join(f"{t} (eta² {fmt(e) or 'n/a'}, p {fmt(p) or 'n/a: no df of its own'})"
                           for t, e, p in zip(main.term, main.eta_sq, main.p))
        lines.append(f"- **{r.metric}**: {ranked}")
    return lines


def write_report(table: pd.DataFrame, results: Sequence[MetricAnalysis], factors: Sequence[str],
                 interactions: Sequence[Tuple[str, ...]], outdir: Path, source: str = "",
                 alpha: float = 0.05) -> Path:
    """report.md with every table and plot under `outdir`; returns its path."""
    outdir.mkdir(parents=True, exist_ok=True)
    pairs = [(i[0], i[1]) for i in interactions] or ([(factors[0], factors[1])] if len(factors) > 1 else [])
    lines = ["# Design-space analysis", "", f"Results: {source or 'the results table'} ({len(table)} runs). Factors: "
             f"{', '.join(factors)}. Significance level {alpha}; Tukey HSD for factors with p < {alpha}.", "",
             "Factors by share of variance explained (eta²):", "", *summary_lines(results, factors), ""]
    for result in results:
        lines += metric_section(table, result, factors, pairs, outdir)
    path = outdir / "report.md"
    path.write_text("\n".join(lines))
    return path

