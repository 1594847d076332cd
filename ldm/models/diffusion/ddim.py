"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"), with eta and img2img."""
from typing import Optional, Tuple

import numpy as np
import torch

from ldm.models.diffusion.sampler import Sampler


def make_ddim_timesteps(num_ddim_steps: int, num_ddpm_steps: int) -> np.ndarray:
    """`num_ddim_steps` uniformly spaced DDPM timesteps, shifted by one as in the original (the first is t=1).

    Equal to the original for step counts that divide the DDPM steps (and to diffusers' "leading" spacing with
    steps_offset 1 for any count); the original's range() gave one step too many, past the schedule, for others.
    """
    if not 0 < num_ddim_steps <= num_ddpm_steps:
        raise ValueError(f"number of sampling steps must be in 1..{num_ddpm_steps}, got {num_ddim_steps}")
    c = num_ddpm_steps // num_ddim_steps
    ts = np.arange(num_ddim_steps) * c
    return ts + 1 if ts[-1] + 1 < num_ddpm_steps else ts  # every DDPM step (c = 1): 0..999, not past the end


def ddim_update(x: torch.Tensor, e_t: torch.Tensor, a_t: float, a_prev: float, sigma: float = 0.0,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} and the predicted x_0 from x_t and a noise estimate (DDIM eq. 12), with fresh noise of std `sigma`."""
    pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
    dir_xt = (1.0 - a_prev - sigma ** 2) ** 0.5 * e_t
    x_prev = a_prev ** 0.5 * pred_x0 + dir_xt
    if sigma > 0:
        x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x_prev, pred_x0


class DDIMSampler(Sampler):
    """DDIM with classifier-free guidance; eta > 0 makes its steps stochastic (eta = 1 is DDPM's ancestral step)."""

    TITLE = "DDIM"
    ETA = True
    IMG2IMG = True  # tested for DDIM: img2img noises to a DDIM step and denoises from it

    def timesteps(self, num_steps: int) -> np.ndarray:
        return make_ddim_timesteps(num_steps, self.model.num_timesteps)

    def _sigmas(self, alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
        """DDIM eq. 16: eta times the DDPM posterior's standard deviation."""
        return eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))

    def _step(self, x: torch.Tensor, e_t: torch.Tensor, index: int, generator: Optional[torch.Generator]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        a_t, a_prev, sigma = (float(v[index]) for v in (self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas))
        return ddim_update(x, e_t, a_t, a_prev, sigma, generator)
