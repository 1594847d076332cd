"""Text-to-image: the samplers by name and the one path from prompts (and starting noise) to images.

sample.py, evaluation, the image logger and class-image generation all draw through `text_to_image_batches`. Each
keeps its own noise policy and hands the noise in: a tensor (`seeds_noise`, or its own), or a generator to draw it
from. Adding a sampler is one `Sampler` subclass (ldm/models/diffusion/sampler.py) and one line in SAMPLERS; what it
can do (eta, img2img, its step range, aliases) is asked of its class, never listed here.
"""
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampler import Sampler

SAMPLERS: Dict[str, Type[Sampler]] = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm++2m": DPMSolverSampler}
DEFAULT_SAMPLER = "ddim"


def sampler_names() -> Tuple[str, ...]:
    """Every name make_sampler takes: the registry's, then the aliases its samplers declare."""
    return (*SAMPLERS, *(alias for cls in SAMPLERS.values() for alias in cls.ALIASES))


SAMPLER_NAMES: Tuple[str, ...] = sampler_names()  # (at import: the registry as the project defines it)


def sampler_name(name: str) -> str:
    """The registry name of `name` (an alias resolved); a ValueError listing the names when it is unknown."""
    if name in SAMPLERS:
        return name
    found = [key for key, cls in SAMPLERS.items() if name in cls.ALIASES]
    if not found:
        raise ValueError(f"unknown sampler '{name}'; choose from {', '.join(sampler_names())}")
    return found[0]


def sampler_class(name: str) -> Type[Sampler]:
    """The sampler class of `name` (or an alias), to ask what it can do."""
    return SAMPLERS[sampler_name(name)]


def samplers_with(capability: str) -> List[str]:
    """The registry names of the samplers whose class attribute `capability` (e.g. "IMG2IMG") is true."""
    return [name for name, cls in SAMPLERS.items() if getattr(cls, capability)]


def make_sampler(name: str, model: torch.nn.Module) -> Sampler:
    """The sampler `name` (a key of SAMPLERS or an alias) over `model`."""
    return sampler_class(name)(model)


def seed_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Noise of `shape` drawn on the CPU from `seed`, so it is the same on every device and in every batch."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def seeds_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """x_T of one image per seed, (len(seeds), *shape), each drawn from its own seed."""
    return torch.stack([seed_noise(seed, shape) for seed in seeds])


def check_request(n_prompts: int, noise: Optional[torch.Tensor], sampler: str, init_latent: Optional[torch.Tensor],
                  strength: float, batch_size: Optional[int], scale: float, eta: float) -> None:
    """ValueError for a request text_to_image_batches cannot serve, before any work."""
    if not math.isfinite(scale) or not eta >= 0.0:  # (not >= refuses NaN too)
        raise ValueError(f"guidance scale must be finite and eta >= 0, got scale {scale} and eta {eta}")
    if n_prompts == 0:
        raise ValueError("no prompts to draw: give at least one")
    if noise is not None and len(noise) != n_prompts:
        raise ValueError(f"give one noise tensor per prompt: {len(noise)} for {n_prompts} prompts")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    cls = sampler_class(sampler)
    if eta and not cls.ETA:
        raise ValueError(f"the {sampler} sampler {cls.without_eta()}: eta must be 0 (it is DDIM's), got {eta}")
    if init_latent is None:
        return
    if not cls.IMG2IMG:
        raise ValueError(f"img2img works with the {', '.join(samplers_with('IMG2IMG'))} sampler, not '{sampler}'")
    if not 0.0 < strength <= 1.0:  # also refuses NaN
        raise ValueError(f"img2img strength must be in (0, 1], got {strength}")
    if len(init_latent) not in (1, n_prompts):
        raise ValueError(f"give one init latent, or one per prompt: {len(init_latent)} for {n_prompts} prompts")


def text_to_image_batches(model: torch.nn.Module, prompts: Sequence[str], noise: Optional[torch.Tensor] = None, *,
                          sampler: str = DEFAULT_SAMPLER, steps: int = 50, scale: float = 7.5, eta: float = 0.0,
                          batch_size: Optional[int] = None, init_latent: Optional[torch.Tensor] = None,
                          strength: float = 0.75, generator: Optional[torch.Generator] = None,
                          height: Optional[int] = None, width: Optional[int] = None, verbose: bool = False
                          ) -> Iterator[torch.Tensor]:
    """Images (b, 3, H, W) in [-1, 1] of `prompts`, batch by batch (`batch_size`, default all at once), with
    classifier-free guidance `scale` (1 turns it off), drawn in the model's eval mode.

    `noise` holds each image's starting noise (len(prompts), C, h, w) on any device: x_T, or with `init_latent`
    (img2img: (1 or len(prompts), C, h, w), noised to `strength` of the schedule) the encoding noise. Without
    `noise` it is drawn batch by batch from `generator` on the model's device, height x width pixels (default: the
    model's size). `generator` also feeds DDIM's eta noise. Bad requests raise here, before the first batch.
    """
    check_request(len(prompts), noise, sampler, init_latent, strength, batch_size, scale, eta)
    shape = model.latent_shape(height or model.pixel_size, width or model.pixel_size)
    chosen, device = make_sampler(sampler, model), model.betas.device
    chosen.make_schedule(steps, eta)  # checks the step count up front
    prompts, batch_size = list(prompts), batch_size or len(prompts)

    @torch.no_grad()
    def batches() -> Iterator[torch.Tensor]:
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(prompts), batch_size):
                texts = prompts[start:start + batch_size]
                c = model.get_learned_conditioning(texts)
                uc = model.get_learned_conditioning([""] * len(texts)) if scale != 1.0 else None
                x = None if noise is None else noise[start:start + len(texts)].to(device)  # (b, C, h, w)
                if init_latent is None:
                    x = torch.randn((len(texts), *shape), generator=generator, device=device) if x is None else x
                    z, _ = chosen.sample(steps, len(texts), x.shape[1:], c, unconditional_guidance_scale=scale,
                                         unconditional_conditioning=uc, eta=eta, x_T=x, generator=generator,
                                         verbose=verbose)
                else:
                    x0 = init_latent[start:start + len(texts)] if len(init_latent) > 1 else init_latent
                    t_enc = max(1, int(strength * steps))  # grid steps from the noised init latent down to 0
                    z = chosen.stochastic_encode(x0.expand(len(texts), -1, -1, -1), t_enc - 1, generator, x)
                    z = chosen.decode(z, c, t_enc, scale, uc, generator, verbose)
                yield model.decode_first_stage(z)
        finally:
            model.train(was_training)

    return batches()


def text_to_image(model: torch.nn.Module, prompts: Sequence[str], noise: Optional[torch.Tensor] = None,
                  **options: Any) -> torch.Tensor:
    """All images (len(prompts), 3, H, W) in [-1, 1] at once: `text_to_image_batches` (same options) concatenated."""
    return torch.cat(list(text_to_image_batches(model, prompts, noise, **options)))
