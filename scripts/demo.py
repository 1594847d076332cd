"""The CPU demo on the project's tiny base model: DreamBooth an adapter onto a subject, then show before and after.

    python scripts/demo.py [--outdir outputs/demo] [--steps 400]

Writes OUTDIR/before_after.png (rows: "photo of a sks star" and "photo of a star", before and after training, same
noise), OUTDIR/metrics.json, and the training run under OUTDIR/logs/.
"""
import argparse
from pathlib import Path
from typing import List, Optional

from ldm.tinyworld.demo import run_demo
from ldm.util import setup_logging


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outdir", default="outputs/demo", help="where the run, the grid and the metrics go")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--n", type=int, default=16, help="samples per prompt for the metrics")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    result = run_demo(Path(opt.outdir), opt.steps, opt.seed, opt.n)
    width = max(map(len, result["metrics"]))
    print("\ntiny-world metrics (probe features; see README 'The tiny world'):")
    for key, value in result["metrics"].items():
        print(f"  {key:<{width}}  {value:.3f}")
    print(f"\nbefore/after grid: {result['grid']}\nadapters:          {result['adapters']}\n"
          f"training run:      {result['logdir']}")


if __name__ == "__main__":
    setup_logging(timestamps=False)
    main()
