"""Export a model (base weights, optionally with adapters merged in) as a diffusers model folder.

Any linear form merges: LoRA, LoCon, LoHa, LoKr, DoRA, (IA)^3 without learn_biases.

diffusers' `StableDiffusionPipeline.from_pretrained(folder)` loads the folder offline; no safety checker is written
(`requires_safety_checker: false`). The folder layout is in ldm/modules/diffusers_folder.py.

    python scripts/export_diffusers.py --config configs/tiny-world/tiny-sd-v1.yaml \
        --ckpt models/ldm/tiny-sd-v1/model.safetensors --outdir tiny-sd-v1-diffusers
    python scripts/export_diffusers.py --ckpt sd-v1-5.ckpt --adapter_path logs/<run>/checkpoints/999-adapters \
        --outdir sd-v1-5-dreambooth --half

Nothing is overwritten: an --outdir that exists and is not an empty folder, or that is or lies inside --ckpt or an
--adapter_path, is refused before any work.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ldm.checkpoint import CheckpointError
from ldm.checks import ArgumentParser, ConfigError, OutputPathError, finite_float
from ldm.config import build_base_model, load_configs
from ldm.modules.adapters import (AdapterConfigError, is_added_key, load_adapter_from_dir, merge_adapters,
                                  set_adapter_scale)
from ldm.modules.diffusers_folder import check_outdir, write_diffusers_folder
from ldm.util.logs import setup_logging

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"),
                   help="the model config (its adapter configs are ignored)")
    p.add_argument("--ckpt", required=True, help="base weights: an SD v1 .ckpt or .safetensors, or a diffusers folder")
    p.add_argument("--adapter_path", nargs="+", default=[], metavar="PATH",
                   help="adapters to merge into the weights, in order: adapter directories, kohya / LyCORIS / "
                        "diffusers .safetensors files or peft folders of any linear form")
    p.add_argument("--alpha", type=finite_float, default=1.0, help="strength of each merged adapter")
    p.add_argument("--outdir", required=True, help="the folder to write; must not exist, or be empty (nothing is "
                                                    "overwritten)")
    p.add_argument("--half", action="store_true", help="write the weights in float16 (half the size)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    setup_logging()
    try:
        check_outdir(opt.outdir, [opt.ckpt, *opt.adapter_path], "--outdir")
        config = load_configs([opt.config])
        model = build_base_model(config, opt.ckpt).float()  # merge in float32 whatever the file's precision
        for i, path in enumerate(opt.adapter_path):
            load_adapter_from_dir(model, path, f"export{i}")
            set_adapter_scale(model, opt.alpha, f"export{i}")
            merge_adapters(model, f"export{i}")
        sd = {k: v for k, v in model.state_dict().items() if not is_added_key(k)}
        write_diffusers_folder(sd, config.model, opt.outdir, half=opt.half)
    except (AdapterConfigError, CheckpointError, ConfigError, OutputPathError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {opt.outdir}: load it with StableDiffusionPipeline.from_pretrained('{opt.outdir}')")
    return Path(opt.outdir)


if __name__ == "__main__":
    main()
