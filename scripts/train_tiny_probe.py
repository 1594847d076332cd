"""Train the tiny world's feature extractor (the metric model) and write models/tiny-world/probe.safetensors.

    python scripts/train_tiny_probe.py [--steps 1500] [--out models/tiny-world/probe.safetensors]
"""
import argparse
import json
from pathlib import Path
from typing import List, Optional

from ldm.tinyworld.probe import DEFAULT_PROBE, probe_accuracy, save_probe, train_probe


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(DEFAULT_PROBE))
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    probe = train_probe(opt.num_images, opt.steps, opt.batch_size, seed=opt.seed)
    save_probe(probe, Path(opt.out))
    print(f"probe written to {opt.out}; held-out accuracy per attribute:")
    print(json.dumps(probe_accuracy(probe), indent=1))


if __name__ == "__main__":
    main()
