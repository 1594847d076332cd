"""Train the project's tiny SD v1 base model from scratch on the synthetic world (see configs/tiny-world/).

    python scripts/train_tiny_base.py --config configs/tiny-world/train-base.yaml [KEY=VALUE ...]

A killed run resumes from its stage checkpoints in work_dir (saved every few minutes: `checkpoint_minutes`), and
`--stop_after MINUTES` ends a sitting on purpose: the run saves and stops, and the same command continues it. Uses the
first CUDA device when there is one. The config
is checked before any work: unknown keys (a typo in an override) and numbers out of range are refused, and so is an
`out` file that exists (nothing is overwritten: pass out=NEW.safetensors) or that is the `init` file.
"""
import argparse
import sys
from typing import List, Optional

import torch

from ldm.checks import ArgumentParser, ConfigError, OutputPathError, device_arg, float_in
from ldm.config import load_yaml_config
from ldm.tinyworld.base import Paused, train_base
from ldm.tinyworld.base_config import apply_overrides
from ldm.util.devices import pick_device
from ldm.util.logs import setup_logging


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny-world/train-base.yaml", help="training config")
    parser.add_argument("--device", type=device_arg, default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--stop_after", type=float_in(0, low_open=True), default=None, metavar="MINUTES",
                        help="save and stop after this many minutes of wall clock (a sitting); the same command "
                             "continues (default: run to the end)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, e.g. diffusion.steps=100")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    opt = parse_args(argv)
    setup_logging()
    try:
        config = apply_overrides(load_yaml_config(opt.config), opt.overrides)
        out = train_base(config, torch.device(opt.device) if opt.device else pick_device(), opt.stop_after)
    except (ConfigError, OutputPathError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except Paused as e:
        print(f"paused: {e}")
        return
    print(f"tiny base model written to {out}")


if __name__ == "__main__":
    main()
