"""Convert LoRA, LoCon, LoHa, LoKr, DoRA and (IA)^3 adapters between our adapter directories and the files other
tools read: kohya / A1111 / ComfyUI / LyCORIS safetensors, diffusers' pytorch_lora_weights.safetensors (LoRA only) and
peft folders (LoRA, LoCon, LoHa, LoKr, DoRA; ldm/modules/adapters/files.py and folders.py have the names).

    python scripts/convert_lora.py --input logs/<run>/checkpoints/999-adapters --output my_lora.safetensors --to kohya
    python scripts/convert_lora.py --input logs/<run>/checkpoints/999-adapters --output my_lora_diffusers --to diffusers
    python scripts/convert_lora.py --input logs/<run>/checkpoints/999-adapters --output my_loha_peft --to peft
    python scripts/convert_lora.py --input downloaded_kohya_lora.safetensors --output my-adapters --to dir

DoRA states its magnitude against the base weights: converting it needs them (--ckpt).

Nothing is overwritten: an --output that exists (a file, or a folder that is not empty) or that is or lies inside
--input is refused before any work; its suffix must fit --to (.safetensors for a file, none for a folder).
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]

from ldm.checkpoint import CheckpointError
from ldm.checks import ArgumentParser, ConfigError, OutputPathError, check_output
from ldm.config import build_base_model, load_configs
from ldm.modules.adapters import (FORMATS, AdapterConfigError, load_adapter_from_dir, save_adapter_to_dir,
                                  save_lora_file, save_peft_folder)


DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a directory


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="an adapter directory, a kohya / LyCORIS / diffusers .safetensors "
                                                  "file, or a peft / diffusers folder")
    p.add_argument("--output", required=True, help=f"a directory (dir; peft; diffusers: {DIFFUSERS_FILE} inside it) "
                                                   "or a .safetensors file (kohya, diffusers); must not exist")
    p.add_argument("--to", choices=FORMATS + ("peft", "dir"), required=True, help="the output format")
    p.add_argument("--config", default=str(REPO / "configs/stable-diffusion/v1-inference.yaml"),
                   help="the model config the adapters are for (its adapter configs are ignored)")
    p.add_argument("--ckpt", help="base weights (SD v1 .ckpt / .safetensors or a diffusers folder); needed for DoRA, "
                                  "whose magnitude is stated against them")
    return p.parse_args(argv)


# The suffixes --output may have for each --to ("" is a folder), and whether it is a folder then
SUFFIXES = {"dir": ("",), "peft": ("",), "kohya": (".safetensors",), "diffusers": ("", ".safetensors")}


def check_destination(opt: argparse.Namespace) -> Path:
    """The file or folder to write, refused before any work when it exists, is inside the input, or does not fit
    --to."""
    kind = "file" if Path(opt.output).suffix == ".safetensors" else "dir"
    output = check_output(opt.output, "--output", kind, [opt.input], SUFFIXES[opt.to])
    return output / DIFFUSERS_FILE if opt.to == "diffusers" and output.suffix != ".safetensors" else output


def main(argv: Optional[List[str]] = None) -> Path:
    opt = parse_args(argv)
    try:
        output = check_destination(opt)
        model = build_base_model(load_configs([opt.config]), opt.ckpt)  # without --ckpt: names and shapes only
        load_adapter_from_dir(model, opt.input, "lora")
        if opt.to == "dir":
            save_adapter_to_dir(model, str(output), "lora")
        elif opt.to == "peft":
            save_peft_folder(model, str(output), "lora")
        else:
            save_lora_file(model, str(output), "lora", opt.to)
    except (AdapterConfigError, CheckpointError, ConfigError, OutputPathError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
