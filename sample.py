"""Text-to-image (and image-to-image) sampling with Stable Diffusion v1 and trained adapters.

The CompVis `txt2img.py` interface: numbered samples under OUTDIR/samples and a grid per run.
"""
import argparse
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.adapters import AdapterConfigError, set_adapter_scale
from ldm.util import ConfigError, image_grid, load_model_from_config, pick_device, to_pil


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=str, default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", type=str, help="a file with one prompt per line (overrides --prompt)")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (default: DDIM)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0.0 is deterministic)")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting noise for every batch")
    p.add_argument("--n_iter", type=int, default=2, help="batches per prompt")
    p.add_argument("--n_samples", type=int, default=3, help="batch size: samples per prompt per batch")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--H", type=int, default=512, help="image height in pixels")
    p.add_argument("--W", type=int, default=512, help="image width in pixels")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor of the autoencoder")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 turns it off)")
    p.add_argument("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="base weights: an SD v1 .ckpt or .safetensors")
    p.add_argument("--random_init", action="store_true",
                   help="skip --ckpt and sample from the config's freshly initialised weights (smoke tests)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=["full", "autocast"], default=None,
                   help="autocast (fp16 on a GPU, bf16 on the CPU) or full fp32; default: autocast on a GPU, full on the CPU")
    p.add_argument("--init-img", type=str, help="img2img: the starting image")
    p.add_argument("--strength", type=float, default=0.75,
                   help="img2img: how much to change the init image (1.0 destroys it entirely)")
    p.add_argument("--adapter_path", action="append", default=[], metavar="DIR",
                   help="a trained adapter directory (repeatable: each is its own adapter group); its own config "
                        "builds the adapters, --config only the base (and an original-format directory's adapters)")
    p.add_argument("--adapter_scale", action="append", type=float, default=[], metavar="S",
                   help="strength of the matching --adapter_path (repeatable, one per path; default 1.0)")
    return p.parse_args(argv)


def read_prompts(opt: argparse.Namespace) -> List[str]:
    """The prompts to render: one per line of --from-file, else --prompt."""
    if not opt.from_file:
        return [opt.prompt]
    path = Path(opt.from_file)
    if not path.is_file():
        sys.exit(f"error: prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        sys.exit(f"error: prompt file {path} is empty: put one prompt per line")
    return prompts


def load_init_latent(model, opt: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """Encode --init-img, resized to --W x --H, into the scaled latent (1, C, H/f, W/f)."""
    if not os.path.isfile(opt.init_img):
        sys.exit(f"error: init image not found: {opt.init_img}")
    image = Image.open(opt.init_img).convert("RGB").resize((opt.W, opt.H), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(device)
    return model.get_first_stage_encoding(model.encode_first_stage(x), sample=False)


def check_options(opt: argparse.Namespace) -> None:
    if opt.H % opt.f or opt.W % opt.f:
        sys.exit(f"error: --H and --W must be multiples of --f ({opt.f}), got {opt.H}x{opt.W}")
    if opt.init_img and not 0.0 < opt.strength <= 1.0:
        sys.exit(f"error: --strength must be in (0, 1], got {opt.strength}")
    if opt.init_img and opt.plms:
        sys.exit("error: img2img uses DDIM; drop --plms")
    if opt.adapter_scale and len(opt.adapter_scale) != len(opt.adapter_path):
        sys.exit(f"error: give one --adapter_scale per --adapter_path (or none for 1.0), got "
                 f"{len(opt.adapter_scale)} for {len(opt.adapter_path)}")


def pop_adapter_config(config) -> Optional[dict]:
    """Take the adapter_config out of --config: with --adapter_path, the adapters come from the directories."""
    params = OmegaConf.select(config, "model.params.unet_config.params")
    return params.pop("adapter_config", None) if params is not None else None


def attach_adapters(unet: torch.nn.Module, opt: argparse.Namespace, config_adapters: Optional[dict]) -> None:
    """Load each --adapter_path as its own adapter group `adapterN`, scaled by its --adapter_scale.

    A directory of ours brings its own adapter config; an original-format one is built from --config's.
    """
    scales = opt.adapter_scale or [1.0] * len(opt.adapter_path)
    for i, (path, scale) in enumerate(zip(opt.adapter_path, scales), start=1):
        unet.load_adapter_from_dir(path, name=f"adapter{i}", adapter_config=config_adapters)
        set_adapter_scale(unet, scale, name=f"adapter{i}")


def main(argv: Optional[List[str]] = None) -> List[Path]:
    opt = parse_args(argv)
    check_options(opt)
    prompts = read_prompts(opt)
    device = pick_device()
    torch.manual_seed(opt.seed)  # like CompVis' seed_everything; also makes --random_init weights repeatable
    try:
        config = OmegaConf.load(opt.config)
        config_adapters = pop_adapter_config(config) if opt.adapter_path else None
        model = load_model_from_config(config, None if opt.random_init else opt.ckpt).to(device)
        attach_adapters(model.unet, opt, config_adapters)
    except (ConfigError, CheckpointError, AdapterConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    sampler = PLMSSampler(model) if opt.plms else DDIMSampler(model)
    use_autocast = opt.precision == "autocast" or (opt.precision is None and device.type == "cuda")
    precision_scope = torch.autocast(device.type) if use_autocast else nullcontext()

    outdir = Path(opt.outdir)
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    base_count = len(list(sample_dir.glob("*.png")))
    grid_count = len(list(outdir.glob("grid-*.png")))
    generator = torch.Generator(device=device).manual_seed(opt.seed)
    shape = (opt.C, opt.H // opt.f, opt.W // opt.f)
    start_code = torch.randn((opt.n_samples, *shape), generator=generator, device=device) if opt.fixed_code else None
    init_latent = load_init_latent(model, opt, device) if opt.init_img else None

    written, grid_images = [], []
    with torch.no_grad(), precision_scope:
        for prompt in prompts:
            for _ in range(opt.n_iter):
                c = model.get_learned_conditioning(opt.n_samples * [prompt])
                uc = model.get_learned_conditioning(opt.n_samples * [""]) if opt.scale != 1.0 else None
                if init_latent is not None:
                    t_enc = max(1, int(opt.strength * opt.ddim_steps))
                    sampler.make_schedule(opt.ddim_steps, opt.ddim_eta)
                    z = sampler.stochastic_encode(init_latent.expand(opt.n_samples, -1, -1, -1), t_enc - 1, generator)
                    samples = sampler.decode(z, c, t_enc, opt.scale, uc, generator)
                else:
                    samples, _ = sampler.sample(opt.ddim_steps, opt.n_samples, shape, c, opt.scale, uc,
                                                eta=opt.ddim_eta, x_T=start_code, generator=generator)
                images = to_pil(model.decode_first_stage(samples))
                grid_images.extend(images)
                if not opt.skip_save:
                    for im in images:
                        path = sample_dir / f"{base_count:05}.png"
                        im.save(path)
                        written.append(path)
                        base_count += 1
    if not opt.skip_grid:
        path = outdir / f"grid-{grid_count:04}.png"
        image_grid(grid_images, opt.n_rows or opt.n_samples).save(path)
        written.append(path)
    print(f"Your samples are ready and waiting for you here:\n{outdir.resolve()}\nEnjoy.")
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
