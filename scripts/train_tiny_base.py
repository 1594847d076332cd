"""Train the project's tiny SD v1 base model from scratch on the synthetic world (see configs/tiny-world/).

    python scripts/train_tiny_base.py --config configs/tiny-world/train-base.yaml [KEY=VALUE ...]

A killed run resumes from its stage checkpoints in work_dir. Uses the first CUDA device when there is one.
"""
import argparse
import sys
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from ldm.tinyworld.base import train_base
from ldm.util import setup_logging


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-world/train-base.yaml", help="training config")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, e.g. diffusion.steps=100")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    setup_logging()
    config = OmegaConf.merge(OmegaConf.load(opt.config), OmegaConf.from_dotlist(opt.overrides))
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = train_base(config, device)
    print(f"tiny base model written to {out}")


if __name__ == "__main__":
    sys.exit(main())
