"""Text-to-image samples for evaluation: every (prompt, seed) pair from fixed noise, independent of batching."""
from contextlib import nullcontext
from typing import ContextManager, List, Optional, Sequence, Tuple

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm_solver": DPMSolverSampler}  # one interface (sample.py's)


def prompt_seed_pairs(prompts: Sequence[str], seeds: Sequence[int]) -> List[Tuple[str, int]]:
    """(prompt, seed) for every prompt and seed, prompt-major: the order of the sampled images."""
    return [(p, s) for p in prompts for s in seeds]


def noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """x_T of one image, drawn on the CPU from its seed, so it is the same on every device and in every batch."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_images(model: torch.nn.Module, pairs: Sequence[Tuple[str, int]], size: int, steps: int = 50,
                  scale: float = 7.5, sampler: str = "ddim", batch_size: int = 8,
                  context: Optional[ContextManager] = None) -> torch.Tensor:
    """Images (len(pairs), 3, size, size) in [0, 1], one per (prompt, seed), with classifier-free guidance `scale`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose from {', '.join(SAMPLERS)}")
    device = model.betas.device
    shape = (model.channels, size // 8, size // 8)  # SD v1's autoencoder downsamples by 8
    chosen = SAMPLERS[sampler](model)
    out = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        x_T = torch.stack([noise(seed, shape) for _, seed in batch]).to(device)  # (b, c, h, w)
        with context or nullcontext():
            c = model.get_learned_conditioning([p for p, _ in batch])
            uc = model.get_learned_conditioning([""] * len(batch)) if scale != 1.0 else None
            z, _ = chosen.sample(steps, len(batch), shape, c, scale, uc, x_T=x_T, verbose=False)
            x = model.decode_first_stage(z)
        out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)
