"""The CPU demo on the project's tiny base model: DreamBooth an adapter onto a subject, then show before and after.

    python scripts/demo.py [--outdir outputs/demo] [--steps 400] [--model v3]

Writes OUTDIR/before_after.png (rows: "photo of a sks star" and "photo of a star", before and after training, same
noise), OUTDIR/metrics.json, and the training run under OUTDIR/logs/. Nothing is overwritten: when OUTDIR exists, the
demo goes to a fresh folder beside it (OUTDIR-2, OUTDIR-3, ...), and its path is printed.
"""
import argparse
import sys
from typing import List, Optional

from ldm.callbacks import TrainingInterrupted
from ldm.checks import ArgumentParser, OutputPathError, fresh_dir, positive_int, seed_int
from ldm.tinyworld.demo import run_demo
from ldm.tinyworld.evaluate import DEFAULT_MODEL, TINY_MODELS
from ldm.train import USER_ERRORS
from ldm.util.devices import use_idle_cores
from ldm.util.logs import setup_logging


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--outdir", default="outputs/demo", help="where the run, the grid and the metrics go (a "
                                                                 "fresh folder beside it when it exists)")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the demo config's)")
    parser.add_argument("--seed", type=seed_int, default=23)
    parser.add_argument("--n", type=positive_int, default=16, help="samples per prompt for the metrics")
    parser.add_argument("--model", choices=sorted(TINY_MODELS), default=DEFAULT_MODEL,
                        help="the tiny base model: v2 (f = 8, the default) or v3 (f = 4, the close-up world; see README "
                             "'The tiny world')")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    try:
        outdir = fresh_dir(opt.outdir, "--outdir")
    except OutputPathError as e:
        sys.exit(f"error: {e}")
    threads = use_idle_cores()
    print(f"writing the demo to {outdir} ({threads} CPU thread{'s' if threads > 1 else ''})")
    try:
        result = run_demo(outdir, opt.steps, opt.seed, opt.n, model=opt.model)
    except (TrainingInterrupted, KeyboardInterrupt):  # Ctrl-C: no grid from adapters that did not train
        sys.exit(f"demo stopped by Ctrl-C; what it made so far is in {outdir} (run `make demo` again for a fresh one)")
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    width = max(map(len, result["metrics"]))
    print("\ntiny-world metrics (probe features; see README 'The tiny world'):")
    for key, value in result["metrics"].items():
        print(f"  {key:<{width}}  {value:.3f}")
    print(f"\nbefore/after grid: {result['grid']}\nadapters:          {result['adapters']}\n"
          f"training run:      {result['logdir']}")


if __name__ == "__main__":
    setup_logging(timestamps=False)
    main()
