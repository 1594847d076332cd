"""The tiny world's full report (the README's table): probe accuracy, base-model quality, DreamBooth metrics.

    python scripts/tiny_world_report.py [--outdir outputs/tiny-world-report] [--steps 400] [--seeds 23,24,25,26]
        [--config configs/tiny-world/tiny-sd-v1-f4.yaml --ckpt logs/tiny-base-v3/model.safetensors] [--no_dreambooth]

Measures the shipped tiny base model (or the one --config and --ckpt name), trains the demo adapter with and without
prior preservation and the whole UNet for each seed (main_dream_booth.py, on the CPU; --no_dreambooth skips this),
compares them over the seeds with intervals (the whole UNet against the adapter, the prior on against off), and writes OUTDIR/tiny-world-report.md and .json. Nothing is overwritten: when OUTDIR exists, the report goes to a fresh
folder beside it (OUTDIR-2, OUTDIR-3, ...), and its path is printed.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ldm.checks import ArgumentParser, OutputPathError, SEED_MAX, fresh_dir, int_list, positive_int
from ldm.tinyworld.evaluate import BASE_CKPT, BASE_CONFIG
from ldm.tinyworld.report import write_report


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--outdir", default="outputs/tiny-world-report",
                        help="where the report goes (a fresh folder beside it when it exists)")
    parser.add_argument("--steps", type=positive_int, default=400, help="training steps per DreamBooth run")
    parser.add_argument("--seeds", type=int_list(0, SEED_MAX), default="23,24,25,26",
                        help="training seeds, comma-separated (the report compares the variants over them with "
                             "Welch's interval: 2 give intervals too wide to tell most differences)")
    parser.add_argument("--n", type=positive_int, default=32, help="samples per prompt")
    parser.add_argument("--quality_n", type=positive_int, default=200, help="prompts for the base-model quality check")
    parser.add_argument("--config", type=Path, default=BASE_CONFIG, help="the base model's config")
    parser.add_argument("--ckpt", type=Path, default=BASE_CKPT, help="the base model's weights")
    parser.add_argument("--no_dreambooth", action="store_true", help="measure the base model only (no training)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    for flag, path in (("--config", opt.config), ("--ckpt", opt.ckpt)):
        if not path.is_file():
            sys.exit(f"error: {flag}: no file at '{path}'")
    try:
        outdir = fresh_dir(opt.outdir, "--outdir")
    except OutputPathError as e:
        sys.exit(f"error: {e}")
    seeds = [] if opt.no_dreambooth else opt.seeds
    md = write_report(outdir, opt.steps, seeds, opt.n, opt.quality_n, opt.config.resolve(), opt.ckpt.resolve())
    print(md.read_text())
    print(f"report written to {md}")


if __name__ == "__main__":
    main()
