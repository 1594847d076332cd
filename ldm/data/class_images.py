"""Class images for DreamBooth prior preservation, generated once by the frozen base model and kept on disk."""
import logging
import re
from pathlib import Path
from typing import List, Optional, Union

import torch
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_write
from ldm.data.dreambooth import DataError, usable_images
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import to_pil

log = logging.getLogger(__name__)

VAE_FACTOR = 8  # SD v1's first stage downsamples by 8
CLASS_IMAGE_NAME = re.compile(r"^class-(\d+)\.png$", re.IGNORECASE)


def _next_number(folder: Path) -> int:
    """One past the highest class-NNNNN.png number in folder (readable or not), so no name is ever reused."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := CLASS_IMAGE_NAME.match(p.name))]
    return max(numbers, default=-1) + 1


def _noise(seed: int, number: int, shape: tuple) -> torch.Tensor:
    """x_T of image `number`: drawn on the CPU from (seed, number), so it does not depend on batching or device."""
    # torch's CPU generator keeps only the low 32 bits of a seed, so mix (seed, number) within them.
    g = torch.Generator().manual_seed((seed * 1_000_003 + number) % 2 ** 32)
    return torch.randn(shape, generator=g)


def ensure_class_images(model: torch.nn.Module, folder: Union[str, Path], class_prompt: str,
                        num_class_images: int = 200, batch_size: int = 4, steps: int = 50, scale: float = 7.5,
                        seed: int = 0, size: Optional[int] = None) -> List[Path]:
    """Fill `folder` up to `num_class_images` readable images of `class_prompt` (DDIM + CFG); returns them all."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"class image folder '{folder}' is a file: expected a folder (it is created when missing)")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        existing = usable_images(folder)
    except DataError:  # an empty folder is fine here: everything gets generated
        existing = []
    missing = num_class_images - len(existing)
    if missing <= 0:
        log.info("'%s' already holds %d class image(s) (%d wanted): generating none",
                 folder, len(existing), num_class_images)
        return existing
    size = size or model.image_size * VAE_FACTOR
    if size % VAE_FACTOR:
        raise ValueError(f"class image size must be a multiple of {VAE_FACTOR}, got {size}")
    shape = (model.channels, size // VAE_FACTOR, size // VAE_FACTOR)
    first = _next_number(folder)
    device = model.betas.device
    sampler = DDIMSampler(model)
    was_training = model.training
    model.eval()
    new: List[Path] = []
    try:
        with torch.no_grad():
            c = model.get_learned_conditioning(batch_size * [class_prompt])
            uc = model.get_learned_conditioning(batch_size * [""]) if scale != 1.0 else None
            for start in tqdm(range(0, missing, batch_size), desc="class images", unit="batch"):
                numbers = range(first + start, first + min(start + batch_size, missing))
                n = len(numbers)
                x_T = torch.stack([_noise(seed, k, shape) for k in numbers]).to(device)  # (n, c, h, w)
                z, _ = sampler.sample(S=steps, batch_size=n, shape=shape, conditioning=c[:n],
                                      unconditional_guidance_scale=scale,
                                      unconditional_conditioning=None if uc is None else uc[:n],
                                      eta=0.0, x_T=x_T, verbose=False)
                for k, image in zip(numbers, to_pil(model.decode_first_stage(z))):
                    path = folder / f"class-{k:05d}.png"
                    atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
                    new.append(path)
    finally:
        model.train(was_training)
    log.info("generated %d class image(s) of '%s' in '%s' (%d in all)", len(new), class_prompt, folder,
             len(existing) + len(new))
    return sorted(existing + new)
