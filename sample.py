"""Text-to-image (and image-to-image) sampling with Stable Diffusion v1 and trained adapters.

The CompVis `txt2img.py` interface: numbered samples under OUTDIR/samples and a grid per run (never overwriting a
file), invisibly watermarked, optionally through the SD safety checker; adapter scale sweeps into one labelled grid
(and a GIF). Without --config, the config comes with the checkpoint (see ldm.models.base_config); without --H/--W,
images have the model's own size. The tiny model, in seconds on a CPU:

    python sample.py --ckpt models/ldm/tiny-sd-v1/model.safetensors --prompt "a photo of a red star"
"""
import argparse
import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError, DiskFullError, is_disk_full, load_trained_parameters
from ldm.config import build_base_model, load_configs, pop_adapter_configs
from ldm.models.base_config import adapter_config_from_file, config_fix, find_config, sampling_size
from ldm.models.diffusion.sampling import ETA_SAMPLERS, IMG2IMG_SAMPLERS, SAMPLERS, text_to_image
from ldm.modules.adapters import AdapterConfigError, is_added_key, load_adapter_from_dir, set_adapter_scale
from ldm.modules.fastpaths import apply_fast_paths
from ldm.modules.safety import SafetyChecker, SafetyCheckerError
from ldm.modules.watermark import Watermarker
from ldm.checks import (ArgumentParser, ConfigError, check_output_dir, finite_float, float_in, int_in,
                        non_negative_int, positive_int, read_text)
from ldm.data.dreambooth import check_image_file
from ldm.util import image_grid, load_model_from_config, pick_device, save_numbered, setup_logging, to_pil

log = logging.getLogger("sample")
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"  # CompVis' place for SD v1 weights
TINY_CKPT = "models/ldm/tiny-sd-v1/model.safetensors"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(prog="sample.py", description=__doc__)
    p.add_argument("--prompt", type=str, default="a painting of a virus monster playing guitar", help="the prompt")
    p.add_argument("--from-file", type=str, help="a file with one prompt per line (overrides --prompt)")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples", help="where samples and grids go")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=positive_int, default=50, help="number of sampling steps (at most the model's "
                                                                   "training timesteps)")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="the sampler (default: ddim)")
    p.add_argument("--plms", action="store_true", help="CompVis shorthand for --sampler plms")
    p.add_argument("--dpm_solver", action="store_true", help="shorthand for --sampler dpm++2m (DPM-Solver++(2M))")
    p.add_argument("--ddim_eta", type=float_in(0), default=0.0, help="DDIM eta (0.0 is deterministic)")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting noise for every batch")
    p.add_argument("--n_iter", type=positive_int, default=2, help="batches per prompt")
    p.add_argument("--n_samples", type=positive_int, default=3, help="batch size: samples per prompt per batch")
    p.add_argument("--n_rows", type=non_negative_int, default=0, help="images per grid row (0: n_samples)")
    p.add_argument("--H", type=positive_int, help="image height in pixels (default: the model's, from its config: 512 "
                                              "for SD v1, 64 for the tiny model)")
    p.add_argument("--W", type=positive_int, help="image width in pixels (default: the model's)")
    p.add_argument("--C", type=positive_int, help="latent channels (default and only allowed value: the model's)")
    p.add_argument("--f", type=positive_int, help="downsampling factor of the autoencoder (default and only allowed "
                                              "value: the model's)")
    p.add_argument("--scale", type=float_in(0), default=7.5,
                   help="classifier-free guidance scale (1 turns it off)")
    p.add_argument("--config", nargs="+", metavar="YAML",
                   help="model config(s), merged left to right as main_dream_booth.py's --base (default: the "
                        "checkpoint's: <ckpt>.yaml or config.yaml beside it, the config its metadata names, a "
                        "diffusers folder's own configs; else configs/stable-diffusion/v1-inference.yaml)")
    p.add_argument("--ckpt", type=str, default=DEFAULT_CKPT,
                   help=f"base weights: an SD v1 .ckpt or .safetensors, or a diffusers model folder (the tiny model: "
                        f"{TINY_CKPT})")
    p.add_argument("--random_init", action="store_true",
                   help="skip --ckpt and sample from the config's freshly initialised weights (smoke tests)")
    p.add_argument("--seed", type=int_in(0, 2 ** 63 - 1), default=42, help="the random seed")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: the first batch compiles (minutes), later ones may run faster (see "
                        "README 'Benchmarks'); where torch cannot compile, a warning and eager sampling")
    p.add_argument("--precision", choices=["full", "autocast"], default=None,
                   help="autocast (fp16 on a GPU, bf16 on the CPU) or full fp32 (default: autocast on a GPU, full on "
                        "the CPU)")
    p.add_argument("--init-img", type=str, help="img2img: the starting image")
    p.add_argument("--strength", type=float_in(0, 1, low_open=True), default=0.75,
                   help="img2img: how much to change the init image (1.0 destroys it entirely)")
    p.add_argument("--adapter_path", action="append", default=[], metavar="PATH",
                   help="a trained adapter directory, a kohya / diffusers / peft LoRA file (.safetensors, .pt, .bin, "
                        ".ckpt) or a peft / diffusers LoRA folder, for the UNet and/or the text encoder (repeatable: "
                        "each is its own adapter group); its own config builds the adapters")
    p.add_argument("--adapter_config", metavar="YAML",
                   help="the adapter config of an original-format (paper code, <module>.pt) adapter directory, which "
                        "carries none: a model config with one (configs/sd-inject-dreambooth/attn2o-ffni.yaml) or an "
                        "adapter_config.yaml (default: the one in --config)")
    p.add_argument("--trained_ckpt", metavar="FILE",
                   help="a run's checkpoints/last.ckpt from training the whole UNet (train_level [unet], the "
                        "DreamBooth baseline): its fine-tuned weights replace --ckpt's (with --adapter_path for "
                        "the run's adapters, if it had any)")
    p.add_argument("--adapter_scale", action="append", type=finite_float, default=[], metavar="S",
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
                        "pytorch_model.bin, or their folder); flagged images are saved black (default: none runs)")
    return p.parse_args(argv)


def read_prompts(opt: argparse.Namespace) -> List[str]:
    """The prompts to render: one per line of --from-file, else --prompt."""
    if not opt.from_file:
        return [opt.prompt]
    path = Path(opt.from_file)
    if not path.is_file():
        sys.exit(f"error: prompt file not found: {path}")
    try:
        prompts = [line.strip() for line in read_text(path, "prompt file").splitlines() if line.strip()]
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not prompts:
        sys.exit(f"error: prompt file {path} is empty: put one prompt per line")
    return prompts


def load_init_latent(model, opt: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """Encode --init-img, resized to --W x --H, into the scaled latent (1, C, H/f, W/f)."""
    image = Image.open(opt.init_img).convert("RGB").resize((opt.W, opt.H), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(device)
    return model.get_first_stage_encoding(model.encode_first_stage(x), sample=False)


def check_paths(opt: argparse.Namespace) -> None:
    """Exit with one clear message for a missing input or an output folder that cannot be written."""
    if not opt.random_init and not Path(opt.ckpt).exists():
        hint = f"; to try the project's tiny model: --ckpt {TINY_CKPT}" if opt.ckpt == DEFAULT_CKPT else ""
        sys.exit(f"error: checkpoint not found: '{opt.ckpt}' (--ckpt takes an SD v1 .ckpt / .safetensors file or a "
                 f"diffusers model folder{hint})")
    for flag, paths in (("--adapter_path", opt.adapter_path), ("--trained_ckpt", [opt.trained_ckpt]),
                        ("--adapter_config", [opt.adapter_config]), ("--config", opt.config or [])):
        for path in paths:
            if path and not Path(path).exists():
                sys.exit(f"error: {flag} not found: '{path}'")
    try:
        if opt.init_img:
            check_image_file(opt.init_img, "--init-img")
        check_output_dir(opt.outdir, "--outdir")
    except ValueError as e:
        sys.exit(f"error: {e}")


def chosen_sampler(opt: argparse.Namespace) -> Tuple[str, str]:
    """(sampler name, the option that chose it) from --sampler or a shorthand; conflicting choices exit."""
    given = {f"--sampler {opt.sampler}": opt.sampler} if opt.sampler else {}
    given.update({f"--{flag}": name for flag, name in (("plms", "plms"), ("dpm_solver", "dpm++2m"))
                  if getattr(opt, flag)})
    if len(set(given.values())) > 1:
        sys.exit(f"error: pick one sampler: {' or '.join(given)}")
    return next(((name, flag) for flag, name in given.items()), ("ddim", "--sampler ddim"))


def check_options(opt: argparse.Namespace) -> None:
    """Exit with one clear message for options that cannot work together or paths that cannot be used, before any
    work; settles opt.sampler."""
    opt.sampler, flag = chosen_sampler(opt)
    if opt.init_img and opt.sampler not in IMG2IMG_SAMPLERS:
        sys.exit(f"error: img2img uses {' or '.join(map(str.upper, IMG2IMG_SAMPLERS))}; drop {flag}")
    if opt.ddim_eta and opt.sampler not in ETA_SAMPLERS:
        sys.exit(f"error: {opt.sampler} is deterministic; drop --ddim_eta (it is DDIM's)")
    if opt.adapter_scale and len(opt.adapter_scale) != len(opt.adapter_path):
        sys.exit(f"error: give one --adapter_scale per --adapter_path (or none for 1.0), got "
                 f"{len(opt.adapter_scale)} for {len(opt.adapter_path)}")
    if opt.gif and opt.adapter_scale_sweep is None:
        sys.exit("error: --gif animates an adapter scale sweep: add --adapter_scale_sweep (or drop --gif)")
    if opt.adapter_config and not opt.adapter_path:
        sys.exit("error: --adapter_config builds the adapters of an original-format --adapter_path: add one (or "
                 "drop --adapter_config)")
    if opt.skip_save and opt.skip_grid and not opt.gif:
        sys.exit("error: --skip_save and --skip_grid together would save nothing: drop one")
    check_paths(opt)


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

    A directory of ours or a LoRA file brings its own adapter config; an original-format one is built from
    --adapter_config's (else --config's).
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
    """The base model from --config/--ckpt with every --adapter_path attached, on `device`; --C, --f, --H, --W and
    --ddim_steps checked against (and defaulted from) the model first, built on the meta device."""
    ckpt = None if opt.random_init else opt.ckpt
    try:
        config, where = (load_configs(opt.config), "--config") if opt.config else find_config(ckpt)
        log.info("model config: %s", where)
        # the adapters come from --adapter_path; the config's (or --adapter_config's) build an original-format one
        config_adapters = pop_adapter_configs(config)["unet"] if opt.adapter_path else None
        if opt.adapter_config:
            config_adapters = adapter_config_from_file(opt.adapter_config)
        opt.C, opt.f, opt.H, opt.W = sampling_size(build_base_model(config), opt.C, opt.f, opt.H, opt.W,
                                                   opt.ddim_steps, opt.sampler or "ddim")
        torch.manual_seed(opt.seed)  # like CompVis' seed_everything; also makes --random_init weights repeatable
        model = load_model_from_config(config, ckpt).to(device)
        attach_adapters(model, opt, config_adapters)
        if opt.trained_ckpt:
            step = load_trained_parameters(model, opt.trained_ckpt, skip=is_added_key)
            log.info("fine-tuned weights of step %s from %s", step, opt.trained_ckpt)
    except CheckpointError as e:
        sys.exit(f"error: {e}{'' if opt.random_init else config_fix(opt.ckpt, str(e))}")
    except (ConfigError, AdapterConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    return model


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
    """The run's grid (one row per sweep scale) and, with --gif, the sweep's animation, under the next free number;
    returns their paths."""
    sweep = scales[0] is not None
    labels = captions if opt.label else None
    row_labels = [f"scale {s:g}" for s in scales] if sweep and opt.label else None
    names, writers = [], []
    if not opt.skip_grid:
        n_cols = len(rows[0]) if sweep else opt.n_rows or opt.n_samples
        grid = mark(image_grid([im for row in rows for im in row], n_cols, labels and labels * len(rows), row_labels))
        names.append("grid-{:04}.png")
        writers.append(lambda tmp: grid.save(tmp, format="PNG"))
    if opt.gif:  # GIF's 256-colour palette would not keep the watermark: the frames go unmarked
        texts = row_labels or [None] * len(rows)
        frames = [image_grid(row, len(row), labels, text and [text]) for row, text in zip(rows, texts)]
        names.append("sweep-{:04}.gif")
        writers.append(lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=700, loop=0))
    return save_numbered(outdir, names, writers) if names else []


def save_samples(images: List[Image.Image], sample_dir: Path, mark: Callable[[Image.Image], Image.Image]
                 ) -> List[Path]:
    """Save `images` watermarked as new numbered PNGs of `sample_dir`, each under the next free number (never over
    an existing file, also with other runs writing into the same folder)."""
    return [save_numbered(sample_dir, ["{:05}.png"], [lambda tmp, im=mark(im): im.save(tmp, format="PNG")])[0]
            for im in images]


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


def kept(outdir: Path, before: set) -> str:
    """The files this run wrote into `outdir` (all complete: every file is written atomically), in words."""
    new = sorted(p for p in (set(outdir.rglob("*")) if outdir.is_dir() else set()) - before if p.is_file())
    if not new:
        return "no image was written"
    names = f"{new[0].relative_to(outdir)}" + (f" ... {new[-1].relative_to(outdir)}" if len(new) > 1 else "")
    return f"the {len(new)} file(s) written before it are kept in '{outdir}' ({names})"


def main(argv: Optional[List[str]] = None) -> List[Path]:
    opt = parse_args(argv)
    check_options(opt)
    scales = sweep_scales(opt)
    prompts = read_prompts(opt)
    device = pick_device()
    model = load_model(opt, device)
    apply_fast_paths(model.unet, device, compile=opt.compile)  # TF32 on CUDA; --compile
    mark, checker = make_watermarker(opt), make_safety_checker(opt, device)
    outdir = Path(opt.outdir)
    before = set(outdir.rglob("*")) if outdir.is_dir() else set()
    try:
        rows, captions, written = render_all(model, opt, prompts, scales, checker, mark)
        if checker is not None:
            log.info("safety checker: %d of %d images flagged and saved black", checker.flagged, checker.checked)
        written += save_grids(rows, scales, captions, opt, outdir, mark)
    except OSError as e:  # DiskFullError from our writes; ENOSPC from a folder made on the way
        if not is_disk_full(e):
            raise
        what = str(e) if isinstance(e, DiskFullError) else f"no space left on the device ({e})"
        sys.exit(f"error: {what}; {kept(outdir, before)}; free some space and run again")
    print(f"Your samples are ready and waiting for you here:\n{outdir.resolve()}\nEnjoy.")
    return written


if __name__ == "__main__":
    setup_logging(timestamps=False)
    main()
