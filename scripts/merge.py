"""Merge adapters as cloneofsimo/lora's `lora_add` does: a LoRA, LoCon, LoHa, LoKr, DoRA or (IA)^3 into a base SD
checkpoint (upl), or two LoRAs into one (lpl: cloneofsimo's mix of the factors; exact: ΔW = α·ΔW1 + (1-α)·ΔW2). The
formulas are in ldm/modules/adapters/merge.py.

    python scripts/merge.py --mode upl --path_1 sd-v1-5.ckpt --path_2 logs/<run>/checkpoints/999-adapters \
        --alpha 1.0 --output_path sd-v1-5-merged.ckpt
    python scripts/merge.py --mode exact --path_1 a-adapters --path_2 b_kohya.safetensors --alpha 0.5 \
        --output_path ab-adapters

Nothing is overwritten: an --output_path that exists, or that is or lies inside --path_1 / --path_2, is refused
before any work, and its suffix picks the format (upl: .ckpt or .safetensors; lpl / exact: .safetensors for a LoRA
file, no suffix for an adapter folder); anything else is refused.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]

from ldm.checkpoint import CheckpointError
from ldm.checks import ArgumentParser, ConfigError, OutputPathError, finite_float
from ldm.config import build_base_model, load_configs
from ldm.modules.adapters import (FORMATS, MODES, AdapterConfigError, check_merge_output, combine_loras,
                                  merge_into_checkpoint)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path_1", required=True, help="upl: the base SD v1 checkpoint; lpl/exact: the first LoRA "
                                                   "(adapter directory or kohya / diffusers .safetensors)")
    p.add_argument("--path_2", required=True, help="upl: the adapter to merge in; lpl/exact: the second LoRA")
    p.add_argument("--mode", choices=MODES, required=True,
                   help="upl: W + alpha*dW as a full checkpoint; lpl: cloneofsimo's factor mix; exact: "
                        "alpha*dW1 + (1-alpha)*dW2 with concatenated ranks")
    p.add_argument("--alpha", type=finite_float, default=None,
                   help="upl: strength of the adapter (default 1.0); lpl/exact: weight of path_1, path_2 gets "
                        "1 - alpha (default 0.5)")
    p.add_argument("--output_path", required=True, help="upl: a .ckpt or .safetensors checkpoint; lpl/exact: an "
                                                        "adapter directory (no suffix), or a .safetensors LoRA file; "
                                                        "must not exist (nothing is overwritten)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="lpl/exact into .safetensors: the file format (default kohya)")
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"),
                   help="the model config (its adapter configs are ignored)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    try:  # the output first: a refusal costs nothing
        check_merge_output(opt.mode, opt.output_path, [opt.path_1, opt.path_2], opt.format, "--output_path")
        config = load_configs([opt.config])
        if opt.mode == "upl":  # real weights to merge into; lpl / exact need names and shapes only (meta)
            merge_into_checkpoint(build_base_model(config, opt.path_1), opt.path_2, opt.output_path,
                                  1.0 if opt.alpha is None else opt.alpha)
        else:
            combine_loras(build_base_model(config), opt.path_1, opt.path_2, opt.output_path, opt.mode,
                          0.5 if opt.alpha is None else opt.alpha, opt.format or "kohya")
    except (AdapterConfigError, CheckpointError, ConfigError, OutputPathError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {opt.output_path}")
    return Path(opt.output_path)


if __name__ == "__main__":
    main()
