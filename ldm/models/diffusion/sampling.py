"""Text-to-image: the samplers by name and the one path from prompts (and starting noise) to images.

sample.py, evaluation, the image logger and class-image generation all draw through `text_to_image_batches`. Each
keeps its own noise policy and hands the noise in: a tensor (`seeds_noise`, or its own), or a generator to draw it
from. Adding a sampler is one class with DDIMSampler's interface and one line in SAMPLERS.
"""
import math
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Type

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

SAMPLERS: Dict[str, Type[DDIMSampler]] = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm++2m": DPMSolverSampler}
ALIASES = {"dpm_solver": "dpm++2m"}  # earlier names, still accepted (scripts/evaluate.py --sampler dpm_solver)
SAMPLER_NAMES: Tuple[str, ...] = (*SAMPLERS, *ALIASES)  # every name make_sampler takes
IMG2IMG_SAMPLERS = ("ddim",)  # img2img noises to a DDIM step and denoises from it (tested for DDIM only)
ETA_SAMPLERS = ("ddim",)  # samplers with DDIM's eta (stochastic steps); the others are deterministic


def sampler_name(name: str) -> str:
    """The registry name of `name` (an alias resolved); a ValueError listing the names when it is unknown."""
    if ALIASES.get(name, name) not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose from {', '.join(SAMPLER_NAMES)}")
    return ALIASES.get(name, name)


def make_sampler(name: str, model: torch.nn.Module) -> DDIMSampler:
    """The sampler `name` ("ddim", "plms", "dpm++2m") over `model`."""
    return SAMPLERS[sampler_name(name)](model)


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
    if eta and sampler_name(sampler) not in ETA_SAMPLERS:
        raise ValueError(f"the {sampler} sampler is deterministic: eta must be 0 (it is DDIM's), got {eta}")
    if init_latent is None:
        return
    if sampler_name(sampler) not in IMG2IMG_SAMPLERS:
        raise ValueError(f"img2img works with the {', '.join(IMG2IMG_SAMPLERS)} sampler, not '{sampler}'")
    if not 0.0 < strength <= 1.0:  # also refuses NaN
        raise ValueError(f"img2img strength must be in (0, 1], got {strength}")
    if len(init_latent) not in (1, n_prompts):
        raise ValueError(f"give one init latent, or one per prompt: {len(init_latent)} for {n_prompts} prompts")


def text_to_image_batches(model: torch.nn.Module, prompts: Sequence[str], noise: Optional[torch.Tensor] = None, *,
                          sampler: str = "ddim", steps: int = 50, scale: float = 7.5, eta: float = 0.0,
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
                    t_enc = max(1, int(strength * steps))  # DDIM steps from the noised init latent down to 0
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
