"""Text-to-image (and image-to-image) sampling with Stable Diffusion v1 and trained adapters.

The CompVis `txt2img.py` interface: numbered samples under OUTDIR/samples and a grid per run, invisibly watermarked,
optionally through the SD safety checker; adapter scale sweeps into one labelled grid (and a GIF).
"""
import argparse
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError, load_trained_parameters
from ldm.config import load_configs, pop_adapter_configs
from ldm.models.diffusion.sampling import ETA_SAMPLERS, IMG2IMG_SAMPLERS, SAMPLERS, text_to_image
from ldm.modules.adapters import AdapterConfigError, is_added_key, load_adapter_from_dir, set_adapter_scale
from ldm.modules.fastpaths import apply_fast_paths
from ldm.modules.safety import SafetyChecker, SafetyCheckerError
from ldm.modules.watermark import Watermarker
from ldm.util import ConfigError, image_grid, load_model_from_config, pick_device, setup_logging, to_pil

log = logging.getLogger("sample")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=str, default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", type=str, help="a file with one prompt per line (overrides --prompt)")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="the sampler (default: ddim)")
    p.add_argument("--plms", action="store_true", help="CompVis shorthand for --sampler plms")
    p.add_argument("--dpm_solver", action="store_true", help="shorthand for --sampler dpm++2m (DPM-Solver++(2M))")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0.0 is deterministic)")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting noise for every batch")
    p.add_argument("--n_iter", type=int, default=2, help="batches per prompt")
    p.add_argument("--n_samples", type=int, default=3, help="batch size: samples per prompt per batch")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--H", type=int, default=512, help="image height in pixels")
    p.add_argument("--W", type=int, default=512, help="image width in pixels")
    p.add_argument("--C", type=int, help="latent channels (default and only allowed value: the model's)")
    p.add_argument("--f", type=int, help="downsampling factor of the autoencoder (default and only allowed value: "
                                         "the model's)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 turns it off)")
    p.add_argument("--config", nargs="+", default=["configs/stable-diffusion/v1-inference.yaml"], metavar="YAML",
                   help="model config(s), merged left to right as main_dream_booth.py's --base")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="base weights: an SD v1 .ckpt or .safetensors")
    p.add_argument("--random_init", action="store_true",
                   help="skip --ckpt and sample from the config's freshly initialised weights (smoke tests)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: the first batch compiles (minutes), later ones may run faster (see "
                        "README 'Benchmarks'); where torch cannot compile, a warning and eager sampling")
    p.add_argument("--precision", choices=["full", "autocast"], default=None,
                   help="autocast (fp16 on a GPU, bf16 on the CPU) or full fp32; default: autocast on a GPU, full on the CPU")
    p.add_argument("--init-img", type=str, help="img2img: the starting image")
    p.add_argument("--strength", type=float, default=0.75,
                   help="img2img: how much to change the init image (1.0 destroys it entirely)")
    p.add_argument("--adapter_path", action="append", default=[], metavar="DIR",
                   help="a trained adapter directory or a kohya / diffusers LoRA .safetensors file, for the UNet "
                        "and/or the text encoder (repeatable: each is its own adapter group); its own config "
                        "builds the adapters, --config only the base (and an original-format directory's adapters)")
    p.add_argument("--trained_ckpt", metavar="FILE",
                   help="a run's checkpoints/last.ckpt from training the whole UNet (train_level [unet], the "
                        "DreamBooth baseline): its fine-tuned weights replace --ckpt's (with --adapter_path for "
                        "the run's adapters, if it had any)")
    p.add_argument("--adapter_scale", action="append", type=float, default=[], metavar="S",
                   help="strength of the matching --adapter_path (repeatable, one per path; default 1.0)")
    p.add_argument("--adapter_scale_sweep", type=str, metavar="S,S,...",
                   help="render the same seeds at each of these adapter scales, one grid row per scale (each "
                        "--adapter_path's scale is S times its --adapter_scale), e.g. 0,0.25,0.5,0.75,1.0")
    p.add_argument("--gif", action="store_true", help="with --adapter_scale_sweep: also save an animated GIF over "
                                                       "the scales (OUTDIR/sweep-NNNN.gif, not watermarked)")
    p.add_argument("--label", action="store_true", help="write prompt and seed under each grid image (and the "
                                                         "scale beside each sweep row)")
    p.add_argument("--no-watermark", dest="no_watermark", action="store_true",
                   help="do not put the invisible watermark (\"StableDiffusionV1\") into saved images")
    p.add_argument("--safety_checker", type=str, metavar="PATH",
                   help="run the SD safety checker from these local weights (its model.safetensors or "
                        "pytorch_model.bin, or their folder); flagged images are saved black. Default: none runs")
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


def chosen_sampler(opt: argparse.Namespace) -> Tuple[str, str]:
    """(sampler name, the option that chose it) from --sampler or a shorthand; conflicting choices exit."""
    given = {f"--sampler {opt.sampler}": opt.sampler} if opt.sampler else {}
    given.update({f"--{flag}": name for flag, name in (("plms", "plms"), ("dpm_solver", "dpm++2m"))
                  if getattr(opt, flag)})
    if len(set(given.values())) > 1:
        sys.exit(f"error: pick one sampler: {' or '.join(given)}")
    return next(((name, flag) for flag, name in given.items()), ("ddim", "--sampler ddim"))


def check_options(opt: argparse.Namespace) -> None:
    """Exit with one clear message for options that cannot work together; settles opt.sampler."""
    opt.sampler, flag = chosen_sampler(opt)
    if opt.init_img and not 0.0 < opt.strength <= 1.0:
        sys.exit(f"error: --strength must be in (0, 1], got {opt.strength}")
    if opt.init_img and opt.sampler not in IMG2IMG_SAMPLERS:
        sys.exit(f"error: img2img uses {' or '.join(map(str.upper, IMG2IMG_SAMPLERS))}; drop {flag}")
    if not opt.ddim_eta >= 0.0:
        sys.exit(f"error: --ddim_eta must be >= 0, got {opt.ddim_eta}")
    if opt.ddim_eta and opt.sampler not in ETA_SAMPLERS:
        sys.exit(f"error: {opt.sampler} is deterministic; drop --ddim_eta (it is DDIM's)")
    if opt.adapter_scale and len(opt.adapter_scale) != len(opt.adapter_path):
        sys.exit(f"error: give one --adapter_scale per --adapter_path (or none for 1.0), got "
                 f"{len(opt.adapter_scale)} for {len(opt.adapter_path)}")
    if opt.gif and opt.adapter_scale_sweep is None:
        sys.exit("error: --gif animates an adapter scale sweep: add --adapter_scale_sweep (or drop --gif)")


def sweep_scales(opt: argparse.Namespace) -> List[Optional[float]]:
    """The scales of --adapter_scale_sweep, or [None] (render once, as given) without it."""
    if opt.adapter_scale_sweep is None:
        return [None]
    if not opt.adapter_path:
        sys.exit("error: --adapter_scale_sweep scales adapters: add at least one --adapter_path")
    try:
        scales = [float(v) for v in opt.adapter_scale_sweep.split(",")]
    except ValueError:
        scales = []
    if not scales or not all(np.isfinite(scales)):
        sys.exit(f"error: --adapter_scale_sweep takes comma-separated numbers like 0,0.5,1, "
                 f"got '{opt.adapter_scale_sweep}'")
    return scales


def adapter_paths(opt: argparse.Namespace) -> List[Tuple[str, str, float]]:
    """(group name, directory, --adapter_scale) for each --adapter_path."""
    scales = opt.adapter_scale or [1.0] * len(opt.adapter_path)
    return [(f"adapter{i}", path, scale) for i, (path, scale) in enumerate(zip(opt.adapter_path, scales), start=1)]


def attach_adapters(model: torch.nn.Module, opt: argparse.Namespace, config_adapters: Optional[dict]) -> None:
    """Load each --adapter_path into the whole model (UNet and text encoder) as its own adapter group `adapterN`,
    scaled by its --adapter_scale.

    A directory of ours brings its own adapter config; an original-format one is built from --config's.
    """
    for name, path, scale in adapter_paths(opt):
        load_adapter_from_dir(model, path, name=name, adapter_config=config_adapters)
        set_adapter_scale(model, scale, name=name)


def set_sweep_scale(model: torch.nn.Module, opt: argparse.Namespace, sweep: Optional[float]) -> None:
    """Scale every adapter group to `sweep` times its --adapter_scale (outside a sweep, `sweep` is None: no-op)."""
    if sweep is not None:
        for name, _, scale in adapter_paths(opt):
            set_adapter_scale(model, sweep * scale, name=name)


def load_model(opt: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The base model from --config/--ckpt with every --adapter_path attached, on `device`."""
    try:
        config = load_configs(opt.config)
        # with --adapter_path the adapters come from the directories; the config's build an original-format one
        config_adapters = pop_adapter_configs(config)["unet"] if opt.adapter_path else None
        model = load_model_from_config(config, None if opt.random_init else opt.ckpt).to(device)
        attach_adapters(model, opt, config_adapters)
        if opt.trained_ckpt:
            step = load_trained_parameters(model, opt.trained_ckpt, skip=is_added_key)
            log.info("fine-tuned weights of step %s from %s", step, opt.trained_ckpt)
    except (ConfigError, CheckpointError, AdapterConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    return model


def check_latent(opt: argparse.Namespace, model: torch.nn.Module) -> None:
    """--C and --f default to the model's values (any other value exits); --H and --W must be multiples of f."""
    for flag, given, own, what in (("--C", opt.C, model.channels, "latent channels"),
                                   ("--f", opt.f, model.downsampling_factor, "autoencoder downsampling factor")):
        if given is not None and given != own:
            sys.exit(f"error: {flag} {given} differs from the model's {what} {own}: drop {flag} (it defaults to "
                     f"the model's)")
    opt.C, opt.f = model.channels, model.downsampling_factor
    if opt.H % opt.f or opt.W % opt.f:
        sys.exit(f"error: --H and --W must be multiples of --f ({opt.f}), got {opt.H}x{opt.W}")


def make_watermarker(opt: argparse.Namespace) -> Callable[[Image.Image], Image.Image]:
    """Puts the invisible watermark into an image (unless --no-watermark)."""
    if opt.no_watermark:
        return lambda im: im
    try:
        return Watermarker()
    except ImportError as e:
        sys.exit(f"error: {e}")


def make_safety_checker(opt: argparse.Namespace, device: torch.device) -> Optional[SafetyChecker]:
    """The safety checker of --safety_checker, or None without it."""
    if not opt.safety_checker:
        return None
    try:
        return SafetyChecker(opt.safety_checker, device)
    except SafetyCheckerError as e:
        sys.exit(f"error: {e}")


def render_batch(model, opt: argparse.Namespace, prompt: str, init_latent: Optional[torch.Tensor],
                 start_code: Optional[torch.Tensor], generator: torch.Generator) -> List[Image.Image]:
    """One batch of --n_samples images of `prompt`: txt2img from start_code (or noise from `generator`), or img2img
    (its encoding noise always from `generator`: --fixed_code fixes x_T only)."""
    images = text_to_image(model, opt.n_samples * [prompt], None if init_latent is not None else start_code,
                           sampler=opt.sampler, steps=opt.ddim_steps, scale=opt.scale, eta=opt.ddim_eta,
                           init_latent=init_latent, strength=opt.strength, generator=generator, height=opt.H,
                           width=opt.W, verbose=True)
    return to_pil(images)


def save_grids(rows: List[List[Image.Image]], scales: List[Optional[float]], captions: List[str],
               opt: argparse.Namespace, outdir: Path, mark: Callable[[Image.Image], Image.Image]) -> List[Path]:
    """The run's grid (one row per sweep scale) and, with --gif, the sweep's animation; returns their paths."""
    number = len(list(outdir.glob("grid-*.png")))
    sweep = scales[0] is not None
    labels = captions if opt.label else None
    row_labels = [f"scale {s:g}" for s in scales] if sweep and opt.label else None
    written = []
    if not opt.skip_grid:
        n_cols = len(rows[0]) if sweep else opt.n_rows or opt.n_samples
        grid = image_grid([im for row in rows for im in row], n_cols, labels and labels * len(rows), row_labels)
        written.append(outdir / f"grid-{number:04}.png")
        mark(grid).save(written[-1])
    if opt.gif:  # GIF's 256-colour palette would not keep the watermark: the frames go unmarked
        texts = row_labels or [None] * len(rows)
        frames = [image_grid(row, len(row), labels, text and [text]) for row, text in zip(rows, texts)]
        written.append(outdir / f"sweep-{number:04}.gif")
        frames[0].save(written[-1], save_all=True, append_images=frames[1:], duration=700, loop=0)
    return written


def save_samples(images: List[Image.Image], sample_dir: Path, mark: Callable[[Image.Image], Image.Image]
                 ) -> List[Path]:
    """Save `images` watermarked as the next numbered PNGs of `sample_dir` (numbering continues across runs)."""
    start = len(list(sample_dir.glob("*.png")))
    paths = [sample_dir / f"{start + i:05}.png" for i in range(len(images))]
    for im, path in zip(images, paths):
        mark(im).save(path)
    return paths


def render_all(model, opt: argparse.Namespace, prompts: List[str], scales: List[Optional[float]],
               checker: Optional[SafetyChecker], mark: Callable[[Image.Image], Image.Image]
               ) -> Tuple[List[List[Image.Image]], List[str], List[Path]]:
    """Every prompt x --n_iter batch at every sweep scale, samples saved; returns grid rows, captions, saved paths."""
    device = model.betas.device
    use_autocast = opt.precision == "autocast" or (opt.precision is None and device.type == "cuda")
    precision_scope = torch.autocast(device.type) if use_autocast else nullcontext()
    generator = torch.Generator(device=device).manual_seed(opt.seed)
    shape = (opt.n_samples, *model.latent_shape(opt.H, opt.W))
    start_code = torch.randn(shape, generator=generator, device=device) if opt.fixed_code else None
    init_latent = load_init_latent(model, opt, device) if opt.init_img else None
    rows, captions, written = [[] for _ in scales], [], []
    for prompt in prompts:
        for _ in range(opt.n_iter):
            state = generator.get_state()  # every sweep scale starts from the same noise
            for row, scale in zip(rows, scales):
                set_sweep_scale(model, opt, scale)
                generator.set_state(state)
                with torch.no_grad(), precision_scope:
                    images = render_batch(model, opt, prompt, init_latent, start_code, generator)
                images = images if checker is None else checker(images)
                row.extend(images)
                if not opt.skip_save:
                    written += save_samples(images, Path(opt.outdir) / "samples", mark)
            captions += [f"{prompt}\nseed {opt.seed}, #{len(captions) + i}" for i in range(opt.n_samples)]
    return rows, captions, written


def main(argv: Optional[List[str]] = None) -> List[Path]:
    opt = parse_args(argv)
    check_options(opt)
    scales = sweep_scales(opt)
    prompts = read_prompts(opt)
    device = pick_device()
    torch.manual_seed(opt.seed)  # like CompVis' seed_everything; also makes --random_init weights repeatable
    model = load_model(opt, device)
    check_latent(opt, model)
    apply_fast_paths(model.unet, device, compile=opt.compile)  # TF32 on CUDA; --compile
    mark, checker = make_watermarker(opt), make_safety_checker(opt, device)
    outdir = Path(opt.outdir)
    (outdir / "samples").mkdir(parents=True, exist_ok=True)
    rows, captions, written = render_all(model, opt, prompts, scales, checker, mark)
    if checker is not None:
        log.info("safety checker: %d of %d images flagged and saved black", checker.flagged, checker.checked)
    written += save_grids(rows, scales, captions, opt, outdir, mark)
    print(f"Your samples are ready and waiting for you here:\n{outdir.resolve()}\nEnjoy.")
    return written


if __name__ == "__main__":
    setup_logging(timestamps=False)
    main()
