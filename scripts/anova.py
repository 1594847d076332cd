"""Analysis of variance of a design-space study: which factor drives each metric, with plots, as one report.

    python scripts/anova.py sweeps/pairs/results.csv --factors din dout --out sweeps/pairs/analysis
    python scripts/anova.py results.csv --factors din dout method --interactions din:dout --metrics dino_i clip_t

Type II ANOVA with eta² and partial eta² (with intervals and the power of each test), the seed as a block, every
factor's levels with intervals and pairwise comparisons adjusted for the other terms (Holm), the design points
compared with each other, correlations between metrics, and findings written from those numbers; tables as CSV and
Markdown, PNG plots, and <out>/report.md linking them. Factors default to the sweep's (from sweep.json beside the
table) without seed; blocks default to the table's seed column.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import pandas as pd

from ldm.evaluation.anova import AnalysisError, parse_interactions
from ldm.evaluation.report import write_report
from ldm.evaluation.study import analyse


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", help="the results CSV of scripts/evaluate.py")
    p.add_argument("--factors", nargs="+", help="factor columns (default: the sweep's factors except seed)")
    p.add_argument("--metrics", nargs="+",
                   help="metric columns (default: every <backend>_i, <backend>_t, <backend>_prior, fid)")
    p.add_argument("--interactions", nargs="*", default=[], metavar="A:B", help="interaction terms, e.g. din:dout")
    p.add_argument("--blocks", nargs="*", help="replicate columns modelled as additive blocks (default: seed, when "
                                                "the table has it with 2 or more levels; --blocks alone for none)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level in (0, 1) (default 0.05); "
                                                             "intervals are at 1 - alpha")
    p.add_argument("--out", help="report folder (default: analysis/ beside the table)")
    opt = p.parse_args(argv)
    if not 0 < opt.alpha < 1:  # NaN fails too
        p.error(f"--alpha must be between 0 and 1 (exclusive), got {opt.alpha}: e.g. --alpha 0.05")
    return opt


def sweep_factors(table: Path) -> List[str]:
    """The factors of the sweep whose folder holds the table, without seed (replicates, not a design factor)."""
    manifest = table.parent / "sweep.json"
    if not manifest.is_file():
        raise AnalysisError(f"no --factors and no sweep.json beside '{table}': pass --factors")
    factors = list(json.loads(manifest.read_text())["spec"]["factors"])
    return [f for f in factors if f != "seed"]


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    path = Path(opt.table)
    try:
        if not path.is_file():
            raise AnalysisError(f"results table not found: '{path}' (scripts/evaluate.py writes it)")
        table = pd.read_csv(path)
        factors = opt.factors or sweep_factors(path)
        results = analyse(table, opt.metrics, factors, opt.interactions, opt.alpha, opt.blocks)
        interactions = parse_interactions(opt.interactions, factors)
        report = write_report(table, results, factors, interactions, Path(opt.out or path.parent / "analysis"),
                              source=path.name, alpha=opt.alpha)
    except AnalysisError as e:
        sys.exit(f"error: {e}")
    print(f"report in {report}")
    return report


if __name__ == "__main__":
    main()
