"""Analysis of variance of a design-space study: which factor drives each metric, with plots, as one report.

    python scripts/anova.py sweeps/pairs/results.csv --factors din dout --out sweeps/pairs/analysis
    python scripts/anova.py results.csv --factors din dout method --interactions din:dout --metrics dino_i clip_t

Type II ANOVA (statsmodels) with eta², Tukey HSD for factors with p < --alpha; tables as CSV and Markdown, PNG plots,
and <out>/report.md linking them. Factors default to the sweep's (from sweep.json beside the table) without seed.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import pandas as pd

from ldm.evaluation.anova import AnalysisError, analyse, parse_interactions
from ldm.evaluation.report import write_report


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", help="the results CSV of scripts/evaluate.py")
    p.add_argument("--factors", nargs="+", help="factor columns (default: the sweep's factors except seed)")
    p.add_argument("--metrics", nargs="+", help="metric columns (default: every <backend>_i, <backend>_t, <backend>_prior, fid)")
    p.add_argument("--interactions", nargs="*", default=[], metavar="A:B", help="interaction terms, e.g. din:dout")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--out", help="report folder (default: analysis/ beside the table)")
    return p.parse_args(argv)


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
        results = analyse(table, opt.metrics, factors, opt.interactions, opt.alpha)
        interactions = parse_interactions(opt.interactions, factors)
        report = write_report(table, results, factors, interactions, Path(opt.out or path.parent / "analysis"),
                              source=path.name, alpha=opt.alpha)
    except AnalysisError as e:
        sys.exit(f"error: {e}")
    print(f"report in {report}")
    return report


if __name__ == "__main__":
    main()
