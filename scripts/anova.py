"""Analysis of variance of a design-space study: which factor drives each metric, with plots, as one report.

    python scripts/anova.py sweeps/pairs/results.csv --factors din dout --out sweeps/pairs/analysis
    python scripts/anova.py results.csv --factors din dout method --interactions din:dout --metrics dino_i clip_t
    python scripts/anova.py results.csv --factors din dout --plan 0.015     # seeds and subjects to detect 0.015

Type II ANOVA with eta² and partial eta² (with intervals and the power of each test), the seed and the subject as
blocks, every two-way interaction the design has the degrees of freedom for, Holm's correction over all the study's
tests (the unadjusted p beside it), simple effects where an interaction is significant, every factor's levels with
intervals and pairwise comparisons adjusted for the other terms (Holm), the design points compared with each other,
correlations between metrics, a plan for the next study from this one's variances, and findings written from those
numbers; tables as CSV and Markdown, PNG plots, <out>/report.md linking them and <out>/findings.md (the findings
alone). Factors default to the sweep's (from sweep.json beside the table) without seed and subject; blocks default to
the table's seed and subject columns. Nothing is overwritten: when the report folder exists, the report goes to a
fresh folder beside it (analysis-2, analysis-3, ...), and its path is printed.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ldm.checks import ArgumentParser, OutputPathError, check_writable_place, fresh_dir
from ldm.evaluation.anova import AnalysisError
from ldm.evaluation.planning import check_difference, pilot
from ldm.evaluation.report import plan_sentences, write_report
from ldm.evaluation.study import analyse, read_table, sweep_factors


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", help="the results CSV of scripts/evaluate.py")
    p.add_argument("--factors", nargs="+", help="factor columns (default: the sweep's factors except seed and subject)")
    p.add_argument("--metrics", nargs="+",
                   help="metric columns (default: every column of the metric registry: <backend>_i, _t, _prior, "
                        "_leak, ..., fid)")
    p.add_argument("--interactions", nargs="*", metavar="A:B",
                   help="interaction terms, e.g. din:dout (default: every two-way interaction of the factors, and of "
                        "each factor with subject, that the design has the degrees of freedom for; --interactions "
                        "alone for none)")
    p.add_argument("--blocks", nargs="*", help="replicate columns modelled as additive blocks (default: seed and "
                                                "subject, when the table has them with 2 or more levels; --blocks "
                                                "alone for none)")
    p.add_argument("--covariates", nargs="+", default=[], metavar="COLUMN",
                   help="numeric columns entered with one slope each, e.g. trainable_parameters (adjusts every test "
                        "and comparison for the parameter count)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level in (0, 1) (default 0.05); "
                                                             "intervals are at 1 - alpha")
    p.add_argument("--plan", type=float, metavar="DIFF",
                   help="also say how many subjects and seeds per design point detect a difference of DIFF between "
                        "two design points, with this study as the pilot (printed and in the report)")
    p.add_argument("--out", help="report folder (default: analysis/ beside the table); when it exists, a fresh "
                                 "folder beside it (<out>-2, ...) is used")
    opt = p.parse_args(argv)
    if not 0 < opt.alpha < 1:  # NaN fails too
        p.error(f"--alpha must be between 0 and 1 (exclusive), got {opt.alpha}: e.g. --alpha 0.05")
    if opt.plan is not None:
        try:
            check_difference(opt.plan)
        except AnalysisError as e:
            p.error(str(e))
    return opt


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    path = Path(opt.table)
    out = Path(opt.out or path.parent / "analysis")
    try:
        check_writable_place(out, "--out")  # before the analysis; the folder itself is claimed when it is written
        table = read_table(path)
        factors = opt.factors or sweep_factors(path)
        results = analyse(table, opt.metrics, factors, opt.interactions, opt.alpha, opt.blocks, opt.covariates)
        report = write_report(table, results, fresh_dir(out, "--out"), source=path.name, alpha=opt.alpha,
                              diff=opt.plan)
        plans = [line for r in results if opt.plan is not None and not r.constant
                 for line in plan_sentences(pilot(r), opt.plan, opt.alpha)]
    except (AnalysisError, OutputPathError) as e:
        sys.exit(f"error: {e}")
    for line in plans:
        print(line)
    print(f"report in {report}")
    return report


if __name__ == "__main__":
    main()
