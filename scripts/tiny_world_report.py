"""The tiny world's full report (the README's table): probe accuracy, base-model quality, DreamBooth metrics.

    python scripts/tiny_world_report.py [--outdir outputs/tiny-world-report] [--steps 400] [--seeds 23,24]

Trains the demo adapter with and without prior preservation for each seed (main_dream_booth.py, on the CPU) and
writes OUTDIR/tiny-world-report.md and .json.
"""
import argparse
from pathlib import Path
from typing import List, Optional

from ldm.tinyworld.report import write_report


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", default="outputs/tiny-world-report")
    parser.add_argument("--steps", type=int, default=400, help="training steps per DreamBooth run")
    parser.add_argument("--seeds", default="23,24", help="training seeds, comma-separated")
    parser.add_argument("--n", type=int, default=32, help="samples per prompt")
    parser.add_argument("--quality_n", type=int, default=200, help="prompts for the base-model quality check")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    seeds = [int(s) for s in opt.seeds.split(",") if s]
    md = write_report(Path(opt.outdir), opt.steps, seeds, opt.n, opt.quality_n)
    print(md.read_text())
    print(f"report written to {md}")


if __name__ == "__main__":
    main()
