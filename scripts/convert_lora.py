"""Convert LoRA / (IA)^3 adapters between our adapter directories and the files other tools read: kohya / A1111 /
ComfyUI safetensors and diffusers' pytorch_lora_weights.safetensors (ldm/modules/adapters/files.py has the names).

    python scripts/convert_lora.py --input logs/<run>/checkpoints/999-adapters --output my_lora.safetensors --to kohya
    python scripts/convert_lora.py --input logs/<run>/checkpoints/999-adapters --output my_lora_diffusers --to diffusers
    python scripts/convert_lora.py --input downloaded_kohya_lora.safetensors --output my-adapters --to dir
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]

from ldm.checkpoint import CheckpointError
from ldm.config import build_base_model, load_configs
from ldm.modules.adapters import FORMATS, AdapterConfigError, load_adapter_from_dir, save_adapter_to_dir, save_lora_file
from ldm.util import ConfigError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a directory


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="an adapter directory, or a kohya / diffusers .safetensors file")
    p.add_argument("--output", required=True, help=f"a directory (dir; diffusers: {DIFFUSERS_FILE} inside it) or "
                                                   "a .safetensors file")
    p.add_argument("--to", choices=FORMATS + ("dir",), required=True, help="the output format")
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"),
                   help="the model config the adapters are for (its adapter configs are ignored)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    output = Path(opt.output)
    if opt.to == "diffusers" and output.suffix != ".safetensors":
        output = output / DIFFUSERS_FILE
    try:
        model = build_base_model(load_configs([opt.config]))  # meta device: names and shapes only
        load_adapter_from_dir(model, opt.input, "lora")
        if opt.to == "dir":
            save_adapter_to_dir(model, str(output), "lora")
        else:
            save_lora_file(model, str(output), "lora", opt.to)
    except (AdapterConfigError, CheckpointError, ConfigError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
