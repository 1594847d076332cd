"""Export a model (base weights, optionally with LoRA / (IA)^3 adapters merged in) as a diffusers model folder.

diffusers' `StableDiffusionPipeline.from_pretrained(folder)` loads the folder offline; no safety checker is written
(`requires_safety_checker: false`). The folder layout is in ldm/modules/diffusers_folder.py.

    python scripts/export_diffusers.py --config configs/tiny-world/tiny-sd-v1.yaml \
        --ckpt models/ldm/tiny-sd-v1/model.safetensors --outdir tiny-sd-v1-diffusers
    python scripts/export_diffusers.py --ckpt sd-v1-5.ckpt --adapter_path logs/<run>/checkpoints/999-adapters \
        --outdir sd-v1-5-dreambooth --half
"""
import argparse
import math
import sys
from pathlib import Path
from typing import List, Optional

from ldm.checkpoint import CheckpointError
from ldm.config import build_base_model, load_configs
from ldm.modules.adapters import (AdapterConfigError, is_added_key, load_adapter_from_dir, merge_adapters,
                                  set_adapter_scale)
from ldm.modules.diffusers_folder import check_outdir, write_diffusers_folder
from ldm.util import ConfigError, setup_logging

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"),
                   help="the model config (its adapter configs are ignored)")
    p.add_argument("--ckpt", required=True, help="base weights: an SD v1 .ckpt or .safetensors, or a diffusers folder")
    p.add_argument("--adapter_path", nargs="+", default=[], metavar="PATH",
                   help="adapters to merge into the weights, in order: adapter directories or kohya / diffusers "
                        "LoRA and (IA)^3 .safetensors files")
    p.add_argument("--alpha", type=float, default=1.0, help="strength of each merged adapter")
    p.add_argument("--outdir", required=True, help="the folder to write; must not exist, or be empty")
    p.add_argument("--half", action="store_true", help="write the weights in float16 (half the size)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    setup_logging()
    try:
        if not math.isfinite(opt.alpha):
            raise ConfigError(f"--alpha must be a finite number, got {opt.alpha}")
        config = load_configs([opt.config])
        check_outdir(opt.outdir)
        model = build_base_model(config, opt.ckpt).float()  # merge in float32 whatever the file's precision
        for i, path in enumerate(opt.adapter_path):
            load_adapter_from_dir(model, path, f"export{i}")
            set_adapter_scale(model, opt.alpha, f"export{i}")
            merge_adapters(model, f"export{i}")
        sd = {k: v for k, v in model.state_dict().items() if not is_added_key(k)}
        write_diffusers_folder(sd, config.model, opt.outdir, half=opt.half)
    except (AdapterConfigError, CheckpointError, ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {opt.outdir}: load it with StableDiffusionPipeline.from_pretrained('{opt.outdir}')")
    return Path(opt.outdir)


if __name__ == "__main__":
    main()
