"""Text-to-image (and image-to-image) sampling with Stable Diffusion v1 and trained adapters.

The CompVis `txt2img.py` interface: numbered samples under OUTDIR/samples and a grid per run (never overwriting a
file), invisibly watermarked, optionally through the SD safety checker; adapter scale sweeps into one labelled grid
(and a GIF). Without --config, the config comes with the checkpoint (see ldm.config.find_config); without --H/--W,
images have the model's own size. The tiny model, in seconds on a CPU:

    python sample.py --ckpt models/ldm/tiny-sd-v1/model.safetensors --prompt "a photo of a red star"
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ldm.checkpoint import CheckpointError, DiskFullError, is_disk_full
from ldm.config import config_fix
from ldm.models.diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS, sampler_class, samplers_with
from ldm.models.sampling_plan import AdapterFile, ModelSource, SamplingPlan, build_model, load_weights, sampling_size
from ldm.models.txt2img import make_watermarker, render
from ldm.modules.adapters import AdapterConfigError
from ldm.modules.fastpaths import apply_fast_paths
from ldm.modules.safety import SafetyChecker, SafetyCheckerError
from ldm.checks import (ArgumentParser, ConfigError, check_output_dir, finite_float, float_in, int_in,
                        non_negative_int, positive_int, read_text)
from ldm.data.dreambooth import check_image_file
from ldm.util.devices import pick_device
from ldm.util.logs import setup_logging

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
    p.add_argument("--sampler", choices=list(SAMPLERS), help=f"the sampler (default: {DEFAULT_SAMPLER})")
    for name, cls in SAMPLERS.items():
        if cls.SHORTHAND:
            p.add_argument(cls.SHORTHAND, action="store_true", help=f"shorthand for --sampler {name} ({cls.TITLE})")
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


def read_prompts(opt: argparse.Namespace) -> Tuple[str, ...]:
    """The prompts to render: one per line of --from-file, else --prompt."""
    if not opt.from_file:
        return (opt.prompt,)
    path = Path(opt.from_file)
    if not path.is_file():
        sys.exit(f"error: prompt file not found: {path}")
    try:
        prompts = tuple(line.strip() for line in read_text(path, "prompt file").splitlines() if line.strip())
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not prompts:
        sys.exit(f"error: prompt file {path} is empty: put one prompt per line")
    return prompts


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
    """(sampler name, the option that chose it) from --sampler or a sampler's shorthand flag; conflicts exit."""
    given = {f"--sampler {opt.sampler}": opt.sampler} if opt.sampler else {}
    given.update({cls.SHORTHAND: name for name, cls in SAMPLERS.items()
                  if cls.SHORTHAND and getattr(opt, cls.SHORTHAND.lstrip("-").replace("-", "_"))})
    if len(set(given.values())) > 1:
        sys.exit(f"error: pick one sampler: {' or '.join(given)}")
    return next(((name, flag) for flag, name in given.items()), (DEFAULT_SAMPLER, f"--sampler {DEFAULT_SAMPLER}"))


def check_options(opt: argparse.Namespace) -> str:
    """Exit with one clear message for options that cannot work together or paths that cannot be used, before any
    work; returns the sampler's name."""
    sampler, flag = chosen_sampler(opt)
    cls = sampler_class(sampler)
    if opt.init_img and not cls.IMG2IMG:
        titles = (SAMPLERS[name].TITLE for name in samplers_with("IMG2IMG"))
        sys.exit(f"error: img2img uses {' or '.join(titles)}; drop {flag}")
    if opt.ddim_eta and not cls.ETA:
        sys.exit(f"error: {sampler} {cls.without_eta()}; drop --ddim_eta (it is DDIM's)")
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
    return sampler


def sweep_scales(opt: argparse.Namespace) -> Tuple[Optional[float], ...]:
    """The scales of --adapter_scale_sweep, or (None,) (render once, as given) without it."""
    if opt.adapter_scale_sweep is None:
        return (None,)
    if not opt.adapter_path:
        sys.exit("error: --adapter_scale_sweep scales adapters: add at least one --adapter_path")
    try:
        scales = tuple(float(v) for v in opt.adapter_scale_sweep.split(","))
    except ValueError:
        scales = ()
    if not scales or not all(np.isfinite(scales)):
        sys.exit(f"error: --adapter_scale_sweep takes comma-separated numbers like 0,0.5,1, "
                 f"got '{opt.adapter_scale_sweep}'")
    return scales


def model_source(opt: argparse.Namespace) -> ModelSource:
    """Where the model comes from: --config, --ckpt (none with --random_init), each --adapter_path as its own
    adapter group `adapterN` at its --adapter_scale, --adapter_config, --trained_ckpt, --seed."""
    scales = opt.adapter_scale or [1.0] * len(opt.adapter_path)
    adapters = tuple(AdapterFile(f"adapter{i}", path, scale)
                     for i, (path, scale) in enumerate(zip(opt.adapter_path, scales), start=1))
    return ModelSource(tuple(opt.config or ()), None if opt.random_init else opt.ckpt, opt.seed, adapters,
                       opt.adapter_config, opt.trained_ckpt)


def read_options(opt: argparse.Namespace) -> Dict[str, Any]:
    """The plan's fields that the command line settles alone, checked before any work."""
    sampler = check_options(opt)
    sweep = sweep_scales(opt)
    return dict(prompts=read_prompts(opt), sampler=sampler, steps=opt.ddim_steps, eta=opt.ddim_eta, scale=opt.scale,
                n_samples=opt.n_samples, n_iter=opt.n_iter, seed=opt.seed, fixed_code=opt.fixed_code,
                init_img=opt.init_img, strength=opt.strength, sweep=sweep, outdir=Path(opt.outdir),
                save_samples=not opt.skip_save, save_grid=not opt.skip_grid, n_rows=opt.n_rows, label=opt.label,
                gif=opt.gif, watermark=not opt.no_watermark, safety_checker=opt.safety_checker)


def load(opt: argparse.Namespace, options: Dict[str, Any], device: torch.device
         ) -> Tuple[torch.nn.Module, SamplingPlan]:
    """The model, built once, and the plan: `options` with the image size checked against (and defaulted from) the
    model, --C, --f and --ddim_steps checked, and the precision settled for `device`, before the weights are read.
    Errors exit with one line."""
    source = model_source(opt)
    try:
        model, config_adapters = build_model(source)
        height, width = sampling_size(model, opt.C, opt.f, opt.H, opt.W, opt.ddim_steps, options["sampler"])
        autocast = opt.precision == "autocast" or (opt.precision is None and device.type == "cuda")
        plan = SamplingPlan(**options, height=height, width=width, autocast=autocast, adapters=source.adapters)
        return load_weights(model, source, config_adapters, device), plan
    except CheckpointError as e:
        sys.exit(f"error: {e}{'' if source.ckpt is None else config_fix(source.ckpt, str(e))}")
    except (ConfigError, AdapterConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def kept(outdir: Path, before: set) -> str:
    """The files this run wrote into `outdir` (all complete: every file is written atomically), in words."""
    new = sorted(p for p in (set(outdir.rglob("*")) if outdir.is_dir() else set()) - before if p.is_file())
    if not new:
        return "no image was written"
    names = f"{new[0].relative_to(outdir)}" + (f" ... {new[-1].relative_to(outdir)}" if len(new) > 1 else "")
    return f"the {len(new)} file(s) written before it are kept in '{outdir}' ({names})"


def main(argv: Optional[List[str]] = None) -> List[Path]:
    opt = parse_args(argv)
    options, device = read_options(opt), pick_device()
    model, plan = load(opt, options, device)
    apply_fast_paths(model.unet, device, compile=opt.compile)  # TF32 on CUDA; --compile
    try:
        mark = make_watermarker(plan.watermark)
        checker = SafetyChecker(plan.safety_checker, device) if plan.safety_checker else None
    except (ImportError, SafetyCheckerError) as e:
        sys.exit(f"error: {e}")
    before = set(plan.outdir.rglob("*")) if plan.outdir.is_dir() else set()
    try:
        written = render(model, plan, checker, mark)
    except OSError as e:  # DiskFullError from our writes; ENOSPC from a folder made on the way
        if not is_disk_full(e):
            raise
        what = str(e) if isinstance(e, DiskFullError) else f"no space left on the device ({e})"
        sys.exit(f"error: {what}; {kept(plan.outdir, before)}; free some space and run again")
    if checker is not None:
        log.info("safety checker: %d of %d images flagged and saved black", checker.flagged, checker.checked)
    print(f"Your samples are ready and waiting for you here:\n{plan.outdir.resolve()}\nEnjoy.")
    return written


if __name__ == "__main__":
    setup_logging(timestamps=False)
    main()
