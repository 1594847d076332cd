"""Text-to-image samples for evaluation: every (prompt, seed) pair from its seed's noise, independent of batching."""
from contextlib import nullcontext
from typing import ContextManager, List, Optional, Sequence, Tuple

import torch

from ldm.models.diffusion.sampling import DEFAULT_SAMPLER, seeds_noise, text_to_image_batches


def prompt_seed_pairs(prompts: Sequence[str], seeds: Sequence[int]) -> List[Tuple[str, int]]:
    """(prompt, seed) for every prompt and seed, prompt-major: the order of the sampled images."""
    return [(p, s) for p in prompts for s in seeds]


def sample_images(model: torch.nn.Module, pairs: Sequence[Tuple[str, int]], size: int, steps: int = 50,
                  scale: float = 7.5, sampler: str = DEFAULT_SAMPLER, batch_size: int = 8,
                  context: Optional[ContextManager] = None) -> torch.Tensor:
    """Images (len(pairs), 3, size, size) in [0, 1] on the CPU, one per (prompt, seed), with classifier-free guidance
    `scale`; `context` (e.g. a precision context) is entered once around the sampling."""
    noise = seeds_noise([seed for _, seed in pairs], model.latent_shape(size, size))
    batches = text_to_image_batches(model, [prompt for prompt, _ in pairs], noise, sampler=sampler, steps=steps,
                                    scale=scale, batch_size=batch_size)
    with context or nullcontext():
        return torch.cat([((x.float().clamp(-1, 1) + 1) / 2).cpu() for x in batches])
