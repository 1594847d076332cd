"""Class images for DreamBooth prior preservation, generated once by the frozen base model and kept on disk."""
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ldm.checkpoint import atomic_write
from ldm.data.dreambooth import DataError, usable_images
from ldm.models.diffusion.sampling import DEFAULT_SAMPLER, sampler_name, seed_noise, text_to_image_batches
from ldm.util.images import to_pil
from ldm.util.numbered import next_number

log = logging.getLogger(__name__)

CLASS_IMAGE_NAME = "class-{:05d}.png"


def class_image_noise(seed: int, number: int, shape: Sequence[int]) -> torch.Tensor:
    """x_T of image `number`: drawn on the CPU from (seed, number), so it does not depend on batching or device."""
    # torch's CPU generator keeps only the low 32 bits of a seed, so mix (seed, number) within them.
    return seed_noise((seed * 1_000_003 + number) % 2 ** 32, shape)


def ensure_class_images(model: torch.nn.Module, folder: Union[str, Path], class_prompt: str,
                        num_class_images: int = 200, batch_size: int = 4, steps: int = 50, scale: float = 7.5,
                        seed: int = 0, size: Optional[int] = None, sampler: str = DEFAULT_SAMPLER) -> List[Path]:
    """Fill `folder` up to `num_class_images` readable images of `class_prompt` (`sampler` + CFG); returns them all."""
    sampler_name(sampler)  # a misspelt sampler fails before the folder is touched
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
    size = size or model.pixel_size
    first = next_number(folder, [CLASS_IMAGE_NAME])  # past every numbered file, readable or not: no name reused
    numbers = range(first, first + missing)
    shape = model.latent_shape(size, size)
    noise = torch.stack([class_image_noise(seed, k, shape) for k in numbers])  # (missing, c, h, w)
    batches = text_to_image_batches(model, [class_prompt] * missing, noise, sampler=sampler, steps=steps,
                                    scale=scale, batch_size=batch_size)
    new: List[Path] = []
    n_batches = -(-missing // batch_size)
    for i, images in enumerate(tqdm(batches, total=n_batches, desc="class images", unit="batch")):
        for k, image in zip(numbers[i * batch_size:], to_pil(images)):
            path = folder / CLASS_IMAGE_NAME.format(k)
            atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
            new.append(path)
    log.info("generated %d class image(s) of '%s' in '%s' (%d in all)", len(new), class_prompt, folder,
             len(existing) + len(new))
    return sorted(existing + new)
