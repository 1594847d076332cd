"""Train the tiny world's feature extractor (the metric model) and write its weights (a new .safetensors file).

    python scripts/train_tiny_probe.py [--steps 1500] --out logs/probe.safetensors

Nothing is overwritten: an --out that exists (the default is the shipped models/tiny-world/probe.safetensors) is
refused before training; move the old file away (or pass another --out) to replace it.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from ldm.checks import OutputPathError, check_output, positive_int, seed_int
from ldm.tinyworld.probe import DEFAULT_PROBE, probe_accuracy, save_probe, train_probe


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=positive_int, default=8000)
    parser.add_argument("--steps", type=positive_int, default=1500)
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--seed", type=seed_int, default=1)
    parser.add_argument("--out", default=str(DEFAULT_PROBE), help="a .safetensors file that does not exist yet")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    try:
        check_output(opt.out, "--out", suffixes=(".safetensors",))  # before minutes of training
    except OutputPathError as e:
        sys.exit(f"error: {e}")
    probe = train_probe(opt.num_images, opt.steps, opt.batch_size, seed=opt.seed)
    save_probe(probe, Path(opt.out))
    print(f"probe written to {opt.out}; held-out accuracy per attribute:")
    print(json.dumps(probe_accuracy(probe), indent=1))


if __name__ == "__main__":
    main()
